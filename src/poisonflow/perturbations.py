"""Test-time perturbations that need the model: iFGSM against a victim's own predictions, as a
robustness axis (A-ABL Figs. 3 and 5: how much of a backdoor survives an adversarial budget).

A robustness entry of one of these kinds scores a victim on adversarial versions of the clean test
set and of the ASR set, one row per level:

- ``ifgsm`` — level: the ℓ∞ budget ε on the 0–255 scale (default levels 0, 1, 2, 4, 8, 16; 0 is no
  perturbation), with ``steps`` iFGSM steps of ε/steps (settings ``steps`` 5 and ``step`` null, the
  A-ABL split's iFGSM: ε 2/255, 5 steps);
- ``ifgsm-steps`` — level: the number of iFGSM steps (default 0, 1, 2, 5, 10, 20; 0 is none), at
  the budget ``eps`` (2, on the 0–255 scale), step ε/steps.

Each image is perturbed to raise the cross entropy of the label it is scored against: a clean test
image away from its true class (ACC under attack), a triggered image away from the attack's target
(the ASR that survives: the trigger's adversarial robustness, A-ABL's Category A vs B). RA counts
the triggered images the perturbation sends back to their true class. The model is in eval mode and
the perturbed images are scored as floats (not rounded to uint8, which would undo a sub-grey-level
budget). This module holds the kinds, their levels and checks (light: the workflow reads them when
it parses the config); the scoring is the robustness stage's, with
:func:`poisonflow.evaluate.predictions_under`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Perturbation:
    name: str
    level: str  # what a level means (docs and errors)
    levels: tuple  # the default levels
    defaults: dict = field(default_factory=dict)
    budget: Callable[[float, dict], tuple[float, int]] = None  # (level, settings) → (eps in [0, 1], steps)
    integer: bool = False

    def check_entry(self, entry: dict, key: str) -> dict:
        """The entry's settings with defaults filled; its levels and settings checked."""
        settings = dict(entry.get("settings") or {})
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ConfigError(f"{key}.settings.{unknown[0]}: unknown key (known: {', '.join(sorted(self.defaults))})")
        filled = {**self.defaults, **settings}
        for name, value in filled.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"{key}.settings.{name}: expected a non-negative number, got {value!r}")
        if int(filled.get("steps", 1)) != filled.get("steps", 1) or filled.get("steps", 1) < 1:
            raise ConfigError(f"{key}.settings.steps: expected a positive integer, got {filled['steps']!r}")
        for index, level in enumerate(entry.get("levels") or self.levels):
            if level < 0 or (self.integer and int(level) != level):
                what = "a non-negative integer" if self.integer else "a non-negative number"
                raise ConfigError(f"{key}.levels[{index}]: {self.level} must be {what}, got {level!r}")
        return filled


def _eps_budget(level: float, settings: dict) -> tuple[float, int]:
    return level / 255.0, int(settings["steps"])


def _steps_budget(level: float, settings: dict) -> tuple[float, int]:
    return float(settings["eps"]) / 255.0, int(level)


PERTURBATIONS: dict[str, Perturbation] = {
    "ifgsm": Perturbation("ifgsm", "ε on the 0–255 scale", (0, 1, 2, 4, 8, 16), {"steps": 5, "step": None},
                          _eps_budget),
    "ifgsm-steps": Perturbation("ifgsm-steps", "the number of iFGSM steps", (0, 1, 2, 5, 10, 20),
                                {"eps": 2.0, "step": None}, _steps_budget, integer=True),
}
