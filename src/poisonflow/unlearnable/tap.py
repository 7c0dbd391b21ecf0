"""TAP: targeted adversarial poisoning (Fowl, Goldblum, Chiang, Geiping, Czaja and Goldstein,
"Adversarial Examples Make Strong Poisons", NeurIPS 2021).

Every training image becomes a *targeted* adversarial example of a model trained on clean data:
class y is pushed toward class π(y) = (y + 1) mod K, a fixed permutation. The perturbations carry
features of the wrong class that a victim learns as if they were features of the labelled class,
and it then fails on clean test images.

δ starts at ε·N(0, 1) clipped to [−ε, ε] and takes ``steps`` ℓ∞ sign-gradient steps that lower
the cross entropy toward π(y) of the clean surrogate (the entry's ``surrogate:``, eval mode), each
through a fresh random crop/flip of x + δ (differentiable augmentation, so the perturbation
survives the victim's augmentation). With ``restarts`` > 1 the whole dataset is crafted several
times from different starts and the restart whose final target loss (on un-augmented images) is
lowest is kept.

Keys (defaults in ``tap.yaml`` beside this module, the paper's CIFAR-10 settings): ``eps`` 8/255, ``step``
0.4/255 (ε/20), ``steps`` 250, ``restarts`` 1, ``augment`` [crop, flip], ``crop_padding`` 4,
``batch_size`` 512 (images crafted at once). Cost: ``steps`` × ``restarts`` forward-backward passes
over the protected set on the surrogate; on a CPU, 20–50 ``steps`` with ``step`` ≈ ε/8 keep most of
the effect.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..kinds import settings_for
from .common import (add_perturbation, augmentation, batch_slices, class_count, cross_entropy_objective,
                     images_to_float, model_device, normal_start, require_surrogate, seeded_generator, sign_gradient_steps)


def target_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The fixed permutation π(y) = (y + 1) mod K."""
    return (labels + 1) % num_classes


def targeted_perturbations(model, x: torch.Tensor, y: torch.Tensor, num_classes: int, settings: dict,
                           generator: torch.Generator) -> torch.Tensor:
    """One restart: δ for every image, lowering the loss toward π(y) under random augmentation."""
    transform = augmentation(settings["augment"], settings["crop_padding"], generator)
    delta = torch.empty_like(x)
    for part in batch_slices(len(y), settings["batch_size"]):
        objective = cross_entropy_objective(model, target_classes(y[part], num_classes), transform)
        start = normal_start(x[part], settings["eps"], generator)
        delta[part] = sign_gradient_steps(x[part], start, objective, settings["eps"], settings["step"],
                                          settings["steps"], ascend=False)
    return delta


@torch.no_grad()
def target_loss(model, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int) -> float:
    """Mean cross entropy toward π(y) on the un-augmented images ``x``: how well a restart did."""
    total = sum(float(F.cross_entropy(model(x[part]), target_classes(y[part], num_classes), reduction="sum"))
                for part in batch_slices(len(y), batch_size))
    return total / max(1, len(y))


def targeted_adversarial_noise(model, images: np.ndarray, labels: np.ndarray, num_classes: int, settings: dict,
                               seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """δ of the best of ``restarts`` crafting runs on the surrogate ``model``."""
    model.eval()
    x = images_to_float(images, device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=x.device)
    best, best_loss = None, float("inf")
    for restart in range(int(settings["restarts"])):
        delta = targeted_perturbations(model, x, y, num_classes, settings, seeded_generator(seed, restart))
        loss = target_loss(model, x + delta, y, num_classes, settings["batch_size"])
        if loss < best_loss:
            best, best_loss = delta, loss
    return best


def protect(spec: dict, images: np.ndarray, labels: np.ndarray, context, seed: int) -> np.ndarray:
    settings = settings_for(__name__, spec)
    model = require_surrogate(context, "tap")
    delta = targeted_adversarial_noise(model, images, labels, class_count(labels, context), settings, seed,
                                       model_device(model, context))
    return add_perturbation(images, delta)
