"""Per-sample loss splits of a training set, shared by the semi-supervised defenses (DBD, ASD):
each sample's symmetric cross entropy under a model, and the masks drawn from it."""

from __future__ import annotations

import numpy as np
import torch

from .losses import symmetric_cross_entropy
from .trainer import images_to_tensor, to_float


@torch.no_grad()
def per_sample_sce(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, alpha: float, beta: float,
                   device, batch_size: int = 512) -> np.ndarray:
    """Each sample's SCE (α·CE + β·RCE) under ``model`` in eval mode, on the images as they are."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images_to_tensor(images[start:start + batch_size], device))
        y = torch.as_tensor(labels[start:start + batch_size], device=device)
        out.append(symmetric_cross_entropy(model(x).float(), y, alpha, beta).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def lowest_share(losses: np.ndarray, share: float) -> np.ndarray:
    """Bool mask of the int(share·N) lowest losses over the whole set (ties by index)."""
    mask = np.zeros(len(losses), dtype=bool)
    mask[np.argsort(losses, kind="stable")[:int(share * len(losses))]] = True
    return mask


def lowest_per_class(losses: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of the ``count`` lowest losses within each label (all of a smaller class; ties by index)."""
    mask = np.zeros(len(losses), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        mask[members[np.argsort(losses[members], kind="stable")[:count]]] = True
    return mask
