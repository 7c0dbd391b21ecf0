"""The workflow end to end on a tiny digits config, what a rerun after each kind of edit runs, what a
run leaves behind (logs, report, lint), GPU limits and the warm process for small jobs."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from workflow_utils import REPO, environment, planned_jobs, snakemake, write_config

PGD = {"eps": 8 / 255, "step": 2 / 255, "steps": 2}
TINY = {
    "evaluation": {"pgd": PGD},
    "datasets": {"digits": {"source": "digits", "image_size": 16}},
    "models": {"tiny": {"arch": "convnet", "width": 8}},
    "trainings": {
        "fast": {"model": "tiny", "epochs": 8, "batch_size": 64, "augment": ["flip"],
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4}},
        "surr": {"model": "tiny", "epochs": 3, "batch_size": 64, "augment": []},
    },
    "surrogates": {"s": {"training": "surr", "score_epoch": 2}},
    "attacks": {
        "badnets": {"kind": "badnets", "target": 0, "label_mode": "dirty", "rate": 0.1,
                    "trigger": {"pattern": "checkerboard", "size": 3, "position": "bottom-right"}},
        "blended": {"kind": "blended", "target": 1, "rate": 0.1, "trigger": {"alpha": 0.2}},
        "hard": {"kind": "badnets", "target": 0, "label_mode": "clean", "rate": 0.5, "selection": "loss",
                 "surrogate": "s"},
    },
    "defenses": {
        "none": {"kind": "none"},
        "fp": {"kind": "fine-pruning", "ratio": 0.2, "finetune": {"epochs": 1}},
        "aabl": {"kind": "aabl", "stage1": {"epochs": 2}, "split": {"eps": 8 / 255},
                 "stage3": {"epochs": 1, "adversarial": PGD}},
    },
    "robustness": {"blur": {"kind": "blur", "levels": [1, 5]}},
    "experiments": [{"dataset": ["digits"], "attack": ["badnets", "blended", "hard"], "training": ["fast"],
                     "defense": ["none", "fp", "aabl"], "seed": [0], "robustness": ["blur"]}],
}
# The module's run (and every edit's dry run) groups small jobs into the warm process, as the default
# config does: about a minute less than a process per job; test_cold_processes_give_the_same_results
# runs part of it job by job.
GROUPED = {**TINY, "workflow": {"group_small_jobs": True}}
ATTACKS = ["badnets", "blended", "hard"]
DEFENSES = ["none", "fp", "aabl"]


def job(rule, **wildcards):
    return (rule, *sorted(f"{k}={v}" for k, v in wildcards.items()))


SPLITTING = {"aabl"}  # entries whose kind splits: their split is a job of its own


def robustness_jobs(attacks):
    """The robustness jobs (entry `blur`) of these attacks' victims."""
    return {job("robustness", dataset="digits", attack=a, training="fast", seed=0, robustness="blur") for a in attacks}


def defense_jobs(attacks, defenses):
    """The defense jobs (and the split jobs of the splitting ones); `none` (kind none) has none: the
    aggregate reads the victim's metrics."""
    return ({job("defense", dataset="digits", attack=a, training="fast", seed=0, defense=d)
             for a in attacks for d in defenses if d != "none"}
            | {job("split", dataset="digits", attack=a, training="fast", seed=0, defense=d)
               for a in attacks for d in defenses if d in SPLITTING})


WARM_SOCKETS = {}  # the module run's socket folder, checked by the warm-process test


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import tempfile
    from unittest import mock

    path = tmp_path_factory.mktemp("workflow")
    write_config(path, GROUPED)
    sockets = WARM_SOCKETS["dir"] = tempfile.mkdtemp(prefix="pfw", dir="/tmp")  # short: a Unix socket's path
    with mock.patch.dict(os.environ, {"XDG_RUNTIME_DIR": sockets, "POISONFLOW_WARM_IDLE": "60"}):
        snakemake(path)
    yield path
    shutil.rmtree(sockets, ignore_errors=True)


@pytest.fixture
def edit(workdir):
    """Edit the config for one dry run; the original is restored afterwards."""
    original = (workdir / "config.yaml").read_text()

    def apply(change):
        config = copy.deepcopy(GROUPED)
        change(config)
        write_config(workdir, config)

    yield apply
    (workdir / "config.yaml").write_text(original)


