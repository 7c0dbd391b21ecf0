"""Fine-pruning: prune the last feature map's least active channels on clean data, then fine-tune.

Backdoor behaviour tends to live in channels that clean inputs leave dormant, so zeroing the
channels with the lowest mean activation on clean data removes much of it; fine-tuning the
pruned model on the same clean data recovers the accuracy the pruning cost. Pruning zeroes
entries of the model's ``channel_mask``, a buffer the optimizer does not touch, so the pruned
channels stay off while the rest of the network is fine-tuned. The victim itself is not changed:
the defense works on a deep copy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..kinds import settings_for
from ..trainer import images_to_tensor, to_float, train_model
from . import DefenseContext, DefenseResult, merge
from .clean_data import clean_split


@torch.no_grad()
def mean_channel_activation(model: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu",
                            batch_size: int = 256) -> torch.Tensor:
    """Mean over images and positions of each channel of the last feature map, before the mask.

    Measured with the mask temporarily set to ones, so a channel's activity is its own and not
    what an earlier pruning left of it.
    """
    model.eval()
    saved_mask = model.channel_mask.clone()
    model.channel_mask.fill_(1.0)
    try:
        total = torch.zeros_like(saved_mask, dtype=torch.float64)
        count = 0
        for start in range(0, len(images), batch_size):
            x = to_float(images_to_tensor(images[start:start + batch_size], device))
            feature_map = model.feature_map(x)
            total += feature_map.double().sum(dim=(0, 2, 3))
            count += feature_map.shape[0] * feature_map.shape[2] * feature_map.shape[3]
    finally:
        model.channel_mask.copy_(saved_mask)
    return (total / max(1, count)).cpu()


def least_active_channels(activation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the round(ratio·C) channels with the lowest mean activation (stable on ties)."""
    count = int(round(ratio * activation.numel()))
    return torch.argsort(activation, stable=True)[:count]


@torch.no_grad()
def prune_channels(model: torch.nn.Module, channels: torch.Tensor) -> None:
    """Zero the mask entries of ``channels`` in place."""
    model.channel_mask[channels.to(model.channel_mask.device)] = 0.0


def fine_tune(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, ctx: DefenseContext,
              finetune: dict) -> torch.nn.Module:
    """Train the pruned model on the clean split; the checkpoint lets a killed job resume (its digest
    covers the pruned starting weights, so it never resumes on another victim or pruning)."""
    workdir = Path(ctx.workdir)
    return train_model(model, images, labels, merge(ctx.training, finetune), seed=ctx.seed, device=ctx.device,
                       checkpoint=workdir / "finetune.pt", history=workdir / "history-finetune.csv",
                       desc="fine-pruning").model


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'fine-pruning' needs the victim model")
    resolved = settings_for(__name__, spec)
    index = clean_split(len(ctx.reserve_labels), float(resolved["clean_fraction"]), ctx.seed)
    images, labels = ctx.reserve_images[index], ctx.reserve_labels[index]
    model = copy.deepcopy(ctx.victim).to(ctx.device)
    activation = mean_channel_activation(model, images, ctx.device, int(resolved["batch_size"]))
    pruned = least_active_channels(activation, float(resolved["ratio"]))
    prune_channels(model, pruned)
    model = fine_tune(model, images, labels, ctx, resolved["finetune"])
    metrics = {"pruned_channels": int(pruned.numel()), "clean_samples": int(len(index))}
    return DefenseResult(model=model, metrics=metrics)
