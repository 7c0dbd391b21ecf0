"""Load, validate and resolve a workflow config.

Validation fills the schema's defaults and rejects unknown keys and out-of-range values; the
semantic checks below (names that must exist, target classes, sample counts, dataset roots) run
before any job, each failing with one line that names the key. ``resolve_*`` return the fully
resolved entry a job depends on: it goes into the rule's ``params`` so Snakemake reruns exactly
the jobs whose inputs changed.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from . import kinds
from .errors import ConfigError
from .geometry import patch_position
from .targets import ALL_TO_ALL, poison_budget  # noqa: F401  (poison_budget: re-exported)


def validate(config: dict) -> dict:
    """Return a copy of ``config`` with defaults filled, or raise ConfigError naming the key."""
    return kinds.fill_and_check(dict(config), kinds.config_schema())


@dataclass(frozen=True)
class Job:
    dataset: str
    attack: str
    training: str
    defense: str
    seed: int


class Config:
    """A validated config with its semantic checks done."""

    def __init__(self, raw: dict):
        self.data = validate(raw)
        self._described: dict[str, dict] = {}
        self._check()

    # -- resolution -------------------------------------------------------------------------
    def dataset(self, name: str) -> dict:
        return copy.deepcopy(self.data["datasets"][name])

    def training(self, name: str) -> dict:
        """A trainings entry with its ``model`` entry resolved inline."""
        entry = copy.deepcopy(self.data["trainings"][name])
        entry["model"] = copy.deepcopy(self.data["models"][entry["model"]])
        return entry

    def surrogate(self, name: str) -> dict:
        entry = copy.deepcopy(self.data["surrogates"][name])
        entry["training"] = self.training(entry["training"])
        return entry

    def generator(self, name: str) -> dict:
        """A generators entry with its ``surrogate`` entry resolved inline (if it names one)."""
        entry = copy.deepcopy(self.data["generators"][name])
        if "surrogate" in entry:
            entry["surrogate_entry"] = self.surrogate(entry["surrogate"])
        return entry

    def attack(self, name: str) -> dict:
        entry = copy.deepcopy(self.data["attacks"][name])
        if "generator" in entry:
            entry["generator_entry"] = self.generator(entry["generator"])
        if "surrogate" in entry:
            entry["surrogate_entry"] = self.surrogate(entry["surrogate"])
        return entry

    def defense(self, name: str) -> dict:
        return copy.deepcopy(self.data["defenses"][name])

    def evaluation(self) -> dict:
        return copy.deepcopy(self.data["evaluation"])

    def jobs(self) -> Iterator[Job]:
        seen = set()
        for experiment in self.data["experiments"]:
            for combo in itertools.product(experiment["dataset"], experiment["attack"], experiment["training"],
                                           experiment["defense"], experiment["seed"]):
                job = Job(*combo)
                if job not in seen:
                    seen.add(job)
                    yield job

    def describe(self, dataset: str) -> dict:
        """Class names, per-class counts of the released training set and of the reserve, and the
        image side of a dataset entry (cheap, cached; no image is read)."""
        if dataset not in self._described:
            spec = self.data["datasets"][dataset]
            key = f"datasets.{dataset}"
            source = kinds.SOURCES.get(spec["source"], key=f"{key}.source")
            described = source.describe(spec, key=key)
            counts = [int(c) for c in described["train_counts"]]
            reserve = reserve_counts(counts, float(spec["reserve"]))
            self._described[dataset] = {
                "classes": list(described["classes"]),
                "train_counts": [c - r for c, r in zip(counts, reserve)],
                "reserve_counts": reserve,
                "image_size": int(spec.get("image_size") or source.NATIVE_SIZE),
            }
        return self._described[dataset]

    # -- checks -----------------------------------------------------------------------------
    def _check_names(self, section: str, names: list[str], key: str) -> None:
        for name in names:
            if name not in self.data[section]:
                raise ConfigError(f"{key}: no {section} entry named '{name}' (known: {', '.join(sorted(self.data[section])) or 'none'})")

    def _check(self) -> None:
        from .architectures import ARCHITECTURES

        for name, entry in self.data["datasets"].items():
            kinds.SOURCES.target(entry["source"], key=f"datasets.{name}.source")
        for name, entry in self.data["models"].items():
            ARCHITECTURES.target(entry["arch"], key=f"models.{name}.arch")
        for name, entry in self.data["trainings"].items():
            self._check_names("models", [entry["model"]], f"trainings.{name}.model")
        for name, entry in self.data["surrogates"].items():
            self._check_names("trainings", [entry["training"]], f"surrogates.{name}.training")
        for name, entry in self.data["attacks"].items():
            kinds.ATTACK_KINDS.target(entry["kind"], key=f"attacks.{name}.kind")
        for name, entry in self.data["defenses"].items():
            kinds.DEFENSES.target(entry["kind"], key=f"defenses.{name}.kind")
        for name, entry in self.data["generators"].items():
            fragment = kinds.ATTACKS.fragment(entry["kind"], key=f"generators.{name}.kind")
            if not fragment.generator:
                raise ConfigError(f"generators.{name}.kind: attack kind '{entry['kind']}' trains no generator "
                                  f"(kinds that do: {', '.join(sorted(f.kind for f in kinds.fragments() if f.generator))})")
            if "surrogate" in entry:
                self._check_names("surrogates", [entry["surrogate"]], f"generators.{name}.surrogate")
        for name, entry in self.data["attacks"].items():
            if "generator" in entry:
                self._check_names("generators", [entry["generator"]], f"attacks.{name}.generator")
                if self.data["generators"][entry["generator"]]["kind"] != entry["kind"]:
                    raise ConfigError(f"attacks.{name}.generator: generators entry '{entry['generator']}' is of kind "
                                      f"'{self.data['generators'][entry['generator']]['kind']}', not '{entry['kind']}'")
            if "surrogate" in entry:
                self._check_names("surrogates", [entry["surrogate"]], f"attacks.{name}.surrogate")
            if entry.get("selection", "random") != "random" and "surrogate" not in entry:
                raise ConfigError(f"attacks.{name}.surrogate: selection '{entry['selection']}' needs a surrogate")
        for i, experiment in enumerate(self.data["experiments"]):
            for field, section in (("dataset", "datasets"), ("attack", "attacks"), ("training", "trainings"),
                                   ("defense", "defenses")):
                self._check_names(section, experiment[field], f"experiments[{i}].{field}")
        jobs = list(self.jobs())
        for dataset, attack in sorted({(j.dataset, j.attack) for j in jobs}):
            entry, described = self.data["attacks"][attack], self.describe(dataset)
            fragment = kinds.ATTACK_KINDS.fragment(entry["kind"])
            for check in ATTACK_CHECKS:
                check(entry, fragment, described, f"attacks.{attack}", dataset)
        for dataset, defense in sorted({(j.dataset, j.defense) for j in jobs}):
            entry = self.data["defenses"][defense]
            fragment = kinds.DEFENSES.fragment(entry["kind"])
            check_reserve(entry, fragment, self.describe(dataset), f"defenses.{defense}", dataset)


# -- checks of an entry against the dataset it runs on, one concern each ------------------------
# Each takes (entry, its kind's fragment, the dataset's description, the entry's key, dataset name).

def check_target(entry: dict, fragment: kinds.Fragment, described: dict, key: str, dataset: str) -> None:
    """A backdoor's target class exists in the dataset."""
    classes = len(described["train_counts"])
    if fragment.role.name != "backdoor":
        return
    if entry["target"] == ALL_TO_ALL:
        if entry["label_mode"] != "dirty":
            raise ConfigError(f"{key}.target: all-to-all relabels every class, so it needs label_mode dirty")
        return
    if entry["target"] >= classes:
        raise ConfigError(f"{key}.target: class {entry['target']} is outside dataset '{dataset}' "
                          f"({classes} classes, 0..{classes - 1})")