def test_outputs_and_backdoor_numbers(workdir):
    metrics = pd.read_csv(workdir / "results/metrics.csv")
    assert list(metrics.columns) == ["dataset", "attack", "training", "defense", "seed", "metric", "value"]
    assert set(metrics["attack"]) == set(ATTACKS) and set(metrics["defense"]) == set(DEFENSES)
    badnets = json.loads((workdir / "results/victims/digits/badnets/fast/seed0/metrics.json").read_text())
    assert badnets["asr"] > 0.9 and badnets["acc"] > 0.85, badnets
    # `none` is the victim as trained: its rows are the victim's metrics, and no job copied them
    assert not (workdir / "results/defenses/digits/badnets/fast/seed0/none").exists()
    rows = metrics[(metrics.attack == "badnets") & (metrics.defense == "none")].set_index("metric")["value"]
    assert rows["asr"] == pytest.approx(badnets["asr"]) and rows["acc"] == pytest.approx(badnets["acc"])
    assert 0 <= badnets["ra"] <= 1 - badnets["asr"] + 1e-9 and 0 <= badnets["pgd_acc"] <= badnets["acc"]
    aabl = json.loads((workdir / "results/defenses/digits/badnets/fast/seed0/aabl/metrics.json").read_text())
    assert 0 < aabl["gamma"] <= 1 and 0 <= aabl["rho_vul"] <= 1 and "pgd_acc" in aabl
    summary = (workdir / "results/tables/summary.md").read_text()
    assert "badnets" in summary and "±" in summary
    assert (workdir / "results/figures/summary.png").stat().st_size > 1000
    scores = pd.read_csv(workdir / "results/scores/digits/s.csv")
    assert list(scores.columns) == ["index", "label", "loss", "gradnorm", "forgetting"]
    # a blur of kernel 1 is no blur: the robustness job's first row is the victim's own evaluation
    blur = json.loads((workdir / "results/robustness/digits/badnets/fast/seed0/blur.json").read_text())
    assert [row["level"] for row in blur["rows"]] == [1, 5]
    assert blur["rows"][0]["acc"] == pytest.approx(badnets["acc"]) and blur["rows"][0]["asr"] == pytest.approx(badnets["asr"])
    assert "badnets" in (workdir / "results/report/robustness.md").read_text()
    assert (workdir / "results/report/robustness_digits_fast_blur.png").stat().st_size > 1000
    assert not (workdir / "results/victims/digits/badnets/fast/seed0/checkpoint.pt").exists()


def test_second_run_runs_nothing(workdir):
    assert planned_jobs(workdir) == set()


def test_every_job_leaves_a_log(workdir):
    logs = {p.relative_to(workdir / "results/logs").as_posix() for p in (workdir / "results/logs").rglob("*.log")}
    expected = {"data/digits.log", "surrogate/digits/s.log", "scores/digits/s.log", "aggregate/aggregate.log"}
    expected |= {f"poison/digits/{a}/seed0.log" for a in ATTACKS}
    expected |= {f"victim/digits/{a}/fast/seed0.log" for a in ATTACKS}
    expected |= {f"defense/digits/{a}/fast/seed0/{d}.log" for a in ATTACKS for d in DEFENSES if d != "none"}
    expected |= {f"split/digits/{a}/fast/seed0/{d}.log" for a in ATTACKS for d in DEFENSES if d in SPLITTING}
    expected |= {f"robustness/digits/{a}/fast/seed0/blur.log" for a in ATTACKS}
    assert logs == expected
    victim = (workdir / "results/logs/victim/digits/badnets/fast/seed0.log").read_text()
    assert "results/victims/digits/badnets/fast/seed0: acc=" in victim


def test_failed_job_prints_its_log(tmp_path):
    write_config(tmp_path, TINY)
    (tmp_path / "results/data/digits.zarr").mkdir(parents=True)  # not a store: the poison job fails reading it
    (tmp_path / "results/data/digits.zarr/placeholder").write_text("")
    snakemake(tmp_path, "--touch", "results/data/digits.zarr")
    result = snakemake(tmp_path, "results/poison/digits/badnets/seed0.zarr", check=False)
    assert result.returncode != 0
    log = tmp_path / "results/logs/poison/digits/badnets/seed0.log"
    assert log.is_file() and "poisonflow poison: error:" in log.read_text()
    assert "poisonflow poison: error:" in result.stdout + result.stderr  # --show-failed-logs (the profile)


def test_report_shows_the_summary(workdir, tmp_path):
    report = tmp_path / "report.html"
    snakemake(workdir, "--report", str(report))
    html = report.read_text()
    assert report.stat().st_size > 100_000
    for shown in ("summary.png", "summary.csv", "metrics.csv", "Summary", "Paper views", "mean and std over seeds"):
        assert shown in html, shown


