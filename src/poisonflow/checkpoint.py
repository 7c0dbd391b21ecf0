"""Checkpoints: how every stage and kind saves its progress and resumes a killed job.

A checkpoint is a dict of tensors and plain values (numbers, strings, lists, dicts) stored with the
digest of the job that wrote it (:mod:`poisonflow.fingerprint`: its settings, data, seed and any
model it starts from or reads). It is read back with ``torch.load(weights_only=True)``, which
rebuilds only such values and never runs code from the file; a file that does not load that way,
or that carries another job's digest, is ignored and the job starts over. Writes go to a temporary
file that then replaces the checkpoint, so a kill mid-write leaves the previous one intact.

Store numpy arrays as tensors and a generator's state as its byte tensor: anything else would need
the unsafe unpickler.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file next to ``path``, then move it into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(path: str | os.PathLike, digest: str, state: dict) -> None:
    """Write ``state`` with ``digest`` atomically."""
    atomic_write(path, lambda tmp: torch.save({**state, "digest": digest}, tmp))


def load(path: str | os.PathLike | None, digest: str) -> dict | None:
    """The state saved at ``path`` for ``digest``, on the CPU; None when there is none to resume.

    Loaded on the CPU whatever the training device: generator states must be CPU tensors, and
    ``load_state_dict`` of models and optimizers moves values to their parameters' device.
    """
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unsafe pickle, a truncated or foreign file: all mean "start over"
        print(f"{path}: ignoring a checkpoint that does not load safely ({type(error).__name__})", file=sys.stderr)
        return None
    if not isinstance(state, dict) or state.get("digest") != digest:
        return None
    return state


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint path bound to its job's digest; without a path, loading finds nothing and saving does nothing."""
    path: Path | None
    digest: str

    def load(self) -> dict | None:
        return load(self.path, self.digest)

    def save(self, state: dict) -> None:
        if self.path is not None:
            save(self.path, self.digest, state)


def cached(path: str | os.PathLike, digest: str, compute: Callable[[], dict]) -> dict:
    """The state stored at ``path`` for ``digest``, else ``compute()``'s, stored there for the next run.

    For intermediate results that must not be recomputed after a kill (a GPU recomputation need not
    be bit-identical, and later stages' checkpoints depend on it).
    """
    state = load(path, digest)
    if state is None:
        state = compute()
        save(path, digest, state)
    return state
