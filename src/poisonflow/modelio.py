"""Models on disk: weights-only files with a JSON sidecar, loadable and shareable without the workflow.

:func:`save_model` writes ``model.pt`` (the state dict: tensors only, so it loads with
``torch.load(weights_only=True)`` and never runs code from the file) and, next to it,
``model.json``: the architecture (the ``models:`` entry, the number of classes and the image size;
:func:`model_spec`), the digest of the weights file and the provenance record
(:mod:`poisonflow.provenance`). :func:`load_model` rebuilds the network from the sidecar alone::

    from poisonflow.modelio import load_model
    model = load_model("results/victims/digits/badnets/quick/seed0/model.pt")   # eval mode, CPU

A weights file that differs from the digest its sidecar records is refused with one line naming
it (:class:`~poisonflow.errors.StoreError`). A weights file without a sidecar (written by an older
version, or by :func:`poisonflow.trainer.save_weights`) loads when the caller gives the spec.

This module imports torch only inside the functions that need it, so ``poisonflow info`` and
``poisonflow verify`` read sidecars without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import StoreError
from .provenance import file_digest

FORMAT = "poisonflow-model/1"


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a weights file: ``model.pt`` → ``model.json``."""
    return Path(path).with_suffix(".json")


def model_spec(model: Mapping[str, Any], num_classes: int, image_size: int) -> dict[str, Any]:
    """What rebuilds a network: the resolved ``models:`` entry, the class count and the image size."""
    return {"model": dict(model), "num_classes": int(num_classes), "image_size": int(image_size)}


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model, path: str | os.PathLike, spec: Mapping[str, Any],
               provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights to ``path`` and its sidecar (spec, weights digest, provenance)."""
    import torch

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(path, lambda tmp: torch.save(state, tmp))
    sidecar = {
        "format": FORMAT,
        "weights": path.name,
        "weights_digest": file_digest(path),
        "parameters": int(sum(v.numel() for k, v in state.items() if v.is_floating_point())),
        "spec": dict(spec),
        "provenance": dict(provenance) if provenance is not None else None,
    }
    text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    _atomic(sidecar_path(path), lambda tmp: tmp.write_text(text))
    return path


def read_sidecar(path: str | os.PathLike) -> dict | None:
    """The sidecar of the weights file ``path``; None when there is none. StoreError naming it when
    it is there but unreadable."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as error:
        raise StoreError(f"{side}: unreadable model sidecar ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{side}: not a poisonflow model sidecar (format {data.get('format') if isinstance(data, dict) else None!r})")
    return data


def check_weights(path: str | os.PathLike) -> dict | None:
    """Check the weights file against the digest its sidecar records; return the sidecar (None
    without one). StoreError naming the file when it is missing or differs."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: model weights do not exist")
    sidecar = read_sidecar(path)
    if sidecar is not None and file_digest(path) != sidecar.get("weights_digest"):
        raise StoreError(f"{path}: model weights are damaged (they differ from the digest recorded in "
                         f"{sidecar_path(path).name}); run `poisonflow verify` or delete them, then rerun")
    return sidecar


def _state(path: Path, device):
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # a truncated file, a pickle that is not weights only, …
        raise StoreError(f"{path}: model weights do not load as a weights-only file "
                         f"({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None


def load_into(model, path: str | os.PathLike, device="cpu"):
    """Load the weights at ``path`` into ``model`` (checked against the sidecar's digest where there
    is one); the model, on ``device``, in eval mode."""
    path = Path(path)
    check_weights(path)
    state = _state(path, device)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        raise StoreError(f"{path}: weights do not fit the model ({' '.join(str(error).split())[:300]})") from None
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device="cpu", spec: Mapping[str, Any] | None = None):
    """The network saved at ``path``, rebuilt from its sidecar, on ``device``, in eval mode.

    ``spec`` (:func:`model_spec`) is used only for a weights file without a sidecar.
    """
    from .models import build_model

    path = Path(path)
    sidecar = check_weights(path)
    if sidecar is not None:
        spec = sidecar["spec"]
    elif spec is None:
        raise StoreError(f"{path}: no {sidecar_path(path).name} next to the weights, so the architecture is "
                         f"unknown; rerun the job that wrote it")
    model = build_model(spec["model"], int(spec["num_classes"]), int(spec["image_size"]))
    return load_into(model, path, device)
