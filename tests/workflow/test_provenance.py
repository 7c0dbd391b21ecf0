"""Provenance, integrity and sharing: the stages' outputs on tiny digits carry their config entry,
input digests, code hash, versions and device; models load without the workflow; `poisonflow
info` prints it all; `poisonflow verify` removes damaged outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from poisonflow.cli import main
from poisonflow.codehash import code_hash

CONFIG = {
    "evaluation": {"pgd": None},
    "datasets": {"digits": {"source": "digits", "image_size": 8}},
    "models": {"m": {"arch": "convnet", "width": 4}},
    "trainings": {"t": {"model": "m", "epochs": 1, "batch_size": 64, "augment": []}},
    "attacks": {"a": {"kind": "badnets"}},
    "defenses": {"n": {"kind": "none"}},
    "experiments": [{"dataset": ["digits"], "attack": ["a"], "training": ["t"], "defense": ["n"], "seed": [0]}],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """data → poison → victim → defense through the command line, as the rules call them."""
    from poisonflow.config import load

    cfg = load(json.loads(json.dumps(CONFIG)))
    root = tmp_path_factory.mktemp("provenance") / "results"
    clean, poisoned = root / "data/digits.zarr", root / "poison/digits/a/seed0.zarr"
    victim, defense = root / "victims/digits/a/t/seed0", root / "defenses/digits/a/t/seed0/n"
    spec = lambda value: json.dumps(value)  # noqa: E731
    assert main(["data", "--name", "digits", "--spec", spec(cfg.dataset("digits")), "--out", str(clean)]) == 0
    assert main(["poison", "--name", "a", "--spec", spec(cfg.attack("a")), "--seed", "0", "--clean", str(clean),
                 "--out", str(poisoned)]) == 0
    assert main(["victim", "--spec", spec(cfg.training("t")), "--evaluation", spec(cfg.evaluation()), "--seed", "0",
                 "--clean", str(clean), "--poison", str(poisoned), "--out-dir", str(victim)]) == 0
    assert main(["defense", "--name", "n", "--spec", spec(cfg.defense("n")), "--training", spec(cfg.training("t")),
                 "--evaluation", spec(cfg.evaluation()), "--seed", "0", "--clean", str(clean), "--poison",
                 str(poisoned), "--victim-dir", str(victim), "--out-dir", str(defense)]) == 0
    return root


@pytest.fixture
def copy_of(results, tmp_path):
    """A private copy of the results tree, for tests that damage it."""
    target = tmp_path / "results"
    shutil.copytree(results, target)
    return target


def store_attrs(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


def check_common(provenance: dict, stage: str, *modules: str) -> None:
    assert provenance["stage"] == stage
    assert provenance["code"] == {"hash": code_hash(*modules), "modules": list(modules)}
    versions = provenance["versions"]
    assert set(versions) >= {"poisonflow", "python", "torch", "torchvision", "zarr", "numpy"}
    import torch
    import zarr

    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0] and versions["zarr"] == zarr.__version__
    assert versions["numpy"] == np.__version__
    assert provenance["device"] == "cpu" and provenance["created"].endswith("Z")


def test_stores_record_entry_inputs_code_versions_and_device(results):
    clean = store_attrs(results / "data/digits.zarr")
    check_common(clean["provenance"], "data", "poisonflow.stages.data", "poisonflow.data.digits")
    assert clean["provenance"]["entry"]["source"] == "digits" and clean["provenance"]["inputs"] == []
    poisoned = store_attrs(results / "poison/digits/a/seed0.zarr")
    check_common(poisoned["provenance"], "poison", "poisonflow.stages.poison", "poisonflow.attacks.badnets")
    assert poisoned["provenance"]["entry"]["kind"] == "badnets" and poisoned["provenance"]["seed"] == 0
    # the input's id is its path and the digest recorded in it
    assert poisoned["provenance"]["inputs"] == [{"path": str(results / "data/digits.zarr"), "digest": clean["digest"]}]
    assert poisoned["timing"]["generation_seconds"] > 0 and "without process start-up" in poisoned["timing"]["measures"]


def test_metrics_and_models_record_provenance(results):
    from poisonflow.provenance import json_checksum

    victim = results / "victims/digits/a/t/seed0"
    metrics = json.loads((victim / "metrics.json").read_text())
    check_common(metrics["provenance"], "victim", "poisonflow.stages.victim")
    assert metrics["checksum"] == json_checksum(metrics) and 0 <= metrics["acc"] <= 1
    poison_digest = store_attrs(results / "poison/digits/a/seed0.zarr")["digest"]
    assert [i["digest"] for i in metrics["provenance"]["inputs"]][1] == poison_digest
    sidecar = json.loads((victim / "model.json").read_text())
    assert sidecar["spec"] == {"model": {"arch": "convnet", "width": 4}, "num_classes": 10, "image_size": 8}
    assert sidecar["provenance"] == metrics["provenance"]
    defense = json.loads((results / "defenses/digits/a/t/seed0/n/metrics.json").read_text())
    check_common(defense["provenance"], "defense", "poisonflow.stages.defense", "poisonflow.defenses.none")
    inputs = {Path(i["path"]).name: i["digest"] for i in defense["provenance"]["inputs"]}
    assert inputs["model.pt"] == sidecar["weights_digest"] and inputs["metrics.json"] == metrics["checksum"]


def test_a_victim_loads_and_runs_without_the_workflow(results, tmp_path):
    # a fresh interpreter, the two files only: the architecture comes from the sidecar
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("model.pt", "model.json"):
        shutil.copy(results / "victims/digits/a/t/seed0" / name, shared / name)
    script = ("import sys, torch; from poisonflow.modelio import load_model; m = load_model(sys.argv[1]); "
              "print(tuple(m(torch.zeros(2, 3, 8, 8)).shape), m.training)")
    out = subprocess.run([sys.executable, "-c", script, str(shared / "model.pt")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 10) False"


def test_damaged_weights_are_refused_with_the_path(copy_of):
    from poisonflow.errors import StoreError
    from poisonflow.modelio import load_model

    weights = copy_of / "victims/digits/a/t/seed0/model.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"^{weights}: model weights are damaged"):
        load_model(weights)


def test_info_prints_the_provenance_of_each_kind_of_artifact(results, capsys):
    store = results / "poison/digits/a/seed0.zarr"
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{store}\n  type        store (complete; ")
    for field in ("stage       poison (name a, seed 0)", "entry       {", "inputs      " + str(results / "data"),
                  "code hash   " + code_hash("poisonflow.stages.poison", "poisonflow.attacks.badnets"),
                  "versions    poisonflow ", "device      cpu", "generation  "):
        assert field in out, field
    victim = results / "victims/digits/a/t/seed0"
    assert main(["info", str(victim)]) == 0  # a folder: each artifact in it
    out = capsys.readouterr().out
    assert f"{victim / 'metrics.json'}\n  type        JSON (checksummed)\n  values      acc=" in out
    assert f"{victim / 'model.pt'}\n  type        model (weights-only .pt)\n  model       " in out
    assert main(["info", "--json", str(victim / "model.json")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["type"] == "model" and record["spec"]["num_classes"] == 10 and record["provenance"]["stage"] == "victim"
    assert main(["info", str(results / "nope")]) == 2
    assert capsys.readouterr().err == f"poisonflow info: error: {results / 'nope'}: does not exist\n"


def test_info_is_cheap(results):
    script = ("import sys; from poisonflow.cli import main; main(['info', sys.argv[1], sys.argv[2]]); "
              "assert 'torch' not in sys.modules and 'zarr' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", script, str(results / "poison/digits/a/seed0.zarr"),
                          str(results / "victims/digits/a/t/seed0")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_verify_passes_intact_results(results, capsys):
    assert main(["verify", str(results)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == (f"{results}: checked 2 stores, 2 models, 2 JSON files, 0 .npz files; "
                                            f"all intact")


def _flip(path: Path, offset: int = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_verify_removes_damaged_outputs_and_names_them(copy_of, capsys):
    poisoned = copy_of / "poison/digits/a/seed0.zarr"
    chunk = sorted(p for p in (poisoned / "train/images/c").rglob("*") if p.is_file())[0]
    _flip(chunk)
    victim = copy_of / "victims/digits/a/t/seed0"
    _flip(victim / "model.pt", offset=-64)
    metrics = copy_of / "defenses/digits/a/t/seed0/n/metrics.json"
    metrics.write_text(metrics.read_text().replace('"acc": 0.', '"acc": 1.', 1))  # an edited number
    stale = copy_of / "data" / ".digits.zarr.tmp-0123abcd"  # an old temporary without a pid
    stale.mkdir()
    import os

    os.utime(stale, (1, 1))
    assert main(["verify", "--dry-run", str(copy_of)]) == 1
    assert poisoned.exists() and stale.exists()
    capsys.readouterr()
    assert main(["verify", str(copy_of)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    removed = [line for line in lines if line.startswith("removed")]
    assert removed[0].startswith(f"removed  {metrics}: damaged (its content differs")
    assert removed[1].startswith(f"removed  {poisoned}: array 'train/images' is damaged")
    assert removed[2].startswith(f"removed  {victim / 'model.pt'} and {victim / 'model.json'}: ")
    assert removed[3] == f"removed  {stale}: temporary of a killed store writer"
    assert lines[-1].endswith("removed 3 damaged output(s): run snakemake to rebuild them")
    assert not poisoned.exists() and not (victim / "model.pt").exists() and not metrics.exists() and not stale.exists()
    assert (victim / "metrics.json").exists() and (copy_of / "data/digits.zarr").exists()
    assert main(["verify", str(copy_of)]) == 0  # what is left is intact
