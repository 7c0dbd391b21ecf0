"""GPU slot allocation across processes, and which stages a source edit reaches."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
    assert {"poison.py", "selection.py", "store.py", "config.py"} <= poison
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
