"""EM: sample-wise error-minimizing noise (Huang, Ma, Erfani, Bailey and Wang, "Unlearnable
Examples: Making Personal Data Unexploitable", ICLR 2021).

A min-min bi-level problem, min_θ Σ_i min_{‖δ_i‖∞ ≤ ε} L(f_θ(x_i + δ_i), y_i), solved by
alternation from δ uniform in [−ε, ε]:

1. train a fresh surrogate (the entry's ``model``) for ``train_steps`` minibatches on x + δ
   (SGD, gradient norm clipped);
2. update every δ_i by ``steps`` sign-gradient steps that *lower* the surrogate's loss
   (the previous δ is the starting point);
3. stop when the surrogate's accuracy on x + δ reaches ``stop_accuracy`` (or after ``max_rounds``).

The noise is then the shortcut: it alone explains the labels, so a model trained on x + δ learns
little about x. Each round is checkpointed in ``context.workdir``.

Keys (defaults in ``em.yaml`` beside this module, the paper's CIFAR-10 settings): ``model`` (a models entry,
``{arch: resnet18, width: 64}``), ``eps`` 8/255, ``step`` 0.8/255, ``steps`` 20, ``train_steps`` 10,
``stop_accuracy`` 0.99, ``max_rounds`` 50 (a cap the paper does not have), ``batch_size`` 128,
``lr`` 0.1, ``momentum`` 0.9, ``weight_decay`` 5e-4, ``grad_clip`` 5.0. On a CPU, a small surrogate
(``model: {arch: convnet, width: 8}``) and fewer ``steps`` keep a generation to minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..kinds import settings_for
from .common import (BatchCycler, accuracy, add_perturbation, batch_slices, build_surrogate, class_count,
                     context_device, cpu_state, cross_entropy_objective, generation_checkpoint, images_to_float,
                     seeded_generator, sgd, sign_gradient_steps, train_step, uniform_start)


@dataclass
class Generation:
    delta: torch.Tensor  # (N, 3, H, W) float perturbations
    model: torch.nn.Module  # the surrogate at the end of the generation
    rounds: int
    accuracy: float  # the surrogate's accuracy on x + δ after the last round


def minimize_error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                   settings: dict) -> torch.Tensor:
    """Every δ_i moved by sign-gradient steps that lower the (eval-mode) surrogate's loss."""
    model.eval()
    out = delta.clone()
    for part in batch_slices(len(y), settings["batch_size"]):
        out[part] = sign_gradient_steps(x[part], delta[part], cross_entropy_objective(model, y[part]),
                                        settings["eps"], settings["step"], settings["steps"], ascend=False)
    return out


def train_on_perturbed(model, optimizer, x, y, delta, cycler: BatchCycler, settings: dict) -> None:
    for _ in range(int(settings["train_steps"])):
        index = cycler.next().to(x.device)
        train_step(model, optimizer, x[index] + delta[index], y[index], settings["grad_clip"])


def error_minimizing_noise(images: np.ndarray, labels: np.ndarray, settings: dict, num_classes: int, seed: int,
                           device: torch.device | str = "cpu", checkpoint=None) -> Generation:
    """Run the min-min alternation on uint8 ``images``; returns δ and the surrogate."""
    x = images_to_float(images, device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=x.device)
    model = build_surrogate(settings["model"], num_classes, x.shape[-1], seed, x.device)
    optimizer = sgd(model, settings["lr"], settings["momentum"], settings["weight_decay"])
    cycler = BatchCycler(len(y), settings["batch_size"], seeded_generator(seed, 1))
    delta = uniform_start(x, settings["eps"], seeded_generator(seed, 0))
    done, rounds, acc = False, 0, 0.0
    state = checkpoint.load() if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        cycler.load_state_dict(state["cycler"])
        delta = state["delta"].to(x.device)
        rounds, acc, done = int(state["rounds"]), float(state["accuracy"]), bool(state["done"])
    while not done and rounds < int(settings["max_rounds"]):
        train_on_perturbed(model, optimizer, x, y, delta, cycler, settings)
        delta = minimize_error(model, x, y, delta, settings)
        acc = accuracy(model, x + delta, y, settings["batch_size"])
        rounds += 1
        done = acc >= float(settings["stop_accuracy"])
        if checkpoint:
            checkpoint.save({"model": cpu_state(model), "optimizer": cpu_state(optimizer),
                             "cycler": cycler.state_dict(), "delta": delta.cpu(), "rounds": rounds,
                             "accuracy": acc, "done": done})
    model.eval()
    return Generation(delta, model, rounds, acc)


def protect(spec: dict, images: np.ndarray, labels: np.ndarray, context, seed: int) -> np.ndarray:
    settings = settings_for(__name__, spec)
    checkpoint = generation_checkpoint(context, "em", settings, seed, images, labels)
    generation = error_minimizing_noise(images, labels, settings, class_count(labels, context), seed,
                                        context_device(context), checkpoint)
    return add_perturbation(images, generation.delta)
