"""Config validation: defaults, and one clear error naming the key for each kind of bad input."""

from __future__ import annotations

import copy

import pytest

from poisonflow import config
from poisonflow.errors import ConfigError, PoisonflowError
from workflow_utils import snakemake, write_config

BASE = {
    "datasets": {"digits": {"source": "digits"}},
    "models": {"m": {"arch": "convnet", "width": 4}},
    "trainings": {"t": {"model": "m"}},
    "attacks": {"a": {"kind": "badnets"}},
    "defenses": {"n": {"kind": "none"}},
    "experiments": [{"dataset": ["digits"], "attack": ["a"], "training": ["t"], "defense": ["n"], "seed": [0]}],
}


def load(change=None):
    raw = copy.deepcopy(BASE)
    if change:
        change(raw)
    return config.load(raw)


def test_defaults_are_filled():
    cfg = load()
    attack = cfg.attack("a")
    assert attack["rate"] == 0.1 and attack["label_mode"] == "dirty" and attack["selection"] == "random"
    assert attack["trigger"] == {"pattern": "checkerboard", "size": 3, "position": "bottom-right", "margin": 0}
    training = cfg.training("t")
    assert training["model"] == {"arch": "convnet", "width": 4}
    assert training["optimizer"]["name"] == "sgd" and training["schedule"]["name"] == "cosine"
    assert cfg.evaluation()["pgd"]["steps"] == 10


def test_aabl_defaults_follow_the_paper():
    cfg = load(lambda c: c["defenses"].update(x={"kind": "aabl", "stage1": {"epochs": 3}}))
    spec = cfg.defense("x")
    assert spec["stage1"] == {"epochs": 3, "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
                              "schedule": {"name": "constant"}, "adversarial": None}
    assert spec["split"]["eps"] == pytest.approx(2 / 255) and spec["split"]["steps"] == 5
    assert spec["split"]["sce_alpha"] == 0.1 and spec["split"]["sce_beta"] == 1.0
    assert spec["stage3"]["adversarial"] == pytest.approx({"eps": 8 / 255, "step": 2 / 255, "steps": 10})


def test_entries_take_their_defaults_from_the_fragments():
    from poisonflow.kinds import defaults_of

    cfg = load(lambda c: (c["attacks"].update(b={"kind": "blended"}, w={"kind": "wanet"}),
                          c["defenses"].update(x={"kind": "aabl"}, f={"kind": "fine-pruning"})))
    assert cfg.attack("a")["trigger"] == {"pattern": "checkerboard", "size": 3, "position": "bottom-right", "margin": 0}
    assert cfg.attack("w")["trigger"] == {"k": 4, "s": 0.5, "grid_rescale": 1, "noise_ratio": 2}
    assert cfg.attack("b")["trigger"] == {"alpha": 0.2, "pattern": "noise"}
    for name, module in (("a", "badnets"), ("b", "blended"), ("w", "wanet")):
        assert cfg.attack(name)["trigger"] == defaults_of(f"poisonflow.attacks.{module}")["trigger"]
    for name, module in (("x", "aabl"), ("f", "fine_pruning")):
        assert cfg.defense(name) == defaults_of(f"poisonflow.defenses.{module}")
    assert cfg.defense("f")["clean_fraction"] == 1.0  # the whole reserve


def test_jobs_are_the_cross_product():
    cfg = load(lambda c: c["experiments"][0].update(seed=[0, 1, 2]))
    assert [(j.attack, j.seed) for j in cfg.jobs()] == [("a", 0), ("a", 1), ("a", 2)]


@pytest.mark.parametrize("change, message", [
    (lambda c: c["attacks"]["a"].update(kind="badnetz"), r"^attacks\.a\.kind: unknown attack kind 'badnetz'"),
    (lambda c: c["defenses"]["n"].update(kind="nodefense"), r"^defenses\.n\.kind: unknown defense kind 'nodefense'"),
    (lambda c: c["attacks"]["a"].update(rate=0), r"^attacks\.a\.rate: 0 is less than or equal to the minimum"),
    (lambda c: c["attacks"]["a"].update(rate=1.5), r"^attacks\.a\.rate: 1\.5 is greater than the maximum of 1"),
    (lambda c: c["attacks"]["a"].update(target=10), r"^attacks\.a\.target: class 10 is outside dataset 'digits'"),
    (lambda c: c["attacks"]["a"].update(rate=0.95), r"^attacks\.a\.rate: 0\.95 asks for 1299 samples but dataset "
                                                    r"'digits' has only 1232 eligible \(dirty-label\)"),
    (lambda c: c["attacks"]["a"].update(label_mode="clean", rate=0.001),
     r"^attacks\.a\.rate: 0\.001 poisons no sample"),
    (lambda c: c["attacks"]["a"].update(selection="loss"), r"^attacks\.a\.surrogate: selection 'loss' needs"),
    (lambda c: c["attacks"]["a"].update(selection="loss", surrogate="nope"),
     r"^attacks\.a\.surrogate: no surrogates entry named 'nope'"),
    (lambda c: c["attacks"]["a"].update(trigger={"colour": "red"}), r"^attacks\.a\.trigger\.colour: unknown key \(known: margin, pattern"),
    (lambda c: c["attacks"]["a"].update(colour="red"), r"^attacks\.a\.colour: unknown key"),
    (lambda c: c["experiments"][0].update(defense=["n", "missing"]),
     r"^experiments\[0\]\.defense: no defenses entry named 'missing'"),
    (lambda c: c["trainings"]["t"].update(model="big"), r"^trainings\.t\.model: no models entry named 'big'"),
    (lambda c: c["models"]["m"].update(arch="vit"), r"^models\.m\.arch: unknown architecture 'vit'"),
    (lambda c: c["datasets"]["digits"].update(source="mnist"), r"^datasets\.digits\.source: unknown dataset source"),
    (lambda c: c["datasets"]["digits"].update(train_size=5000), r"^datasets\.digits\.train_size: 5000 is outside"),
    (lambda c: (c["datasets"].update(f={"source": "fashion-mnist", "root": "/no/such/dir"}),
                c["experiments"][0].update(dataset=["f"])),
     r"datasets\.f\.root.*/no/such/dir"),
])
def test_bad_input_names_the_key(change, message):
    with pytest.raises(PoisonflowError, match=message) as error:
        load(change)
    assert "\n" not in str(error.value)


def test_bad_config_stops_snakemake_before_any_job(tmp_path):
    bad = copy.deepcopy(BASE)
    bad["attacks"]["a"]["rate"] = 1.5
    write_config(tmp_path, bad)
    result = snakemake(tmp_path, "--dry-run", check=False)
    assert result.returncode != 0
    assert "attacks.a.rate: 1.5 is greater than the maximum of 1" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        config.load(tmp_path / "nope.yaml")
