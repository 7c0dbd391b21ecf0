"""Label-consistent backdoor (LC): adversarial perturbation away from the true class, then a trigger.

A poisoned training image keeps its (target-class) label. To make the model rely on the trigger,
the image's own class evidence is first weakened: ℓ∞ PGD on an adversarially trained surrogate
*raises* the cross entropy of the image's true label, within ``eps`` of the clean image. A robust
surrogate matters: its adversarial perturbations change class-relevant ("robust") features,
whereas a standard model's perturbations are imperceptible noise that a victim ignores. The
trigger — a small patch stamped in each of the four corners — is added after the perturbation,
so its pixels are exact. At test time only the trigger is stamped (:meth:`apply`).

The surrogate is the entry's ``surrogate:`` (a ``surrogates:`` entry whose training sets
``adversarial:``); the poison stage loads it into ``PoisonContext.surrogate``. A surrogate trained
without ``adversarial:`` is accepted with a warning (an ablation, not the attack as published).

``trigger:`` keys (defaults in ``lc.yaml`` beside this module):

- ``pattern`` (``checkerboard``): ``checkerboard`` (size 3: [[0,0,1],[0,1,0],[1,0,1]], 1 = white),
  ``white`` (the hard-sample paper's "four-corner all-white" trigger), ``black``, or ``random``
  (one noise patch drawn from the attack seed); see :func:`poisonflow.triggers.patch_pattern`.
- ``size`` (3): each corner patch is ``size``×``size`` pixels.
- ``margin`` (0): pixels between each patch and the image border.
- ``seed`` (the experiment seed): read by the poison stage and passed to :func:`build`; it draws
  the ``random`` pattern and PGD's random start.

``perturbation:`` keys (defaults in ``lc.yaml``; pixel scale [0, 1]):

- ``eps`` (8/255, the hard-sample paper; other papers use 16/255): ℓ∞ budget.
- ``step`` (2/255): PGD step size (one paper uses 1.5/255).
- ``steps`` (30): PGD iterations.
- ``random_start`` (false): start from a uniform point in the ε-ball (drawn from the attack seed)
  instead of the clean image.
- ``batch_size`` (256): images attacked at once (memory, not results).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import triggers
from ..adversarial import pgd
from ..errors import ConfigError
from ..kinds import settings_for
from . import PoisonContext


CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True, eq=False)
class LabelConsistentTrigger:
    surrogate: torch.nn.Module  # adversarially trained, eval mode
    patch: torch.Tensor  # (3, size, size) in [0, 1]
    corners: tuple[tuple[int, int], ...]  # top-left (row, col) of each corner patch
    image_size: int
    eps: float
    step: float
    steps: int
    batch_size: int
    generator: torch.Generator | None  # PGD's random start; None = start from the clean image
    device: torch.device

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: the patch in each corner, every other pixel unchanged."""
        triggers.check_image_size(x, self.image_size, "lc")
        return stamp_corners(x, self.patch, self.corners)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` moved away from its true labels ``y`` on the surrogate, ‖δ‖∞ ≤ eps (no trigger)."""
        triggers.check_image_size(x, self.image_size, "lc")
        return perturb_away_from_labels(self.surrogate, x, y, self.eps, self.step, self.steps,
                                        self.batch_size, self.generator, self.device)

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A poisoned training sample: the adversarial perturbation, then the trigger on top."""
        return self.apply(self.perturb(x, y))


def corner_positions(size: int, image_size: int, margin: int) -> tuple[tuple[int, int], ...]:
    """Top-left (row, col) of a ``size``×``size`` patch in each of the four corners."""
    return tuple(triggers.patch_position(corner, size, image_size, image_size, margin) for corner in CORNERS)


def stamp_corners(x: torch.Tensor, patch: torch.Tensor, corners) -> torch.Tensor:
    """``x`` with ``patch`` pasted at every (row, col) of ``corners``."""
    for row, col in corners:
        x = triggers.stamp_patch(x, patch, row, col)
    return x


def perturb_away_from_labels(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
                             steps: int, batch_size: int, generator: torch.Generator | None,
                             device) -> torch.Tensor:
    """Untargeted ℓ∞ PGD (raise the cross entropy of ``y``) in batches on ``device``; result on x's device."""
    out = torch.empty_like(x)
    y = torch.as_tensor(y, dtype=torch.long)
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        adversarial = pgd(model, xb, yb, eps, step, steps, random_start=generator is not None, generator=generator)
        out[start:start + batch_size] = adversarial.to(x.device)
    return out


def entry_key(context: PoisonContext | None) -> str:
    """The config key of the attack entry, for messages (``attacks.<name>`` where the caller says so)."""
    return context.extra.get("key", "attack") if context is not None else "attack"


def robust_surrogate(spec: dict, context: PoisonContext | None) -> torch.nn.Module:
    """The context's surrogate; missing is a ConfigError, one trained without ``adversarial:`` a warning."""
    if context is None or context.surrogate is None:
        raise ConfigError(
            f"{entry_key(context)}.surrogate: an lc attack perturbs images on a surrogate model; name a "
            "surrogates entry whose training sets `adversarial:`")
    training = (spec.get("surrogate_entry") or {}).get("training") or {}
    if "surrogate_entry" in spec and not training.get("adversarial"):
        warnings.warn(f"{entry_key(context)}.surrogate: surrogate '{spec.get('surrogate')}' is not adversarially "
                      "trained; LC as published perturbs images on a robust model", stacklevel=3)
    return context.surrogate


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> LabelConsistentTrigger:
    settings = settings_for(__name__, spec)
    trigger, perturbation = settings["trigger"], settings["perturbation"]
    surrogate = robust_surrogate(spec, context)
    patch = triggers.patch_pattern(trigger["pattern"], trigger["size"], triggers.seeded_generator(seed))
    corners = corner_positions(trigger["size"], image_size, trigger["margin"])
    # a separate stream from the pattern's, so turning random_start on does not change the patch
    generator = triggers.seeded_generator(seed + 1) if perturbation["random_start"] else None
    return LabelConsistentTrigger(
        surrogate, patch, corners, image_size, float(perturbation["eps"]), float(perturbation["step"]),
        int(perturbation["steps"]), int(perturbation["batch_size"]), generator, torch.device(context.device))
