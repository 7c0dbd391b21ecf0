"""BadNets: a small fixed patch stamped at the same place on every poisoned image.

``trigger:`` keys (defaults in ``badnets.yaml`` beside this module):

- ``pattern`` (``checkerboard``): ``checkerboard`` (1 = white; size 3 is exactly
  [[0,0,1],[0,1,0],[1,0,1]], other sizes alternate from a white bottom-right cell with the
  top-left cell black, see :func:`poisonflow.triggers.checkerboard_patch`), ``white``, ``black``,
  or ``random`` (one uniform-noise patch drawn from the attack seed, the same on every image).
- ``size`` (3): the patch is ``size``×``size`` pixels.
- ``position`` (``bottom-right``): ``bottom-right``, ``bottom-left``, ``top-right``, ``top-left``,
  or ``[row, col]``, the patch's explicit top-left pixel (CIFAR BadNets-C: rows 26:29,
  cols 17:20 → ``[26, 17]``).
- ``margin`` (0): pixels between a named corner's patch and the image border.
- ``seed`` (the experiment seed): read by the poison stage and passed to :func:`build` as ``seed``;
  it draws the ``random`` pattern.

A patch that does not fit the image is a ConfigError naming ``trigger.size`` or
``trigger.position`` (``trigger.margin`` when the margin pushes it out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import triggers
from ..kinds import settings_for
from . import PoisonContext


@dataclass(frozen=True)
class PatchTrigger:
    patch: torch.Tensor  # (3, size, size) in [0, 1]
    row: int
    col: int
    image_size: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "badnets")
        return triggers.stamp_patch(x, self.patch, self.row, self.col)


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> PatchTrigger:
    settings = settings_for(__name__, spec)["trigger"]
    patch = triggers.patch_pattern(settings["pattern"], settings["size"], triggers.seeded_generator(seed))
    row, col = triggers.patch_position(
        settings["position"], settings["size"], image_size, image_size, settings["margin"]
    )
    return PatchTrigger(patch, row, col, image_size)
