"""Provenance: what every artifact records about how it was made, and the digests that identify it.

Every store (attribute ``provenance``), ``metrics.json`` (key ``provenance``) and model (its JSON
sidecar, :mod:`poisonflow.modelio`) carries a record made by :func:`record`:

- ``stage``, the entry ``name`` and the resolved config ``entry`` the job ran with (``--spec``,
  schema defaults filled), its ``seed`` and whatever else the stage adds (``extra``);
- ``inputs``: each input artifact's path and its recorded digest (:func:`artifact_id`: a store's
  ``digest`` attribute, a model's weights digest, a file's own checksum), so a result can be traced
  to the exact data and models it was computed from;
- ``code``: the hash of the source the job ran (:func:`poisonflow.codehash.code_hash` of the stage
  and kind modules, the value the Snakemake rule's ``params.code`` holds) and those modules;
- ``versions`` of poisonflow, Python, torch, torchvision, zarr, numcodecs and numpy (read from the
  installed distributions, so recording them imports nothing heavy), the ``device`` it ran on and
  when it was ``created`` (UTC).

``poisonflow info PATH`` prints the record of any artifact; ``poisonflow verify`` checks digests.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import __version__

DIGEST = "blake2b-128"
PACKAGES = ("torch", "torchvision", "zarr", "numcodecs", "numpy")


@lru_cache(maxsize=None)
def versions() -> dict[str, str | None]:
    """Versions of poisonflow, Python and the packages results depend on (None if not installed)."""
    from importlib import metadata

    found: dict[str, str | None] = {"poisonflow": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_name(device: Any = None) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: the torch device a job ran on, with the GPU's model."""
    text = "cpu" if device is None else str(device)
    if text.startswith("cuda"):
        try:
            import torch

            index = torch.device(text).index
            name = torch.cuda.get_device_name(0 if index is None else index)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return f"{text} ({name}{f', CUDA_VISIBLE_DEVICES={visible}' if visible else ''})"
        except Exception:  # provenance must never fail a finished job
            return text
    return text


def file_digest(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """``blake2b-128:<hex>`` of a file's bytes, read in blocks."""
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            hasher.update(chunk)
    return f"{DIGEST}:{hasher.hexdigest()}"


def json_checksum(obj: Mapping[str, Any]) -> str:
    """``blake2b-128:<hex>`` of a JSON object's canonical text, without its own ``checksum`` key."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return f"{DIGEST}:{hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}"


def artifact_id(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "digest"}`` of an input artifact: the digest recorded when it was written where
    there is one (a store's ``digest`` attribute, a model's ``weights_digest`` in its sidecar, a JSON
    file's ``checksum``), else the checksum of the file; ``digest`` is None for a store with none
    recorded (written before digests were) and for a missing path.

    Reads the JSON metadata directly (no zarr, no torch), so provenance stays out of the stages'
    code closures beyond this module.
    """
    path = Path(path)
    digest = None
    try:
        if (path / "zarr.json").is_file():
            digest = (json.loads((path / "zarr.json").read_text()).get("attributes") or {}).get("digest")
        elif path.is_file() and path.suffix == ".pt" and path.with_suffix(".json").is_file():
            digest = json.loads(path.with_suffix(".json").read_text()).get("weights_digest")
        elif path.is_file() and path.suffix == ".json":
            recorded = json.loads(path.read_text()).get("checksum")
            digest = recorded if isinstance(recorded, str) else file_digest(path)
        elif path.is_file():
            digest = file_digest(path)
    except (OSError, ValueError, AttributeError):
        digest = None
    return {"path": str(path), "digest": digest}


def record(stage: str, *, entry: Any = None, name: str | None = None, seed: int | None = None,
           inputs: Iterable[str | os.PathLike | None] = (), code: Iterable[str] = (), device: Any = None,
           extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance record of a job's output (see the module docstring).

    ``code``: the modules whose source the job ran (the stage module and the kind module), hashed
    as the workflow rule hashes them; ``inputs``: paths of the artifacts it read (None skipped).
    """
    # imported by name: the hashing machinery is not part of what a stage computes, so it stays out
    # of the stages' code closures (editing it reruns nothing)
    code_hash = importlib.import_module("poisonflow.codehash").code_hash
    modules = [m for m in code if m]
    out: dict[str, Any] = {"stage": stage}
    if name is not None:
        out["name"] = name
    if entry is not None:
        out["entry"] = entry
    if seed is not None:
        out["seed"] = int(seed)
    out["inputs"] = [artifact_id(p) for p in inputs if p is not None]
    out["code"] = {"hash": code_hash(*modules) if modules else None, "modules": modules}
    out["versions"] = dict(versions())
    out["device"] = device_name(device)
    out["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if extra:
        out.update(extra)
    return out
