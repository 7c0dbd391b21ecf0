"""What the rules ask of the config (workflow_helpers.Plan), progress bars in log files, the warm
process for small jobs, and the aggregate reading a victim's metrics for a defense of kind none."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

BASE = {
    "datasets": {"digits": {"source": "digits", "image_size": 16}},
    "models": {"m": {"arch": "convnet", "width": 4}},
    "trainings": {"t": {"model": "m"}},
    "surrogates": {"s": {"training": "t"}},
    "attacks": {"a": {"kind": "badnets"}, "hard": {"kind": "badnets", "label_mode": "clean", "rate": 0.5,
                                                   "selection": "loss", "surrogate": "s"}},
    "defenses": {"n": {"kind": "none"}, "fp": {"kind": "fine-pruning"}},
    "experiments": [{"dataset": ["digits"], "attack": ["a", "hard"], "training": ["t"], "defense": ["n", "fp"],
                     "seed": [0, 1]}],
}


def plan(change=None):
    from poisonflow.config import Config
    from poisonflow.workflow_helpers import Plan

    raw = copy.deepcopy(BASE)
    if change:
        change(raw)
    return Plan(Config(raw))


def test_defense_none_reads_the_victims_metrics():
    p = plan()
    assert all("/n/" not in path for path in p.defense_metrics())
    assert len(p.defense_metrics()) == 4  # 2 attacks × 2 seeds × fp
    assert p.undefended_metrics() == [f"results/victims/digits/{a}/t/seed{s}/metrics.json"
                                      for a in ("a", "hard") for s in (0, 1)]
    assert p.undefended_pairs()[0] == "n=results/victims/digits/a/t/seed0/metrics.json"
    assert p.defense_wildcard() == "fp"


def test_specs_and_code_hashes_are_cached_per_name():
    p = plan()
    w = SimpleNamespace(attack="hard", defense="fp", dataset="digits")
    spec = p.spec("attack")
    assert spec(w) is spec(w) and json.loads(spec(w))["surrogate_entry"]["training"]["model"]["arch"] == "convnet"
    code = p.code("defense", "defense")
    assert code(w) == code(w) and len(code(w)) == 16
    assert p.code("defense", "defense")(SimpleNamespace(defense="n")) != code(w)  # another kind's module


def test_poison_options_are_one_shell_word_each():
    p = plan()
    inputs = p.poison_inputs(SimpleNamespace(dataset="digits", attack="hard"))
    assert inputs == {"clean": "results/data/digits.zarr", "surrogate": "results/surrogates/digits/s/model.pt",
                      "scores": "results/scores/digits/s.csv"}

    class Input(dict):
        def __getattr__(self, name):
            return self[name]

    assert p.poison_options(None, Input(inputs)) == ["--scores", "results/scores/digits/s.csv",
                                                     "--surrogate-dir", "results/surrogates/digits/s"]


def test_memory_scales_with_the_dataset_and_the_config_overrides_it(monkeypatch):
    monkeypatch.setenv("POISONFLOW_GPUS", "0")
    from poisonflow.workflow_helpers import MEMORY

    p = plan()
    w = SimpleNamespace(dataset="digits")
    victim = p.mem_mb("victim")
    assert MEMORY["victim"][0] <= victim(w, 1) <= 2048  # digits: 1.4 GiB measured
    assert victim(w, 2) > victim(w, 1)  # a retry asks more
    assert p.mem_mb("aggregate")(SimpleNamespace(), 1) == 512
    p = plan(lambda c: c.update(workflow={"resources": {"victim": {"mem_mb": 999, "runtime": 5}}}))
    assert p.mem_mb("victim")(w, 1) == 999 and p.runtime("victim") == 5 and p.runtime("poison") == 240


def test_grouping_is_asked_for_in_the_config():
    p = plan()
    assert p.group("victim") is None and p.command == "poisonflow"
    p = plan(lambda c: c.update(workflow={"group_small_jobs": 8}))
    assert p.group("victim") == "victim-jobs" and p.group_size == 8 and "-m poisonflow.warm" in p.command


# --- progress bars ---------------------------------------------------------------------------------

def test_progress_bar_in_a_log_file_is_plain_timed_lines(monkeypatch):
    from poisonflow.progress import bar

    monkeypatch.setenv("POISONFLOW_PROGRESS_INTERVAL", "3600")
    log = io.StringIO()
    progress = bar(range(100), desc="victim", unit="epoch", file=log, leave=False)
    for i in progress:
        progress.set_postfix(loss=1.0 / (i + 1))  # per step: must not write a line each
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("victim: 0/100 epoch") and lines[-1].startswith("victim: 100/100 epoch")
    assert len(lines) <= 3


def test_progress_bar_on_a_terminal_is_tqdm():
    from tqdm.std import tqdm

    from poisonflow import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    with progress.bar(total=3, desc="x", file=out) as b:
        b.update(3)
    assert isinstance(b, tqdm) and not isinstance(b, progress.PlainBar) and "\r" in out.getvalue()


# --- the warm process ------------------------------------------------------------------------------

@pytest.fixture
def short_tmp():
    """A folder with a short path: a Unix socket's path is limited to about 100 bytes."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="pfw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_warm_process_runs_the_command_with_its_streams_and_status(short_tmp):
    tmp_path = short_tmp
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), "POISONFLOW_WARM_IDLE": "60"}
    run = [sys.executable, "-m", "poisonflow.warm"]
    try:
        ok = subprocess.run([*run, "data", "--help"], capture_output=True, text=True, env=env, timeout=600)
        assert ok.returncode == 0 and "usage: poisonflow data" in ok.stdout, ok.stderr
        bad = subprocess.run([*run, "aggregate", "--metrics", "x.json", "--experiment", "{"], capture_output=True,
                             text=True, env=env, timeout=600)
        assert bad.returncode == 2 and bad.stderr.strip().startswith("poisonflow aggregate: error:"), bad.stderr
        assert "Traceback" not in bad.stderr
        sockets = list(tmp_path.glob("poisonflow-warm-*.sock"))
        assert len(sockets) == 1  # one server served both
    finally:
        subprocess.run([*run, "--stop"], env=env, timeout=60)


# --- the aggregate reads a victim's metrics for a `none` defense -------------------------------------

def test_aggregate_takes_victim_metrics_for_a_none_defense(tmp_path):
    from poisonflow.stages import aggregate

    results = tmp_path / "results"
    victim = results / "victims/digits/badnets/t/seed0/metrics.json"
    victim.parent.mkdir(parents=True)
    victim.write_text(json.dumps({"acc": 0.9, "asr": 1.0, "train_seconds": 3.0}))
    table = aggregate.tidy(aggregate.undefended([f"none={victim}"]), results)
    assert set(table["defense"]) == {"none"} and set(table["metric"]) == {"acc", "asr"}
    assert table[table.metric == "acc"]["value"].item() == pytest.approx(0.9)
