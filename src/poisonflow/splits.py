"""Per-sample loss splits of a training set, shared by the semi-supervised defenses (DBD, ASD):
each sample's symmetric cross entropy under a model, and the masks drawn from it."""

from __future__ import annotations

import numpy as np
import torch

from .losses import symmetric_cross_entropy
from .scores import per_sample_loss


def per_sample_sce(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, alpha: float, beta: float,
                   device, batch_size: int = 512) -> np.ndarray:
    """Each sample's SCE (α·CE + β·RCE) under ``model`` in eval mode, on the images as they are."""
    return per_sample_loss(model, images, labels, device, batch_size,
                           loss=lambda logits, y: symmetric_cross_entropy(logits, y, alpha, beta))


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
