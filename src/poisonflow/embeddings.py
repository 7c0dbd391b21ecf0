"""Feature vectors of a whole image set, and their per-dimension standardization.

:func:`embed_images` runs an encoder (float images in [0, 1] → (B, D)) over uint8 NHWC images in
batches, without gradients, in float32, and returns (N, D) float32 on the host.
:func:`standardize` gives each dimension mean 0 and (unbiased) std 1 over the set, as GSSD's
official feature loader does before its flows (``(f − f.mean(0)) / f.std(0)`` in torch, whose std
divides by N − 1); the mean and std are returned with the result so other rows can be mapped the same way.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .evaluate import device_batches
from .progress import bar
from .trainer import to_float

Encoder = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def embed_images(encode: Encoder, images, device="cpu", batch_size: int = 256, desc: str = "features") -> np.ndarray:
    """(N, D) float32 features of uint8 NHWC ``images`` (an array or a zarr array); ``encode`` is
    called on float (B, 3, H, W) batches in [0, 1] on ``device``."""
    device = torch.device(device)
    parts = []
    batches = (len(images) + batch_size - 1) // batch_size
    for batch in bar(device_batches(images, device, batch_size), desc=desc, total=batches, unit="batch"):
        parts.append(encode(to_float(batch)).float().cpu())
    if not parts:
        raise ValueError("embed_images: no images")
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


def standardize(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(standardized float32 (N, D), mean (D,), std (D,)): every dimension shifted to mean 0 and
    divided by its unbiased standard deviation (ddof 1), computed in float64.

    A dimension that is constant over the set (a ReLU unit that never fires) has std 0; it is
    divided by 1 instead and stays 0 (the official loader would give NaN), and its std is
    recorded as 1 so that the mapping stays invertible.
    """
    rows = np.asarray(features, dtype=np.float64)
    if rows.ndim != 2 or len(rows) < 2:
        raise ValueError(f"standardize: needs (N, D) features with N >= 2, got shape {rows.shape}")
    mean = rows.mean(axis=0)
    std = rows.std(axis=0, ddof=1)
    std = np.where(std > 0, std, 1.0)
    return ((rows - mean) / std).astype(np.float32), mean.astype(np.float32), std.astype(np.float32)
