"""The one content hash behind every checkpoint and cache key.

:func:`digest` hashes any mix of JSON-able parts (settings, seeds, flags), numpy arrays, tensors and
models (their state: names, dtypes, shapes and values). Each part is tagged with its kind and
length before its bytes, so two different sequences of parts never feed sha256 the same stream.

:func:`data_digest` (a training set, hashed for every training job) does not feed sha256 the whole
array: that cost ~170 ms per 50k×32×32×3 CIFAR-size set (a copy plus sha256 of 150 MB) and grows with
ImageNet-size sets. It hashes a summary instead (:func:`array_summary`): shape, dtype, a strided
sample of rows in full, and a positional checksum of every byte (sums of 64-bit words, per block of
words and per position within a block; one numpy pass). Changing any single pixel changes its
block's sum (an addition of a non-zero difference modulo 2⁶⁴), and moving content between blocks or
within a block changes the block or the position sums, so any edit of the data short of a
deliberately constructed collision changes the digest.
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


# Words (8 bytes) per checksum block: 512 words = 4 KiB, so 150 MB give ~37k block sums (300 KB).
CHECKSUM_BLOCK_WORDS = 512
# Rows hashed in full by the strided sample of :func:`array_summary`.
SAMPLE_ROWS = 128


def positional_checksum(array: np.ndarray) -> bytes:
    """Sums modulo 2⁶⁴ of the array's 64-bit words, per block of :data:`CHECKSUM_BLOCK_WORDS` words
    and per position within a block, and the bytes that do not fill a block. Any change of a single
    byte changes a block sum."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    whole = len(flat) // 8 * 8
    words = flat[:whole].view("<u8")
    blocks = len(words) // CHECKSUM_BLOCK_WORDS
    body = words[:blocks * CHECKSUM_BLOCK_WORDS].reshape(blocks, CHECKSUM_BLOCK_WORDS)
    with np.errstate(over="ignore"):
        block_sums = body.sum(axis=1, dtype=np.uint64)
        position_sums = body.sum(axis=0, dtype=np.uint64)
    rest = np.concatenate([words[blocks * CHECKSUM_BLOCK_WORDS:].view(np.uint8), flat[whole:]])
    return b"".join([block_sums.astype("<u8").tobytes(), position_sums.astype("<u8").tobytes(), rest.tobytes()])


def array_summary(array: np.ndarray) -> list:
    """What :func:`data_digest` hashes of an array: shape, dtype, every ``len/SAMPLE_ROWS``-th row in
    full and :func:`positional_checksum` of all of it (one pass over the data, no copy of it)."""
    array = np.ascontiguousarray(array)  # at least one dimension
    stride = max(1, len(array) // SAMPLE_ROWS)
    sample = array[::stride]
    return [{"shape": list(array.shape), "dtype": array.dtype.str, "sample_stride": stride},
            np.ascontiguousarray(sample), np.frombuffer(positional_checksum(array), dtype=np.uint8)]


def data_digest(images: np.ndarray, labels: np.ndarray | None = None) -> str:
    """The digest of a training set: the :func:`array_summary` of the images (cheap, yet changed by
    any pixel) and the labels in full, as int64 so their integer type does not matter."""
    return digest(*array_summary(np.asarray(images)),
                  np.asarray([] if labels is None else labels, dtype=np.int64))


def model_digest(model: torch.nn.Module) -> str:
    """The digest of a model's state (parameters and buffers)."""
    return digest(model)
