"""Blended: every poisoned image is mixed with one fixed full-size pattern, (1 − α)·x + α·pattern.

``trigger:`` keys (defaults in ``blended.yaml`` beside this module):

- ``alpha`` (0.2): the pattern's weight α, in [0, 1] (the hard-sample paper's Blended-C uses 0.2;
  A-ABL and GSSD use 0.1).
- ``pattern`` (``noise``): ``noise`` (one uniform-noise image of the dataset's image size drawn
  from the attack seed) or ``image`` (the file at ``path``).
- ``path`` (none): an image file for ``pattern: image`` (any format PIL reads; converted to RGB
  and resized bilinearly to the image size). Relative paths are taken from the working
  directory, i.e. the workflow directory when Snakemake runs the stage. A missing or
  unreadable file is a ConfigError naming ``trigger.path``.
- ``seed`` (the experiment seed): read by the poison stage and passed to :func:`build` as ``seed``;
  it draws the ``noise`` pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import triggers
from ..kinds import settings_for
from . import PoisonContext
from ..errors import ConfigError


@dataclass(frozen=True)
class BlendTrigger:
    pattern: torch.Tensor  # (3, image_size, image_size) in [0, 1]
    alpha: float
    image_size: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "blended")
        return triggers.blend(x, self.pattern, self.alpha)


def _noise(settings: dict, image_size: int, seed: int) -> torch.Tensor:
    return triggers.noise_pattern(image_size, triggers.seeded_generator(seed))


def _image(settings: dict, image_size: int, seed: int) -> torch.Tensor:
    if not settings.get("path"):
        raise ConfigError("trigger.path: required when trigger.pattern is 'image'")
    return triggers.image_pattern(settings["path"], image_size)


BLEND_PATTERNS = {"noise": _noise, "image": _image}


def _alpha(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"trigger.alpha: expected a number in [0, 1], got {value!r}")
    return float(value)


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> BlendTrigger:
    settings = settings_for(__name__, spec)["trigger"]
    alpha = _alpha(settings["alpha"])
    name = settings["pattern"]
    if name not in BLEND_PATTERNS:
        raise ConfigError(f"trigger.pattern: unknown blend pattern {name!r} (known: {', '.join(BLEND_PATTERNS)})")
    return BlendTrigger(BLEND_PATTERNS[name](settings, image_size, seed), alpha, image_size)
