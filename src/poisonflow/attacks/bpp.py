"""BPP: colour-depth squeezing as the trigger (Wang, Zhai and Ma, "BppAttack: Stealthy and
Efficient Trojan Attacks against Deep Neural Networks via Image Quantization and Contrastive
Adversarial Learning", CVPR 2022).

A poisoned image is every channel quantised to ``squeeze_num`` levels on the 0–255 scale,
round(x·(q − 1)) / (q − 1), optionally with Floyd–Steinberg error diffusion (7/16 right, 3/16
down-left, 5/16 down, 1/16 down-right, each channel on its own, in raster order; the diffused
values are not clipped until the image is stored). Negative ("contrastive") samples keep their
label and get the quantisation residual Q(x') − x' of another training image added; they are
the kind's noise mode, ``negative_ratio`` per poisoned sample.

Simplification, stated: the paper and its code poison batch by batch during training (a fresh
residual each time) and train with contrastive adversarial examples; this kind is a data-poisoning
attack that fixes one poisoned set and one residual per negative sample, as BackdoorBench's saved
poisoned sets do. Keys and defaults: ``bpp.yaml`` beside this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import triggers
from ..kinds import settings_for
from . import PoisonContext

# Floyd–Steinberg: (row offset, column offset, share of the error)
DIFFUSION = ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16))


def quantise(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Each value in [0, 1] to the nearest of ``levels`` evenly spaced levels."""
    return torch.round(x * (levels - 1)) / (levels - 1)


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantised (N, C, H, W) images with the quantisation error diffused to unvisited neighbours."""
    work = x.clone().to(torch.float64)
    height, width = work.shape[-2:]
    for row in range(height):
        for col in range(width):
            old = work[..., row, col].clone()
            new = quantise(old, levels)
            work[..., row, col] = new
            error = old - new
            for d_row, d_col, share in DIFFUSION:
                r, c = row + d_row, col + d_col
                if r < height and 0 <= c < width:
                    work[..., r, c] += share * error
    return work.to(x.dtype)


@dataclass(frozen=True)
class SqueezeTrigger:
    levels: int
    dithering: bool
    negative_ratio: float  # negative samples per poisoned sample (the stage's noise mode)
    image_size: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "bpp")
        squeezed = floyd_steinberg(x, self.levels) if self.dithering else quantise(x, self.levels)
        return squeezed.clamp(0, 1)

    @property
    def noise_ratio(self) -> float:
        return self.negative_ratio

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Negative samples: each image plus the quantisation residual of another image of ``x``."""
        donors = torch.randperm(len(x), generator=generator)
        if len(x) > 1:  # never an image's own residual
            donors = torch.where(donors == torch.arange(len(x)), (donors + 1) % len(x), donors)
        residual = self.apply(x[donors]) - x[donors]
        return (x + residual).clamp(0, 1)


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> SqueezeTrigger:
    trigger = settings_for(__name__, spec)["trigger"]
    return SqueezeTrigger(int(trigger["squeeze_num"]), bool(trigger["dithering"]), float(trigger["negative_ratio"]),
                          image_size)
