"""Auto-Encoder pre-processing: test inputs pass through an autoencoder trained on clean data.

An autoencoder trained to reconstruct clean images reproduces what clean images have in common
and smooths away small patterns it never saw, such as a trigger patch; the victim then classifies
the reconstruction. The defender trains it on its clean split (``clean_fraction`` of the clean
pool; by default all of it, as the autoencoder is trained on the clean training set in the
paper's setting) and deploys ``victim(autoencoder(x))``.

Architecture: ``depth`` stride-2 4×4 convolutions with widths w, 2w, 4w, … (each halving the
side) and ReLU, mirrored by stride-2 4×4 transposed convolutions, and a sigmoid so outputs are
images in [0, 1]; w = 12 and depth 3 give the usual 3×32×32 → 48×4×4 → 3×32×32 CIFAR
autoencoder. Trained with binary cross entropy against the input and Adam (lr 1e-3, batch 16,
100 epochs), checkpointed every epoch in the defense's work directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import augment
from ..errors import ConfigError
from ..kinds import settings_for
from ..trainer import Objective, StepContext, StepOutput, images_to_tensor, to_float, train_model
from . import DefenseContext, DefenseResult
from .clean_data import clean_split
from .preprocessing import Preprocessed


class ConvAutoencoder(nn.Module):
    """Images (N, 3, H, W) in [0, 1] → reconstructions of the same shape in [0, 1]."""

    def __init__(self, width: int = 12, depth: int = 3):
        super().__init__()
        channels = [3] + [width * 2**level for level in range(depth)]
        encoder: list[nn.Module] = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            encoder += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        decoder: list[nn.Module] = []
        for cin, cout in zip(channels[:0:-1], channels[-2::-1]):
            decoder += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        decoder[-1] = nn.Sigmoid()  # the last layer outputs pixel values
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def build_autoencoder(width: int, depth: int, image_shape: tuple[int, int], seed: int) -> ConvAutoencoder:
    """A seeded autoencoder; each stride-2 layer halves the side exactly, so both must divide by 2**depth."""
    factor = 2**depth
    if image_shape[0] % factor or image_shape[1] % factor:
        raise ConfigError(f"autoencoder.depth: {depth} stride-2 layers need an image side divisible by {factor}, "
                          f"got {image_shape[0]}×{image_shape[1]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvAutoencoder(width, depth)


@torch.no_grad()
def reconstruction_error(model: nn.Module, images: np.ndarray, device: torch.device | str = "cpu",
                         batch_size: int = 256) -> float:
    """Mean binary cross entropy between uint8 NHWC ``images`` and their reconstructions."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = to_float(images_to_tensor(images[start:start + batch_size], device))
        total += float(F.binary_cross_entropy(model(x), x, reduction="sum"))
        count += x.numel()
    return total / max(1, count)


def reconstruction_loss(net: nn.Module, batch: augment.MixedBatch, ctx: StepContext) -> StepOutput:
    """Per image: the binary cross entropy between it and its reconstruction, averaged over its values."""
    with ctx.autocast():
        reconstruction = net(batch.images)
    # in float32 outside autocast, which refuses binary_cross_entropy
    bce = F.binary_cross_entropy(reconstruction.float(), batch.images, reduction="none")
    return StepOutput(bce.flatten(1).mean(1))


RECONSTRUCTION = Objective(reconstruction_loss, "reconstruction_bce")


def autoencoder_training(settings: dict) -> dict:
    """The autoencoder's settings as a training entry: Adam at ``lr``, constant, no augmentation."""
    return {"epochs": int(settings["epochs"]), "batch_size": int(settings["batch_size"]),
            "optimizer": {"name": "adam", "lr": float(settings["lr"])}, "schedule": {"name": "constant"},
            "augment": [], "adversarial": None}


def train_autoencoder(model: nn.Module, images: np.ndarray, settings: dict, *, seed: int,
                      device: torch.device | str = "cpu", checkpoint: Path | None = None,
                      history: Path | None = None) -> list[float]:
    """Train ``model`` to reconstruct uint8 NHWC ``images`` (BCE, Adam); the mean loss of each epoch."""
    no_labels = np.zeros(len(images), dtype=np.int64)  # the trainer draws batches of (image, label) pairs
    result = train_model(model, images, no_labels, autoencoder_training(settings), objective=RECONSTRUCTION,
                         seed=seed, device=device, checkpoint=checkpoint, history=history, desc="autoencoder")
    return [row["loss"] for row in result.history]


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'autoencoder' needs the victim model")
    resolved = settings_for(__name__, spec)
    index = clean_split(len(ctx.reserve_labels), float(resolved["clean_fraction"]), ctx.seed)
    images = ctx.reserve_images[index]
    autoencoder = build_autoencoder(int(resolved["width"]), int(resolved["depth"]), images.shape[1:3], ctx.seed)
    losses = train_autoencoder(autoencoder, images, resolved, seed=ctx.seed, device=ctx.device,
                               checkpoint=Path(ctx.workdir) / "autoencoder.pt",
                               history=Path(ctx.workdir) / "history-autoencoder.csv")
    for parameter in autoencoder.parameters():
        parameter.requires_grad_(False)  # deployed frozen; PGD still differentiates through it
    model = Preprocessed(autoencoder, ctx.victim).to(ctx.device).eval()
    metrics = {"reconstruction_bce": reconstruction_error(autoencoder, images, ctx.device),
               "first_epoch_bce": losses[0], "clean_samples": int(len(index))}
    return DefenseResult(model=model, metrics=metrics)
