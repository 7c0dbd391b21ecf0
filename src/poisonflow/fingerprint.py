"""The one content hash behind every checkpoint and cache key.

:func:`digest` hashes any mix of JSON-able parts (settings, seeds, flags), numpy arrays, tensors and
models (their state: names, dtypes, shapes and values). Each part is tagged with its kind and
length before its bytes, so two different sequences of parts never feed sha256 the same stream.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

# Hex digits kept: 64 bits tell apart every job a workflow will ever run.
LENGTH = 16


def _frame(hasher, tag: str, payload: bytes) -> None:
    hasher.update(f"{tag}:{len(payload)}:".encode())
    hasher.update(payload)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    # A byte view covers every dtype, bfloat16 included, which numpy cannot represent.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _update(hasher, part) -> None:
    if isinstance(part, torch.nn.Module):
        for name, tensor in part.state_dict().items():
            _frame(hasher, "name", name.encode())
            _update(hasher, tensor)
    elif isinstance(part, torch.Tensor):
        _frame(hasher, f"tensor{part.dtype}{tuple(part.shape)}", _tensor_bytes(part))
    elif isinstance(part, np.ndarray):
        part = np.ascontiguousarray(part)
        _frame(hasher, f"array{part.dtype.str}{part.shape}", part.tobytes())
    else:
        _frame(hasher, "json", json.dumps(part, sort_keys=True, default=str).encode())


def digest(*parts) -> str:
    """A short hex content hash of ``parts`` (JSON-able values, arrays, tensors, models), in order."""
    hasher = hashlib.sha256()
    for part in parts:
        _update(hasher, part)
    return hasher.hexdigest()[:LENGTH]


def data_digest(images: np.ndarray, labels: np.ndarray | None = None) -> str:
    """The digest of a training set; labels are hashed as int64 so their integer type does not matter."""
    return digest(np.asarray(images), np.asarray([] if labels is None else labels, dtype=np.int64))


def model_digest(model: torch.nn.Module) -> str:
    """The digest of a model's state (parameters and buffers)."""
    return digest(model)