def check_rate(entry: dict, fragment: kinds.Fragment, described: dict, key: str, dataset: str) -> None:
    """The rate selects at least one sample, and no more than are eligible."""
    counts = described["train_counts"]
    if fragment.role.name == "unlearnable":
        available, requested = sum(counts), int(round(float(entry.get("rate", 1.0)) * sum(counts)))
        verb = "protects"
    else:
        available, requested = poison_budget(entry, counts)
        verb = "poisons"
    if requested < 1:
        raise ConfigError(f"{key}.rate: {entry.get('rate')} {verb} no sample of dataset '{dataset}'")
    if requested > available:
        raise ConfigError(f"{key}.rate: {entry['rate']} asks for {requested} samples but dataset "
                          f"'{dataset}' has only {available} eligible ({entry['label_mode']}-label)")


def check_patch(entry: dict, fragment: kinds.Fragment, described: dict, key: str, dataset: str) -> None:
    """A patch trigger (declared in the fragment's ``checks.patch``) fits the dataset's images."""
    declared = fragment.checks.get("patch")
    if not declared:
        return
    values = {name: lookup(entry, path) for name, path in declared.items()}
    side = described["image_size"]
    try:
        patch_position(values.get("position", "bottom-right"), int(values["size"]), side, side,
                       int(values.get("margin", 0)))
    except ConfigError as error:
        raise ConfigError(f"{key}.{error} (dataset '{dataset}')") from None


ATTACK_CHECKS = (check_target, check_rate, check_patch)


def check_reserve(entry: dict, fragment: kinds.Fragment, described: dict, key: str, dataset: str) -> None:
    """A defense that uses clean data (``checks.reserve`` in its fragment) gets a non-empty reserve."""
    if fragment.checks.get("reserve") and sum(described["reserve_counts"]) < 1:
        raise ConfigError(f"datasets.{dataset}.reserve: defense '{key.split('.', 1)[1]}' needs clean data, but "
                          f"the reserve of dataset '{dataset}' is empty (set a reserve fraction above 0)")


def lookup(entry: dict, path: str):
    """``entry``'s value at a dotted path (``trigger.size``)."""
    value = entry
    for part in path.split("."):
        value = value[part]
    return value


def reserve_counts(counts: list[int], fraction: float) -> list[int]:
    """Per-class sizes of the reserve: ``fraction`` of each class, rounded half up."""
    return [int(math.floor(fraction * count + 0.5)) for count in counts]


def load(path_or_dict: str | Path | dict) -> Config:
    if isinstance(path_or_dict, (str, Path)):
        path = Path(path_or_dict)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        raw: Any = yaml.safe_load(path.read_text())
    else:
        raw = path_or_dict
    if not isinstance(raw, dict):
        raise ConfigError("config: must be a mapping")
    return Config(raw)
