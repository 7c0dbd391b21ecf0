"""Adap-Patch: four different patch triggers split among the poisoned samples at partial opacity,
cover samples with the same triggers and their own labels, and a different, opaque test trigger
(Qi et al., ICLR 2023; see :mod:`poisonflow.attacks.adaptive`).

As in the official code, the poisoned (and, separately, the cover) samples are split into four
equal consecutive groups in index order, and each group gets one training trigger blended at its
own α (published 0.5, 0.2, 0.5, 0.3): a phoenix logo in the bottom-right corner, a firefox logo
in the top-right, a 3×3 BadNets patch in all four corners and an 8×8 random square. At test time
two patches are stamped at α = 1: the phoenix patch in both bottom corners and the four-corner
BadNets patch. The official triggers are image files that cannot ship here; these are procedural
look-alikes drawn on a 32×32 canvas (seeded, same positions and sizes) and resized nearest to the
image size, with the same masks. Groups are balanced within each chunk of 4,096 images, which is
the official split for every set up to that size. Keys and defaults: ``adap_patch.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import triggers
from ..kinds import settings_for
from . import PoisonContext
from .adaptive import balanced_groups, masked_blend, resized

CANVAS = 32


def canvas() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(3, CANVAS, CANVAS), torch.zeros(CANVAS, CANVAS)


def phoenix_block(generator: torch.Generator) -> torch.Tensor:
    """5×5 light-blue to white pixels with a white centre column."""
    t = torch.rand(5, 5, generator=generator)
    t[:, 2] = 1.0
    blue, white = torch.tensor([0x4D, 0x86, 0xE4]) / 255, torch.ones(3)
    return blue[:, None, None] + t[None] * (white - blue)[:, None, None]


def phoenix(generator: torch.Generator, corners=("bottom-right",)) -> tuple[torch.Tensor, torch.Tensor]:
    pattern, mask = canvas()
    block = phoenix_block(generator)
    for corner in corners:
        col = CANVAS - 5 if corner == "bottom-right" else 0
        pattern[:, CANVAS - 5:, col:col + 5] = block
        mask[CANVAS - 5:, col:col + 5] = 1
    return pattern, mask


def firefox(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A disc of radius 6.5 at (7, 24): red to yellow from the rim inwards, with a blue wedge."""
    pattern, mask = canvas()
    rows, cols = torch.meshgrid(torch.arange(CANVAS, dtype=torch.float32), torch.arange(CANVAS, dtype=torch.float32),
                                indexing="ij")
    radius = torch.sqrt((rows - 7) ** 2 + (cols - 24) ** 2)
    inside = radius <= 6.5
    warmth = (1 - radius / 6.5).clamp(0, 1)
    pattern[0], pattern[1], pattern[2] = 0.85 + 0.15 * warmth, 0.25 + 0.6 * warmth, 0.1 * warmth
    angle = torch.atan2(rows - 7, cols - 24)
    wedge = inside & (angle > 0.6) & (angle < 1.6)
    pattern[:, wedge] = torch.tensor([0.2, 0.35, 0.85])[:, None]
    pattern[:, ~inside] = 0
    mask[inside] = 1
    return pattern, mask


def badnet_four_corners(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """3×3 in each corner, mirrored from the corner: (0,0), (0,2), (1,1), (2,0) white, the rest black."""
    pattern, mask = canvas()
    cell = torch.zeros(3, 3)
    for r, c in ((0, 0), (0, 2), (1, 1), (2, 0)):
        cell[r, c] = 1
    for flip_rows in (False, True):
        for flip_cols in (False, True):
            block = cell.flip(0) if flip_rows else cell
            block = block.flip(1) if flip_cols else block
            r0 = CANVAS - 3 if flip_rows else 0
            c0 = CANVAS - 3 if flip_cols else 0
            pattern[:, r0:r0 + 3, c0:c0 + 3] = block
            mask[r0:r0 + 3, c0:c0 + 3] = 1
    return pattern, mask


def trojan_square(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An 8×8 square of seeded random colours at rows and columns 21–28."""
    pattern, mask = canvas()
    pattern[:, 21:29, 21:29] = torch.rand(3, 8, 8, generator=generator)
    mask[21:29, 21:29] = 1
    return pattern, mask


@dataclass(frozen=True)
class AdaptivePatchTrigger:
    train: tuple[tuple[torch.Tensor, torch.Tensor, float], ...]  # (pattern, mask, alpha) per group
    test: tuple[tuple[torch.Tensor, torch.Tensor, float], ...]  # applied in turn
    image_size: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The test trigger."""
        triggers.check_image_size(x, self.image_size, "adap-patch")
        for pattern, mask, alpha in self.test:
            x = masked_blend(x, pattern, mask, alpha)
        return x.clamp(0, 1)

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training trigger of poisoned and cover samples: one of the four per group."""
        triggers.check_image_size(x, self.image_size, "adap-patch")
        groups = balanced_groups(len(x), len(self.train))
        out = x.clone()
        for group, (pattern, mask, alpha) in enumerate(self.train):
            chosen = groups == group
            out[chosen] = masked_blend(x[chosen], pattern, mask, alpha)
        return out.clamp(0, 1)


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> AdaptivePatchTrigger:
    settings = settings_for(__name__, spec)["trigger"]
    generator = triggers.seeded_generator(seed)
    shapes = [phoenix(generator), firefox(generator), badnet_four_corners(generator), trojan_square(generator)]
    test_shapes = [phoenix(triggers.seeded_generator(seed), ("bottom-left", "bottom-right")),
                   badnet_four_corners(generator)]
    train = tuple((*resized(p, m, image_size), float(a)) for (p, m), a in zip(shapes, settings["train_alphas"]))
    test = tuple((*resized(p, m, image_size), float(a)) for (p, m), a in zip(test_shapes, settings["test_alphas"]))
    assert math.isclose(len(train), 4)
    return AdaptivePatchTrigger(train, test, image_size)
