"""How many GPUs there are, and a lock-file slot allocator for GPU jobs.

The Snakefile sets Snakemake's ``gpu`` resource to :func:`gpu_count` (found without importing
torch), so no more GPU jobs start than there are GPUs. A job calls :func:`claim_gpu` before torch
is imported: it takes the first free slot among the visible GPUs by an exclusive ``flock`` on
``<lock_dir>/gpu<k>.lock`` (held until the process exits, so a crash frees it) and sets
``CUDA_VISIBLE_DEVICES`` to that slot's device. The locks also keep two workflows (or a workflow
and a notebook) on the same machine from sharing a GPU: a job waits for a slot, and after
``timeout`` says so in one line and exits with status 2.

``POISONFLOW_GPUS=N`` overrides the detection: the first N visible GPUs (fake ids 0..N-1 where
fewer are found, for tests on a machine without one); ``POISONFLOW_GPUS=0`` runs everything on
the CPU. ``POISONFLOW_GPU_TRACE=<file>`` appends one line per claim (pid, slot, the times the job
asked, got and released it) for checks of the allocation.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

_held = []  # open lock files, kept for the life of the process

ENV_COUNT = "POISONFLOW_GPUS"
ENV_TRACE = "POISONFLOW_GPU_TRACE"


def _detected() -> list[str]:
    """GPU ids the driver shows this process: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``,
    else the driver's ``/proc/driver/nvidia/gpus`` entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",") if d.strip() != ""]
        return [] if ids and ids[0] in ("-1", "NoDevFiles") else ids
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return [str(i) for i, line in enumerate(l for l in out.stdout.splitlines() if l.startswith("GPU "))]
    except (OSError, subprocess.TimeoutExpired):
        pass
    proc = Path("/proc/driver/nvidia/gpus")
    try:
        return [str(i) for i in range(len(list(proc.iterdir())))] if proc.is_dir() else []
    except OSError:
        return []


def visible_gpus() -> list[str]:
    """GPU ids this process may use (see the module doc for ``POISONFLOW_GPUS``)."""
    found = _detected()
    override = os.environ.get(ENV_COUNT, "").strip()
    if override:
        try:
            count = int(override)
        except ValueError:
            raise ValueError(f"{ENV_COUNT}={override!r}: expected a number of GPUs") from None
        return found[:count] if len(found) >= count else [str(i) for i in range(max(count, 0))]
    return found


def gpu_count() -> int:
    """Number of GPUs jobs on this machine may use (no torch import: the Snakefile calls this)."""
    return len(visible_gpus())


def default_lock_dir() -> Path:
    """Per-machine lock directory; under Slurm, per job (Slurm already gives each job its own GPUs,
    and a lock directory on a shared home would make jobs on different nodes wait for each other)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return Path(os.environ.get("TMPDIR", "/tmp")) / f"poisonflow-gpu-locks-{job}"
    return Path.home() / ".cache" / "poisonflow" / "gpu-locks"


def _trace(gpu: str, asked: float, got: float) -> None:
    path = os.environ.get(ENV_TRACE)
    if not path:
        return

    def released() -> None:
        with open(path, "a") as handle:
            handle.write(f"{os.getpid()}\t{gpu}\t{asked:.6f}\t{got:.6f}\t{time.time():.6f}\n")

    atexit.register(released)


class NoFreeGpu(SystemExit):
    """No slot came free in time (a SystemExit with status 2: the CLI prints no traceback; the one
    line saying why is on stderr already, and in ``message``)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def claim_gpu(lock_dir: str | os.PathLike | None = None, gpus: list[str] | None = None,
              timeout: float = 3600.0, poll: float = 0.5) -> str | None:
    """Hold a free GPU slot and pin this process to it; ``None`` when there is no GPU."""
    asked = time.time()
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return None
    lock_dir = Path(lock_dir or os.environ.get("POISONFLOW_GPU_LOCKS") or default_lock_dir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        for gpu in gpus:
            handle = open(lock_dir / f"gpu{gpu}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held.append(handle)
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            _trace(gpu, asked, time.time())
            return gpu
        if not waiting:
            waiting = True
            print(f"poisonflow: waiting for a free GPU: all {len(gpus)} slots in {lock_dir} are held "
                  f"(another workflow or process on this machine?)", file=sys.stderr, flush=True)
        if time.monotonic() > deadline:
            message = (f"poisonflow: error: no free GPU among {', '.join(gpus)} after {timeout:.0f} s (lock files in "
                       f"{lock_dir}, held by {_holders(lock_dir, gpus)}); run fewer GPU jobs at once "
                       f"(snakemake --resources gpu=N) or free a GPU")
            print(message, file=sys.stderr, flush=True)
            raise NoFreeGpu(message)
        time.sleep(poll)


def _holders(lock_dir: Path, gpus: list[str]) -> str:
    pids = []
    for gpu in gpus:
        try:
            pids.append((lock_dir / f"gpu{gpu}.lock").read_text().strip() or "?")
        except OSError:
            pids.append("?")
    return "pids " + ", ".join(pids)


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
