"""Config validation: defaults, and one clear error naming the key for each kind of bad input."""

from __future__ import annotations

import copy
import json

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


# --- the malformed configs that used to be accepted: each is one line naming the key ----------------

def renamed(section, old, new, field):
    """Rename an entry and point the experiment at the new name."""
    def change(c):
        c[section][new] = c[section].pop(old)
        c["experiments"][0][field] = [new]
    return change


def use_model(model, size):
    def change(c):
        c["models"]["x"] = model
        c["trainings"]["t"]["model"] = "x"
        c["datasets"]["digits"]["image_size"] = size
    return change


MALFORMED = [
    ("trigger larger than the image", lambda c: c["attacks"]["a"].update(trigger={"size": 40}),
     r"^attacks\.a\.trigger\.size: a 40×40 patch does not fit a 32×32 image \(dataset 'digits'\)$"),
    ("trigger outside the image", lambda c: c["attacks"]["a"].update(trigger={"size": 3, "position": [30, 30]}),
     r"^attacks\.a\.trigger\.position: a 3×3 patch at \[30, 30\] does not fit a 32×32 image"),
    ("image size 4 for a convnet", lambda c: c["datasets"]["digits"].update(image_size=4),
     r"^datasets\.digits\.image_size: 4 px is too small for model 'm' \(convnet, used by trainings\.t\): "
     r"it needs at least 8 px"),
    ("image size 1024 for a convnet", lambda c: c["datasets"]["digits"].update(image_size=1024),
     r"^datasets\.digits\.image_size: 1024 px is too large for model 'm' \(convnet, used by trainings\.t\)"),
    ("a name with a space", renamed("attacks", "a", "bad name", "attack"),
     r"^attacks: entry name 'bad name' is not allowed: use letters, digits"),
    ("'..' as a name", renamed("attacks", "a", "..", "attack"), r"^attacks: entry name '\.\.' is not allowed"),
    ("a name with '..'", renamed("trainings", "t", "a..b", "training"), r"^trainings: entry name 'a\.\.b'"),
    ("a shell command in a name", renamed("datasets", "digits", "d$(touch X)", "dataset"),
     r"^datasets: entry name 'd\$\(touch X\)' is not allowed"),
    ("a name starting with '.'", renamed("defenses", "n", ".hidden", "defense"), r"^defenses: entry name '\.hidden'"),
    ("a cifar stem at 256 px", use_model({"arch": "resnet18", "width": 4, "stem": "cifar"}, 256),
     r"^datasets\.digits\.image_size: 256 px is too large for model 'x' \(resnet18, cifar stem.*stem: imagenet\)$"),
    ("an imagenet stem at 16 px", use_model({"arch": "resnet18", "width": 4, "stem": "imagenet"}, 16),
     r"^datasets\.digits\.image_size: 16 px is too small for model 'x' \(resnet18, imagenet stem.*at least 32 px"),
]


@pytest.mark.parametrize("change, message", [pytest.param(c, m, id=i) for i, c, m in MALFORMED])
def test_malformed_config_is_one_line_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message) as error:
        load(change)
    assert "\n" not in str(error.value)


def test_a_surrogates_model_is_checked_against_the_dataset_too():
    def change(c):
        c["models"]["big"] = {"arch": "resnet18", "width": 4, "stem": "imagenet"}
        c["trainings"]["s"] = {"model": "big"}
        c["surrogates"] = {"s": {"training": "s"}}
        c["attacks"]["a"].update(selection="loss", surrogate="s")
        c["datasets"]["digits"]["image_size"] = 16

    with pytest.raises(ConfigError, match=r"16 px is too small for model 'big' \(resnet18, imagenet stem, used by "
                                          r"trainings\.s\)"):
        load(change)


def test_good_names_and_sizes_pass():
    cfg = load(lambda c: (renamed("attacks", "a", "BadNets_3x3.v2-b", "attack")(c),
                          c["datasets"]["digits"].update(image_size=8)))
    assert [j.attack for j in cfg.jobs()] == ["BadNets_3x3.v2-b"]
    load(use_model({"arch": "resnet18", "width": 4}, 128))  # the ImageNet stem, chosen by size
    load(use_model({"arch": "vgg16", "width": 4}, 224))


def test_duplicate_key_in_a_config_file_names_key_and_lines(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("datasets:\n  digits: {source: digits}\nmodels:\n  m: {arch: convnet}\n"
                    "trainings:\n  t: {model: m, epochs: 2}\n  t: {model: m, epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:7: duplicate key 't' \(first on line 6; YAML would "
                                          r"silently keep only the later value\)$"):
        config.load(path)
    path.write_text("a: {x: 1, x: 2}\n")
    with pytest.raises(ConfigError, match=r":1: duplicate key 'x'"):
        config.read_yaml(path)


def test_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("base: &b {rate: 0.5, selection: random}\nloss: {<<: *b, selection: loss}\n")
    assert config.read_yaml(path)["loss"] == {"rate": 0.5, "selection": "loss"}


def test_workflow_section_is_checked():
    assert load().data["workflow"] == {"group_small_jobs": False, "resources": {}}
    with pytest.raises(ConfigError, match=r"^workflow\.resources\.victim\.mem_mb: 0 is less than the minimum"):
        load(lambda c: c.update(workflow={"resources": {"victim": {"mem_mb": 0}}}))
    with pytest.raises(ConfigError, match=r"^workflow\.groups: unknown key"):
        load(lambda c: c.update(workflow={"groups": 3}))


def test_resolved_entries_are_cached_copies():
    cfg = load()
    first = cfg.attack("a")
    first["rate"] = 0.9  # a caller's edit does not reach the cache
    assert cfg.attack("a")["rate"] == 0.1
    assert cfg.spec_json("attack", "a") is cfg.spec_json("attack", "a")
    assert json.loads(cfg.spec_json("training", "t")) == cfg.training("t")


def test_described_datasets_are_cached_on_disk(tmp_path, monkeypatch):
    cache = tmp_path / "describe.json"
    raw = copy.deepcopy(BASE)
    first = config.Config(copy.deepcopy(raw), describe_cache=cache).describe("digits")
    assert cache.is_file()
    from poisonflow import kinds

    def no_import(*args, **kwargs):
        raise AssertionError("the source was imported despite the cache")

    monkeypatch.setattr(kinds.SOURCES, "get", no_import)
    assert config.Config(copy.deepcopy(raw), describe_cache=cache).describe("digits") == first


@pytest.mark.parametrize("name, message", [
    ("d$(touch X)", "datasets: entry name 'd$(touch X)' is not allowed"),
    ("..", "datasets: entry name '..' is not allowed"),
])
def test_bad_names_stop_snakemake_with_one_line_before_any_job(tmp_path, name, message):
    bad = copy.deepcopy(BASE)
    renamed("datasets", "digits", name, "dataset")(bad)
    write_config(tmp_path, bad)
    result = snakemake(tmp_path, "--dry-run", check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "profile" not in line]
    assert lines == [f"config: {message}: use {config.NAME_RULE}"], result.stderr
    assert not (tmp_path / "X").exists() and not (tmp_path / "results").exists()


def test_duplicate_key_stops_snakemake_with_one_line(tmp_path):
    write_config(tmp_path, BASE)
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text + "threads: 1\nthreads: 2\n")
    result = snakemake(tmp_path, "--dry-run", check=False)
    assert result.returncode != 0
    assert "config: config.yaml:" in result.stderr and "duplicate key 'threads'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "results").exists()
