"""Adap-Blend: a full-image blend trigger of which each poisoned and cover sample gets a random half
of the pieces at low opacity, while the test trigger is the whole pattern at a higher opacity
(Qi et al., ICLR 2023; see :mod:`poisonflow.attacks.adaptive`).

The image is cut into √pieces × √pieces blocks of side ⌊H/√pieces⌋; for every poisoned or cover
sample a fresh random ``round(mask_rate · pieces)`` of them are masked out and the rest blended at
``alpha`` (published commands 0.15); the test trigger is the unmasked pattern at ``test_alpha``
(0.2). The official pattern is an image file (hellokitty_32.png) that cannot ship here; the default
``pattern: texture`` is a bright, smooth seeded texture standing in for a natural image, and
``pattern: image`` with ``path`` loads any image. Keys and defaults: ``adap_blend.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import triggers
from ..errors import ConfigError
from ..kinds import settings_for
from . import PoisonContext
from .adaptive import masked_blend


def smooth_texture(image_size: int, generator: torch.Generator) -> torch.Tensor:
    """A bright, smooth (3, S, S) texture in [0.4, 1]: a seeded 4×4 colour grid, bilinearly upsampled."""
    grid = torch.rand(1, 3, 4, 4, generator=generator)
    return (0.4 + 0.6 * F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=True))[0]


def piece_masks(n: int, image_size: int, pieces: int, masked: int, generator: torch.Generator) -> torch.Tensor:
    """(n, S, S) masks: 1 everywhere but ``masked`` random blocks of the √pieces × √pieces grid."""
    side = math.isqrt(pieces)
    step = image_size // side
    masks = torch.ones(n, image_size, image_size)
    for i in range(n):
        for piece in torch.randperm(pieces, generator=generator)[:masked].tolist():
            row, col = divmod(piece, side)
            masks[i, row * step:(row + 1) * step, col * step:(col + 1) * step] = 0
    return masks


@dataclass
class AdaptiveBlendTrigger:
    pattern: torch.Tensor  # (3, S, S)
    alpha: float  # training opacity
    test_alpha: float
    pieces: int
    masked: int  # pieces masked out per training sample
    image_size: int
    generator: torch.Generator = field(repr=False)  # draws the piece masks, in call order

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The test trigger: the whole pattern at ``test_alpha``."""
        triggers.check_image_size(x, self.image_size, "adap-blend")
        return masked_blend(x, self.pattern, torch.ones(self.image_size, self.image_size), self.test_alpha).clamp(0, 1)

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training trigger of poisoned and cover samples: a random part of the pattern at ``alpha``."""
        triggers.check_image_size(x, self.image_size, "adap-blend")
        masks = piece_masks(len(x), self.image_size, self.pieces, self.masked, self.generator)
        return (x + self.alpha * masks[:, None] * (self.pattern - x)).clamp(0, 1)


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> AdaptiveBlendTrigger:
    settings = settings_for(__name__, spec)["trigger"]
    if math.isqrt(settings["pieces"]) ** 2 != settings["pieces"]:
        raise ConfigError(f"trigger.pieces: {settings['pieces']} is not a square number (a √pieces × √pieces grid)")
    if settings["pattern"] == "image":
        if not settings.get("path"):
            raise ConfigError("trigger.path: required when trigger.pattern is 'image'")
        pattern = triggers.image_pattern(settings["path"], image_size)
    else:
        pattern = smooth_texture(image_size, triggers.seeded_generator(seed))
    masked = int(round(settings["mask_rate"] * settings["pieces"]))
    return AdaptiveBlendTrigger(pattern, float(settings["alpha"]), float(settings["test_alpha"]), int(settings["pieces"]),
                                masked, image_size, triggers.seeded_generator(seed + 1))
