# Helpers shared by the rules: JSON specs for params, code hashes, output paths.

import json

import os

from poisonflow.attacks import kind_registry
from poisonflow.codehash import code_hash
from poisonflow.data import SOURCES
from poisonflow.defenses import DEFENSES

RESULTS = "results"
THREADS = CFG.data["threads"]


wildcard_constraints:
    dataset="[^/]+",
    attack="[^/]+",
    training="[^/]+",
    defense="[^/]+",
    surrogate="[^/]+",
    generator="[^/]+",
    seed="[0-9]+",


def as_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def victim_dir(w):
    return f"{RESULTS}/victims/{w.dataset}/{w.attack}/{w.training}/seed{w.seed}"


def defense_dir(w):
    return f"{victim_dir(w).replace('/victims/', '/defenses/', 1)}/{w.defense}"


def all_defense_metrics():
    return [
        f"{RESULTS}/defenses/{j.dataset}/{j.attack}/{j.training}/seed{j.seed}/{j.defense}/metrics.json"
        for j in CFG.jobs()
    ]