def test_lint_finds_only_the_explained_finding(tmp_path):
    write_config(tmp_path, TINY)
    result = snakemake(tmp_path, "--lint", check=False)
    findings = re.findall(r"^Lints for (?:rule (\S+)|snakefile (\S+)).*?:\n((?:    \*.*\n|      .*\n)+)",
                          result.stdout + result.stderr, flags=re.MULTILINE)
    for rule, snakefile, body in findings:
        if (snakefile or "").endswith("triggers.smk") or rule == "trigger":
            continue  # the trigger stage's rule file has its own owner
        titles = re.findall(r"^    \* (.*):$", body, flags=re.MULTILINE)
        # explained in the Snakefile's header comment
        assert titles == ["Specify a conda environment or container for each rule."], (rule or snakefile, titles)


def test_attack_edit_reruns_only_that_attack(workdir, edit):
    edit(lambda c: c["attacks"]["badnets"].update(rate=0.15))
    expected = {job("poison", dataset="digits", attack="badnets", seed=0),
                job("victim", dataset="digits", attack="badnets", training="fast", seed=0),
                job("aggregate")} | defense_jobs(["badnets"], DEFENSES) | robustness_jobs(["badnets"])
    assert planned_jobs(workdir) == expected


def test_robustness_edit_reruns_only_the_robustness_jobs(workdir, edit):
    edit(lambda c: c["robustness"]["blur"].update(levels=[1, 3]))
    assert planned_jobs(workdir) == robustness_jobs(ATTACKS) | {job("aggregate")}


def test_defense_edit_reruns_only_that_defense(workdir, edit):
    edit(lambda c: c["defenses"]["fp"].update(ratio=0.3))
    assert planned_jobs(workdir) == defense_jobs(ATTACKS, ["fp"]) | {job("aggregate")}


def test_surrogate_edit_reruns_scores_and_hard_selection_only(workdir, edit):
    edit(lambda c: c["surrogates"]["s"].update(score_epoch=3))
    expected = {job("surrogate", dataset="digits", surrogate="s"), job("scores", dataset="digits", surrogate="s"),
                job("poison", dataset="digits", attack="hard", seed=0),
                job("victim", dataset="digits", attack="hard", training="fast", seed=0),
                job("aggregate")} | defense_jobs(["hard"], DEFENSES) | robustness_jobs(["hard"])
    assert planned_jobs(workdir) == expected


def test_new_seed_adds_only_its_jobs(workdir, edit):
    edit(lambda c: c["experiments"].append({"dataset": ["digits"], "attack": ["blended"], "training": ["fast"],
                                            "defense": ["none"], "seed": [7]}))
    expected = {job("poison", dataset="digits", attack="blended", seed=7),
                job("victim", dataset="digits", attack="blended", training="fast", seed=7),
                job("aggregate")}  # no defense job: `none` is the victim
    assert planned_jobs(workdir) == expected


@pytest.fixture
def source_edit():
    """Append a comment to a module of the package for one dry run; restored afterwards."""
    edited = {}

    def apply(relative):
        path = REPO / "src" / "poisonflow" / relative
        edited[path] = path.read_bytes()
        path.write_bytes(edited[path] + b"\n# edited by a test\n")

    yield apply
    for path, content in edited.items():
        path.write_bytes(content)


def test_defense_source_edit_reruns_that_defense(workdir, source_edit):
    source_edit("defenses/fine_pruning.py")
    assert planned_jobs(workdir) == defense_jobs(ATTACKS, ["fp"]) | {job("aggregate")}


def test_poison_stage_source_edit_reruns_downstream_not_upstream(workdir, source_edit):
    source_edit("stages/poison.py")
    expected = ({job("poison", dataset="digits", attack=a, seed=0) for a in ATTACKS}
                | {job("victim", dataset="digits", attack=a, training="fast", seed=0) for a in ATTACKS}
                | defense_jobs(ATTACKS, DEFENSES) | robustness_jobs(ATTACKS) | {job("aggregate")})
    assert planned_jobs(workdir) == expected


def test_trigger_source_edit_reruns_only_attacks_that_use_it(workdir, source_edit):
    source_edit("attacks/blended.py")
    expected = {job("poison", dataset="digits", attack="blended", seed=0),
                job("victim", dataset="digits", attack="blended", training="fast", seed=0),
                job("aggregate")} | defense_jobs(["blended"], DEFENSES) | robustness_jobs(["blended"])
    assert planned_jobs(workdir) == expected


