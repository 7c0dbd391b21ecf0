"""`poisonflow verify` and Snakemake together: a damaged store is removed, and the next run plans
exactly the job that writes it again (dry runs only; the stores are written by the stages)."""

from __future__ import annotations

import json

import workflow_utils
from workflow_utils import planned_jobs, write_config

from poisonflow.cli import main

CONFIG = {
    "evaluation": {"pgd": None},
    "datasets": {"digits": {"source": "digits", "image_size": 8}},
    "models": {"m": {"arch": "convnet", "width": 4}},
    "trainings": {"t": {"model": "m", "epochs": 1, "batch_size": 64, "augment": []}},
    "attacks": {"a": {"kind": "badnets"}},
    "defenses": {"n": {"kind": "none"}},
    "experiments": [{"dataset": ["digits"], "attack": ["a"], "training": ["t"], "defense": ["n"], "seed": [0]}],
}


def test_verify_removes_a_damaged_store_and_snakemake_plans_its_job_again(tmp_path, capsys, monkeypatch):
    from poisonflow.config import load

    target = "results/poison/digits/a/seed0.zarr"
    dry_run = workflow_utils.snakemake  # planned_jobs' dry run, for this one target
    monkeypatch.setattr(workflow_utils, "snakemake", lambda workdir, *args, **kw: dry_run(workdir, *args, target, **kw))

    write_config(tmp_path, CONFIG)
    cfg = load(json.loads(json.dumps(CONFIG)))
    clean, poisoned = tmp_path / "results/data/digits.zarr", tmp_path / "results/poison/digits/a/seed0.zarr"
    assert main(["data", "--name", "digits", "--spec", json.dumps(cfg.dataset("digits")), "--out", str(clean)]) == 0
    assert main(["poison", "--name", "a", "--spec", json.dumps(cfg.attack("a")), "--seed", "0",
                 "--clean", str(clean), "--out", str(poisoned)]) == 0
    assert planned_jobs(tmp_path) == set()  # both stores present: nothing to do

    chunk = sorted(p for p in (poisoned / "train/images/c").rglob("*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    chunk.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "results")]) == 1
    out = capsys.readouterr().out
    assert f"removed  {poisoned}: array 'train/images' is damaged" in out
    assert not poisoned.exists() and clean.exists()
    assert planned_jobs(tmp_path) == {("poison", "attack=a", "dataset=digits", "seed=0")}

