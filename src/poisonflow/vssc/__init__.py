"""The VSSC attack's three pluggable modules: trigger proposal, trigger insertion, quality check.

Each module is a small registry of backends, ``name → "module:function"``, imported only when a
config names it (the diffusion and detection backends pull in diffusers and transformers):

- **insertion** (:data:`INSERTERS`): ``build(settings, image_size, device, key) -> Inserter``;
  ``Inserter.insert(image, category, trigger, rng)`` returns the uint8 (H, W, 3) image with the
  trigger object edited in. Every random editing argument (position, scale, seed of the diffusion
  noise, guidance jitter …) is drawn from ``rng``, so a retry with a new generator is a new edit and
  the same generator gives the same edit.
- **quality check** (:data:`CHECKS`): ``build(settings, device, key) -> QualityCheck``;
  ``QualityCheck.check(images, categories, trigger)`` returns a bool per image: does it show both
  the category's object and the trigger.
- **proposal** (:data:`PROPOSERS`): ``propose(settings, classes, key) -> list[str]``: candidate text
  triggers for a dataset's class names (a language model asked with the paper's selection criteria).

``settings`` is the backend's own block of the config (``insertion.composite``, ``quality.clip``,
``proposer`` …); a backend fills its defaults and checks its keys with :func:`backend_settings`,
naming ``key`` in its errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    import numpy as np

INSERTERS = Registry("insertion backend", {
    "composite": "poisonflow.vssc.composite:build",
    "diffusion": "poisonflow.vssc.diffusion:build",
})
CHECKS = Registry("quality-check backend", {
    "none": "poisonflow.vssc.quality:build_none",
    "clip": "poisonflow.vssc.quality:build_clip",
    "owlvit": "poisonflow.vssc.owlvit:build",
})
PROPOSERS = Registry("trigger proposer", {
    "openai": "poisonflow.vssc.proposer:propose_openai",
    "transformers": "poisonflow.vssc.proposer:propose_transformers",
})


class Inserter(Protocol):
    def insert(self, image: np.ndarray, category: str, trigger: str, rng: np.random.Generator) -> np.ndarray: ...


class QualityCheck(Protocol):
    def check(self, images: np.ndarray, categories: list[str], trigger: str) -> np.ndarray: ...


def backend_settings(settings: dict | None, defaults: dict, key: str) -> dict:
    """``settings`` merged over ``defaults`` (one level deep); an unknown key is a ConfigError naming
    ``key.<name>``."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (known: {', '.join(sorted(defaults))})")
    return {**defaults, **settings}


def fill_prompt(template: str, key: str, **values: str) -> str:
    """``template`` with ``{category}`` / ``{trigger}`` filled; another placeholder is a ConfigError."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"{key}: cannot fill {template!r} ({error}; placeholders: "
                          f"{', '.join('{' + name + '}' for name in values)})") from error
