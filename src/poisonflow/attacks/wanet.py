"""WaNet: every poisoned image is resampled through one fixed, smooth warping field.

The field follows WaNet's definition: a k×k grid of random offsets (normalized to mean
|offset| 1), upsampled bicubically to H×H, scaled by s/H, added to the identity grid, times
``grid_rescale``, clamped to [−1, 1]; images are resampled with bilinear ``grid_sample``,
zero padding, ``align_corners=True``. The field is drawn from a generator seeded with the
attack seed, so ``build(spec, image_size, seed)`` is deterministic; a class-wise variant builds
one trigger per class from per-class seeds.

Noise-mode samples (WaNet's "cross" samples, which keep their labels so the model learns that
only this exact warp is the trigger) use the field plus fresh uniform offsets in [−1/H, 1/H)
per image, clamped to [−1, 1]: :meth:`WarpTrigger.noise`.

``trigger:`` keys (defaults in ``wanet.yaml`` beside this module):

- ``k`` (4): control-grid size.
- ``s`` (0.5): warping strength.
- ``grid_rescale`` (1): scale of the final grid (values below 1 shrink the image a little).
- ``noise_ratio`` (2): noise-mode samples per poisoned sample; the poison stage picks them.
- ``seed`` (the experiment seed): read by the poison stage and passed to :func:`build` as ``seed``;
  it draws the warping field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import triggers
from ..kinds import settings_for
from . import PoisonContext
from ..errors import ConfigError


@dataclass(frozen=True)
class WarpTrigger:
    grid: torch.Tensor  # (1, H, H, 2) sampling grid in [−1, 1]
    image_size: int
    noise_ratio: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "wanet")
        return triggers.warp(x, self.grid)

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The noise-mode images: each warped with its own randomly jittered copy of the grid."""
        triggers.check_image_size(x, self.image_size, "wanet")
        return triggers.warp(x, triggers.noise_grid_for(self.grid, x.shape[0], generator))


def _number(settings: dict, key: str, minimum: float, integer: bool = False, strict: bool = False):
    value = settings[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(f"trigger.{key}: expected {'an integer' if integer else 'a number'} {bound}, got {value!r}")
    return value


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> WarpTrigger:
    settings = settings_for(__name__, spec)["trigger"]
    k = _number(settings, "k", 1, integer=True)
    s = float(_number(settings, "s", 0.0))
    grid_rescale = float(_number(settings, "grid_rescale", 0.0, strict=True))
    noise_ratio = float(_number(settings, "noise_ratio", 0.0))
    noise_grid, identity_grid = triggers.wanet_grids(k, image_size, triggers.seeded_generator(seed))
    return WarpTrigger(triggers.warp_grid(identity_grid, noise_grid, s, grid_rescale), image_size, noise_ratio)
