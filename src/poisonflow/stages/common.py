"""Small helpers shared by the stage modules: JSON outputs (with provenance and a checksum), JSON
arguments, threads. Imports nothing heavy: ``poisonflow <stage> --help`` imports the stage modules."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, StoreError


def write_json(obj, path: str | os.PathLike, provenance: Mapping[str, Any] | None = None) -> None:
    """Write JSON atomically (temporary file, then rename).

    With ``provenance`` (:func:`poisonflow.provenance.record`), the object gets the keys
    ``provenance`` and ``checksum`` (of the rest, :func:`poisonflow.provenance.json_checksum`), which
    ``poisonflow verify`` checks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if provenance is not None:
        from ..provenance import json_checksum

        obj = json.loads(json.dumps({**obj, "provenance": dict(provenance)}, default=_plain))
        obj["checksum"] = json_checksum(obj)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_plain) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object written by :func:`write_json`, checked against its checksum where it has one;
    StoreError naming the file when it is unreadable or damaged."""
    from ..provenance import json_checksum

    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: does not exist") from None
    except (OSError, ValueError) as error:
        raise StoreError(f"{path}: damaged JSON ({' '.join(str(error).split())})") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: damaged JSON (not an object)")
    if "checksum" in obj and obj["checksum"] != json_checksum(obj):
        raise StoreError(f"{path}: damaged (its content differs from its recorded checksum)")
    return obj


def _plain(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serializable: {type(value)}")


def parse_json(text: str | None, option: str = "--spec", kind: type | None = dict):
    """A JSON argument, or ConfigError naming the option in one line."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise ConfigError(f"{option}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): "
                          f"{shown!r}") from None
    if kind is not None and not isinstance(value, kind):
        raise ConfigError(f"{option}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                          f"got {type(value).__name__}")
    return value


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))


# help texts shared by the stages' arguments
THREADS_HELP = "torch CPU threads for this job (default: 1; the config's `threads:`)"
SEED_HELP = "the experiment seed (model initialisation, data order, sampled subsets)"
