"""GPU slot allocation across processes, and which stages a source edit reaches."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from poisonflow.codehash import module_closure


def test_concurrent_jobs_never_share_a_slot(tmp_path):
    # 6 jobs on 3 fake GPUs: each holds its slot while recording the time it ran on it
    script = textwrap.dedent(f"""
        import os, sys, time
        from poisonflow.devices import claim_gpu
        gpu = claim_gpu({str(tmp_path / 'locks')!r}, gpus=["0", "1", "2"], timeout=60, poll=0.05)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == gpu
        start = time.time(); time.sleep(0.4); end = time.time()
        print(gpu, start, end)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(6)]
    spans = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        gpu, start, end = out.split()
        spans.append((gpu, float(start), float(end)))
    for i, (gpu_a, start_a, end_a) in enumerate(spans):
        for gpu_b, start_b, end_b in spans[i + 1:]:
            if gpu_a == gpu_b:
                assert end_a <= start_b or end_b <= start_a, "two jobs held the same GPU at once"
    assert {gpu for gpu, _, _ in spans} == {"0", "1", "2"}


def test_no_gpu_means_no_claim(tmp_path):
    from poisonflow.devices import claim_gpu

    assert claim_gpu(tmp_path, gpus=[]) is None


def test_stage_closures_cover_what_they_run_and_nothing_upstream():
    poison = {p.name for p in module_closure("poisonflow.stages.poison")}
    assert {"poison.py", "selection.py", "store.py"} <= poison
    assert "badnets.py" not in poison  # attack kinds are added per job
    victim = {p.name for p in module_closure("poisonflow.stages.victim")}
    assert {"trainer.py", "models.py", "evaluate.py", "augment.py"} <= victim
    assert "selection.py" not in victim and "scores.py" not in victim
    data = {p.name for p in module_closure("poisonflow.stages.data")}
    assert "trainer.py" not in data and "models.py" not in data


def test_slurm_jobs_lock_per_job(monkeypatch, tmp_path):
    from poisonflow.devices import default_lock_dir

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert default_lock_dir().parts[-2:] == ("poisonflow", "gpu-locks")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert default_lock_dir() == tmp_path / "poisonflow-gpu-locks-4242"


def test_gpu_count_without_torch(monkeypatch):
    from poisonflow import devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    monkeypatch.delenv("POISONFLOW_GPUS", raising=False)
    assert devices.visible_gpus() == ["0", "2"] and devices.gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.gpu_count() == 0
    monkeypatch.setenv("POISONFLOW_GPUS", "3")  # more than there are: fake ids, for tests
    assert devices.visible_gpus() == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert devices.visible_gpus() == ["4", "5", "6"]  # the first N of those visible
    monkeypatch.setenv("POISONFLOW_GPUS", "0")
    assert devices.gpu_count() == 0
    out = subprocess.run([sys.executable, "-c", "import sys; from poisonflow.devices import gpu_count; gpu_count();"
                          "print('torch' in sys.modules)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class FakeResources(dict):
    def get(self, name):
        class R:
            value = dict.get(self, name)
        return R()


class FakeWorkflow:
    def __init__(self, given=None, nodes=None):
        self.global_resources = FakeResources(_nodes=nodes)
        if given is not None:
            self.global_resources["gpu"] = given
        self.remote_exec = False


@pytest.mark.parametrize("gpus, given, nodes, expected", [
    ("2", None, None, 2),    # the plain `snakemake --cores all`: one job per GPU
    ("2", 8, None, 2),       # --resources gpu=8 on a 2-GPU machine: still 2
    ("4", 1, None, 1),       # --resources gpu=1 lowers it
    ("0", None, None, None),  # no GPU: nothing limited, jobs run on the CPU
    ("2", None, 100, None),  # a cluster (--jobs with an executor): its scheduler hands out GPUs
])
def test_gpu_resource_follows_the_gpus(monkeypatch, gpus, given, nodes, expected):
    from poisonflow.workflow_helpers import limit_gpus

    monkeypatch.setenv("POISONFLOW_GPUS", gpus)
    workflow = FakeWorkflow(given, nodes)
    assert limit_gpus(workflow) == expected
    if expected is not None:
        assert workflow.global_resources["gpu"] == expected


def test_a_job_without_a_free_gpu_says_so_in_one_line(tmp_path):
    import fcntl

    locks = tmp_path / "locks"
    locks.mkdir()
    held = open(locks / "gpu0.lock", "a+")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    script = (f"from poisonflow.devices import claim_gpu; "
              f"claim_gpu({str(locks)!r}, gpus=['0'], timeout=0.3, poll=0.05)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    held.close()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "no free GPU among 0 after 0 s" in error_lines[0], result.stderr


def test_claims_are_traced(tmp_path, monkeypatch):
    trace = tmp_path / "trace.tsv"
    script = textwrap.dedent(f"""
        import os
        os.environ["POISONFLOW_GPU_TRACE"] = {str(trace)!r}
        from poisonflow.devices import claim_gpu
        claim_gpu({str(tmp_path / 'locks')!r}, gpus=["0", "1"])
    """)
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    rows = [line.split("\t") for line in trace.read_text().splitlines()]
    assert len(rows) == 2 and all(float(r[2]) <= float(r[3]) <= float(r[4]) for r in rows)


def test_code_hash_is_computed_once_per_module_set():
    from poisonflow import codehash

    first = codehash.code_hash("poisonflow.stages.victim", "poisonflow.attacks.badnets")
    again = codehash.code_hash("poisonflow.attacks.badnets", "poisonflow.stages.victim")
    assert first == again and codehash._hash.cache_info().hits >= 1
    # the same value as hashing the files afresh
    import hashlib

    digest = hashlib.sha256()
    files = sorted({p for m in ("poisonflow.stages.victim", "poisonflow.attacks.badnets")
                    for p in codehash.module_closure(m)})
    for path in files:
        digest.update(str(path.relative_to(codehash.ROOT)).encode())
        digest.update(path.read_bytes())
    assert first == digest.hexdigest()[:16]


def test_import_scan_matches_a_full_parse():
    """The closures come from the import statements found by a pattern, not a parse of each file:
    they must be exactly what the AST of every module says."""
    import ast

    from poisonflow import codehash

    for path in sorted(codehash.ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        expected = {n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))}
        found = list(codehash._statements(path.read_text()))
        assert len(found) >= len(expected), path