def test_deleted_store_chunk_is_refused_by_the_next_stage(workdir, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(workdir / "results/poison/digits/badnets/seed0.zarr", copy_dir / "p.zarr")
    chunks = sorted(p for p in (copy_dir / "p.zarr/train/images/c").rglob("*") if p.is_file())
    chunks[0].unlink()
    from poisonflow.cli import main

    code = main(["victim", "--spec", json.dumps({"model": {"arch": "convnet", "width": 4}}), "--evaluation", "{}",
                 "--seed", "0", "--clean", str(workdir / "results/data/digits.zarr"), "--poison",
                 str(copy_dir / "p.zarr"), "--out-dir", str(tmp_path / "v")])
    assert code == 2 and not (tmp_path / "v/metrics.json").exists()


def test_killed_workflow_resumes_training_on_rerun(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from workflow_utils import environment

    config = copy.deepcopy(TINY)
    config["trainings"]["fast"]["epochs"] = 12
    config["experiments"] = [{"dataset": ["digits"], "attack": ["badnets"], "training": ["fast"],
                              "defense": ["none"], "seed": [0]}]
    write_config(tmp_path, config)
    victim = tmp_path / "results/victims/digits/badnets/fast/seed0"
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "1"]
    process = subprocess.Popen(command, env=environment(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (victim / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job tree, as a crash or a cluster preemption would
    process.wait()
    assert (victim / "checkpoint.pt").exists() and not (victim / "metrics.json").exists()

    snakemake(tmp_path, "--unlock")  # a hard kill leaves Snakemake's directory lock behind
    snakemake(tmp_path)
    log = tmp_path / "results/logs/victim/digits/badnets/fast/seed0.log"
    assert "victim: resuming from" in log.read_text()
    metrics = json.loads((victim / "metrics.json").read_text())
    assert metrics["asr"] > 0.9 and not (victim / "checkpoint.pt").exists()
    assert planned_jobs(tmp_path) == set()


def trace_concurrency(trace) -> int:
    """The most GPU jobs that were running at once, from the allocator's trace (asked … released)."""
    events = []
    for line in trace.read_text().splitlines():
        _, _, asked, _, released = line.split("\t")
        events += [(float(asked), 1), (float(released), -1)]
    running = most = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        most = max(most, running)
    return most


@pytest.fixture
def short_tmp():
    """A folder with a short path for the warm process's socket (Unix sockets: about 100 bytes)."""
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="pfw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_gpu_jobs_never_outnumber_the_gpus(tmp_path, short_tmp):
    """The README's plain `snakemake --cores N` on a machine with 2 GPUs (faked): Snakemake itself
    starts at most 2 GPU jobs at once, so none waits on a lock file."""
    config = copy.deepcopy(TINY)
    config["trainings"]["fast"]["epochs"] = 1
    config["experiments"] = [{"dataset": ["digits"], "attack": ["badnets"], "training": ["fast"],
                              "defense": ["none"], "seed": [0, 1, 2, 3]}]
    config["workflow"] = {"group_small_jobs": True}  # one torch import for all the jobs: a fast test
    write_config(tmp_path, config)
    trace = tmp_path / "trace.tsv"
    env = {**environment(), "POISONFLOW_GPUS": "2", "POISONFLOW_GPU_TRACE": str(trace),
           "POISONFLOW_GPU_LOCKS": str(tmp_path / "locks"), "XDG_RUNTIME_DIR": str(short_tmp)}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "6"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"Provided resources: .*gpu=(Resource\(\"gpu\", )?2\b", result.stdout + result.stderr)
    assert len(trace.read_text().splitlines()) == 8  # 4 poison + 4 victim jobs
    assert trace_concurrency(trace) <= 2
    waiting = [p for p in (tmp_path / "results/logs").rglob("*.log") if "waiting for a free GPU" in p.read_text()]
    assert waiting == []


def test_cold_processes_give_the_same_results(workdir, tmp_path):
    """`group_small_jobs` (the module's run) runs every job in a fork of one process that imported
    torch once: the same outputs, logs and caching as a process per job (this run)."""
    from pathlib import Path

    config = copy.deepcopy(TINY)  # no workflow.group_small_jobs
    config["experiments"] = [{"dataset": ["digits"], "attack": ["badnets"], "training": ["fast"],
                              "defense": ["none", "fp"], "seed": [0]}]
    write_config(tmp_path, config)
    snakemake(tmp_path, "results/defenses/digits/badnets/fast/seed0/fp/metrics.json")  # and the victim; no aggregate
    for path in ("victims/digits/badnets/fast/seed0/metrics.json", "defenses/digits/badnets/fast/seed0/fp/metrics.json"):
        cold = json.loads((tmp_path / "results" / path).read_text())
        warm = json.loads((workdir / "results" / path).read_text())
        for key in ("acc", "asr", "ra", "pgd_acc"):
            assert warm[key] == pytest.approx(cold[key]), (path, key)
    assert "results/victims/digits/badnets/fast/seed0: acc=" in (
        workdir / "results/logs/victim/digits/badnets/fast/seed0.log").read_text()
    assert list(Path(WARM_SOCKETS["dir"]).glob("poisonflow-warm-*.sock")) == []  # stopped at the end of the run
