"""REM: robust error-minimizing noise (Fu, He, Liu, Shen and Tao, "Robust Unlearnable Examples:
Protecting Data Against Adversarial Learning", ICLR 2022).

EM's noise stops working once the victim trains adversarially, because an adversarial
perturbation ρ can undo it. REM makes the noise minimize the loss *under* that perturbation and
under the victim's augmentations t (expectation over ``eot_samples`` draws):

    min_θ Σ_i min_{‖δ_i‖∞ ≤ ε} E_t max_{‖ρ_i‖∞ ≤ ε_a} L(f_θ(t(x_i + δ_i) + ρ_i), y_i).

Generation, from δ = 0: for ``train_steps`` minibatches, every ``perturb_every``-th step updates the
batch's δ by ``steps`` sign-gradient steps of the inner min-max (ρ by ``adv_steps`` steps of PGD
from a uniform start, computed anew for every gradient of δ), then the source model takes one SGD
step of adversarial training on t(x + δ) + ρ (learning rate × ``lr_decay`` every ``lr_decay_every``
steps). At the end, δ is generated afresh for every sample on the final source model. The model is
checkpointed in ``context.workdir`` every :data:`CHECKPOINT_EVERY` steps.

Keys (defaults in ``rem.yaml`` beside this module, the paper's CIFAR-10 settings): ``model``
``{arch: resnet18, width: 64}``, ``eps`` 8/255, ``step`` 1.6/255, ``steps`` 10, ``adv_eps`` 4/255
(ε_a; the paper uses ε_a ≤ ε), ``adv_step`` 0.8/255, ``adv_steps`` 10, ``eot_samples`` 5,
``augment`` [crop, flip] with ``crop_padding`` 4, ``train_steps`` 5000, ``perturb_every`` 1,
``batch_size`` 128, ``lr`` 0.1, ``momentum`` 0.9, ``weight_decay`` 5e-4, ``lr_decay`` 0.1,
``lr_decay_every`` 2000.

Cost: each δ update costs ``steps`` × ``eot_samples`` × (``adv_steps`` + 1) forward-backward passes,
hundreds of times EM's. On a CPU use a small ``model`` (convnet, width 8), ``train_steps`` of a few
dozen, ``steps`` 3–5, ``adv_steps`` 2–3, ``eot_samples`` 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..kinds import settings_for
from .common import (BatchCycler, add_perturbation, augmentation, batch_slices, build_surrogate, class_count,
                     context_device, cpu_state, cross_entropy_objective, generation_checkpoint, images_to_float,
                     seeded_generator, sgd, sign_gradient_steps, train_step,
                     uniform_start)


CHECKPOINT_EVERY = 50  # source-model steps between checkpoints: a resumed job loses at most this many


@dataclass
class Generation:
    delta: torch.Tensor  # (N, 3, H, W) float perturbations
    model: torch.nn.Module  # the source model at the end of the generation
    steps: int


def adversarial_perturbation(model, x: torch.Tensor, y: torch.Tensor, settings: dict,
                             generator: torch.Generator) -> torch.Tensor:
    """ρ: PGD (from a uniform start) that raises the eval-mode model's loss on ``x``, ‖ρ‖∞ ≤ ε_a."""
    start = uniform_start(x, settings["adv_eps"], generator)
    return sign_gradient_steps(x, start, cross_entropy_objective(model, y), settings["adv_eps"],
                               settings["adv_step"], settings["adv_steps"], ascend=True)


def robust_objective(model, y: torch.Tensor, settings: dict, generator: torch.Generator):
    """z ↦ Σ_t L(f(t(z) + ρ_t), y): the loss under augmentation and the adversary, as a function of z = x + δ.

    ρ_t is found on the detached t(z), so the gradient reaches δ through t(z) only (Danskin).
    """
    transform = augmentation(settings["augment"], settings["crop_padding"], generator) or (lambda z: z)

    def objective(z: torch.Tensor) -> torch.Tensor:
        total = z.new_zeros(())
        for _ in range(int(settings["eot_samples"])):
            view = transform(z)
            rho = adversarial_perturbation(model, view.detach(), y, settings, generator)
            total = total + F.cross_entropy(model(view + rho), y, reduction="sum")
        return total
    return objective


def robust_error_minimizing(model, x: torch.Tensor, y: torch.Tensor, settings: dict,
                            generator: torch.Generator) -> torch.Tensor:
    """δ for a batch: sign-gradient descent on the min-max objective from a uniform start."""
    model.eval()
    start = uniform_start(x, settings["eps"], generator)
    return sign_gradient_steps(x, start, robust_objective(model, y, settings, generator), settings["eps"],
                               settings["step"], settings["steps"], ascend=False)


def adversarial_training_step(model, optimizer, x, y, settings: dict, generator: torch.Generator) -> float:
    """One step of the source model on t(x + δ) + ρ (the batch ``x`` already carries δ)."""
    transform = augmentation(settings["augment"], settings["crop_padding"], generator)
    view = transform(x) if transform else x
    model.eval()
    adversarial = view + adversarial_perturbation(model, view, y, settings, generator)
    return train_step(model, optimizer, adversarial, y)


def set_learning_rate(optimizer, settings: dict, step: int) -> None:
    lr = float(settings["lr"]) * float(settings["lr_decay"]) ** (step // int(settings["lr_decay_every"]))
    for group in optimizer.param_groups:
        group["lr"] = lr


def robust_error_minimizing_noise(images: np.ndarray, labels: np.ndarray, settings: dict, num_classes: int,
                                  seed: int, device: torch.device | str = "cpu", checkpoint=None) -> Generation:
    """Train the source model with batch-wise noise updates, then generate δ for every sample."""
    x = images_to_float(images, device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=x.device)
    model = build_surrogate(settings["model"], num_classes, x.shape[-1], seed, x.device)
    optimizer = sgd(model, settings["lr"], settings["momentum"], settings["weight_decay"])
    cycler = BatchCycler(len(y), settings["batch_size"], seeded_generator(seed, 1))
    generator = seeded_generator(seed, 2)
    delta = torch.zeros_like(x)
    start = 0
    state = checkpoint.load() if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        cycler.load_state_dict(state["cycler"])
        generator.set_state(state["generator"])
        delta, start = state["delta"].to(x.device), int(state["step"])
    total = int(settings["train_steps"])
    for step in range(start, total):
        set_learning_rate(optimizer, settings, step)
        index = cycler.next().to(x.device)
        if (step + 1) % int(settings["perturb_every"]) == 0:
            delta[index] = robust_error_minimizing(model, x[index], y[index], settings, generator)
        adversarial_training_step(model, optimizer, x[index] + delta[index], y[index], settings, generator)
        if checkpoint and ((step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == total):
            checkpoint.save({"model": cpu_state(model), "optimizer": cpu_state(optimizer),
                             "cycler": cycler.state_dict(), "generator": generator.get_state(),
                             "delta": delta.cpu(), "step": step + 1})
    final = torch.empty_like(x)
    for part in batch_slices(len(y), settings["batch_size"]):
        final[part] = robust_error_minimizing(model, x[part], y[part], settings, generator)
    model.eval()
    return Generation(final, model, total)


def protect(spec: dict, images: np.ndarray, labels: np.ndarray, context, seed: int) -> np.ndarray:
    settings = settings_for(__name__, spec)
    checkpoint = generation_checkpoint(context, "rem", settings, seed, images, labels)
    generation = robust_error_minimizing_noise(images, labels, settings, class_count(labels, context), seed,
                                               context_device(context), checkpoint)
    return add_perturbation(images, generation.delta)
