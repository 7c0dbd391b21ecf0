"""I-BAU (Implicit Backdoor Adversarial Unlearning, Zeng et al., ICLR 2022).

The minimax  min_θ max_{‖δ‖ ≤ C} (1/n) Σ_i L(f_θ(x_i + δ), y_i)  over the defender's clean data,
with δ one universal perturbation (an image-shaped tensor added to every input, pixels in [0, 1]),
solved in ``rounds`` (official: 5) rounds of two parts:

1. Inner maximisation: δ starts at 0 and takes one SGD step (lr 10) per clean batch on
   −CE(f(x + δ), f's own prediction on x) + 0.001·‖δ‖², one pass over the batches; then it is
   projected onto the L2 ball of radius ``norm_bound`` (10, the official notebook; null for none,
   as in the official ``defense.py``).
2. Outer minimisation, one step per batch (Adam, lr 0.001): the outer loss is the cross entropy
   on the batch with δ added to ``perturbed_fraction`` (0.01, rounded down) of its images, picked
   at random. Its gradient in θ is the implicit hypergradient through δ*(θ), the fixed point of
   Φ(δ, θ) = δ − 0.1·∇_δ L_inner(δ, θ) with L_inner = −CE(f(x₀ + δ), y₀) + 0.001·‖δ‖² on the
   first clean batch (x₀, y₀) (as in the official code):

       dL/dθ = ∂L/∂θ + (∂Φ/∂θ)ᵀ v,   v = Σ_{k<K} ((∂Φ/∂δ)ᵀ)ᵏ ∂L/∂δ

   with v found by K (``fixed_point_iterations`` = 5) fixed-point iterations v ← (∂Φ/∂δ)ᵀ v +
   ∂L/∂δ from v = 0 (stopping early when an iteration moves v by less than 1e-10), each a
   Hessian-vector product through the model.

The model stays in eval mode throughout (BatchNorm uses its running statistics, which do not
change), as in the official code; every parameter is updated. Perturbed images are not clipped to
[0, 1] (official). Defaults: the official ``defense.py`` arguments, ``hypergrad.py`` and the
CIFAR-10 notebook (YiZeng623/I-BAU). Simplifications: the clean batches are a seeded permutation of
the clean split in a fixed order (the official loader keeps the test set's order), and the outer
step's perturbed images are drawn from the seeded generator. This loop is a minimax, not a
training on a dataset, so it does not go through the trainer and keeps no checkpoint (a killed
job reruns it: five passes over the clean data).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import augment
from ..kinds import settings_for
from ..progress import bar
from ..trainer import apply_gradients, images_to_tensor, to_float
from . import DefenseContext, DefenseResult
from .clean_data import clean_split

FIXED_POINT_TOLERANCE = 1e-10  # official: the fixed-point iteration stops when v moves less than this

OUTER_OPTIMIZERS: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
}


def project_l2(delta: torch.Tensor, bound: float | None) -> torch.Tensor:
    """``delta`` scaled onto the L2 ball of radius ``bound`` when outside it (None: unchanged)."""
    if bound is None:
        return delta
    norm = float(delta.norm())
    return delta * (bound / norm) if norm > bound else delta


def perturbation_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                      penalty: float) -> torch.Tensor:
    """The inner objective (minimised over δ): −CE(f(x + δ), y) + penalty·‖δ‖²."""
    return -F.cross_entropy(model(x + delta), y) + penalty * delta.pow(2).sum()


def universal_perturbation(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], *, lr: float,
                           penalty: float, bound: float | None) -> tuple[torch.Tensor, float]:
    """One pass of SGD over the uint8 ``batches`` on :func:`perturbation_loss` against the model's
    own predictions, from δ = 0, then projected onto the ``bound`` ball. Returns δ (1, C, H, W) and
    the mean cross entropy the perturbed batches had."""
    first = batches[0][0]
    delta = torch.zeros((1, *first.shape[1:]), device=first.device)
    total = 0.0
    for images, _ in batches:
        x = to_float(images)
        with torch.no_grad():
            predicted = model(x).argmax(dim=1)
        delta.requires_grad_(True)
        loss = perturbation_loss(model, x, predicted, delta, penalty)
        (grad,) = torch.autograd.grad(loss, delta)
        total += penalty * float(delta.detach().pow(2).sum()) - float(loss.detach())  # this batch's CE
        delta = (delta - lr * grad).detach()
    return project_l2(delta, bound), total / len(batches)


def fixed_point_hypergradient(inner: torch.Tensor, outer_params: list[torch.Tensor],
                              fixed_point_map: Callable[[torch.Tensor], torch.Tensor],
                              outer_loss: Callable[[torch.Tensor], torch.Tensor], iterations: int,
                              tolerance: float = FIXED_POINT_TOLERANCE) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The implicit hypergradient of ``outer_loss`` in ``outer_params`` at the inner variable
    ``inner``, taken as the fixed point of ``fixed_point_map`` (a function of the inner variable
    that reads ``outer_params``, differentiable in both).

    v = Σ_{k<K} (Jᵀ)ᵏ g, by ``iterations`` = K steps of v ← Jᵀv + g from v = 0 (J = ∂Φ/∂δ,
    g = ∂L/∂δ; earlier stop when v moves by less than ``tolerance``); the result is
    ∂L/∂θ + (∂Φ/∂θ)ᵀ v per parameter (zeros where neither depends on it). Also returns the outer loss.
    """
    inner = inner.detach().requires_grad_(True)
    loss = outer_loss(inner)
    grads = torch.autograd.grad(loss, [inner, *outer_params], allow_unused=True)
    inner_grad = torch.zeros_like(inner) if grads[0] is None else grads[0]
    direct = [torch.zeros_like(p) if g is None else g for p, g in zip(outer_params, grads[1:])]

    mapped = fixed_point_map(inner)
    v = torch.zeros_like(inner)
    for _ in range(iterations):
        (jvp,) = torch.autograd.grad(mapped, inner, grad_outputs=v, retain_graph=True)
        previous, v = v, jvp + inner_grad
        if float((v - previous).norm()) < tolerance:
            break
    indirect = torch.autograd.grad(mapped, outer_params, grad_outputs=v, allow_unused=True)
    return [d if i is None else d + i for d, i in zip(direct, indirect)], loss.detach()


def descent_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: float,
                penalty: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Φ(δ) = δ − step·∇_δ perturbation_loss(δ) on (x, y), differentiable in δ and in the model."""
    def mapped(delta: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(perturbation_loss(model, x, y, delta, penalty), delta, create_graph=True)
        return delta - step * grad
    return mapped


def patched_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The outer loss: CE(f(x + δ on the ``rows`` (float 0/1 per image))), y)."""
    weights = rows.view(-1, *([1] * (x.dim() - 1)))
    return lambda delta: F.cross_entropy(model(x + weights * delta), y)


def unlearn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: dict, *, seed: int) -> dict:
    """Run I-BAU on ``model`` in place on uint8 NCHW ``images`` (on the model's device); returns
    the last round's numbers."""
    device = images.device
    generator = torch.Generator().manual_seed(seed)
    order = augment.to_device(torch.randperm(len(images), generator=generator), device)
    batch_size = int(settings["batch_size"])
    batches = [(images[order[i:i + batch_size]], labels[order[i:i + batch_size]])
               for i in range(0, len(images), batch_size)]
    first_x, first_y = to_float(batches[0][0]), batches[0][1]

    model.eval()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = OUTER_OPTIMIZERS[settings["optimizer"]](params, float(settings["lr"]))
    penalty = float(settings["perturbation_penalty"])
    fixed_point_map = descent_map(model, first_x, first_y, float(settings["inner_step"]), penalty)
    rounds, fraction = int(settings["rounds"]), float(settings["perturbed_fraction"])
    metrics: dict = {}
    progress = bar(total=rounds * len(batches), desc="i-bau", unit="batch")
    for _ in range(rounds):
        delta, adversarial_ce = universal_perturbation(model, batches, lr=float(settings["perturbation_lr"]),
                                                       penalty=penalty, bound=settings["norm_bound"])
        outer_losses = []
        for images_u8, y in batches:
            x = to_float(images_u8)
            rows = torch.zeros(len(x))
            rows[torch.randperm(len(x), generator=generator)[:int(len(x) * fraction)]] = 1.0
            grads, loss = fixed_point_hypergradient(
                delta, params, fixed_point_map, patched_loss(model, x, y, augment.to_device(rows, device)),
                int(settings["fixed_point_iterations"]))
            apply_gradients(optimizer, params, grads)  # the trainer's step, on the hypergradient
            outer_losses.append(float(loss))
            progress.update(1)
        metrics = {"perturbation_norm": float(delta.norm()), "perturbation_ce": adversarial_ce,
                   "outer_loss": float(np.mean(outer_losses))}
        progress.set_postfix(outer=f"{metrics['outer_loss']:.3f}", adv=f"{adversarial_ce:.3f}")
    progress.close()
    for p in params:
        p.grad = None
    return metrics


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'i-bau' needs the victim model")
    resolved = settings_for(__name__, spec)
    index = clean_split(len(ctx.reserve_labels), float(resolved["clean_fraction"]), ctx.seed)
    images = images_to_tensor(ctx.reserve_images[index], ctx.device)
    labels = torch.as_tensor(np.asarray(ctx.reserve_labels[index]), dtype=torch.long, device=ctx.device)
    model = copy.deepcopy(ctx.victim).to(ctx.device)
    last = unlearn(model, images, labels, resolved, seed=ctx.seed)
    metrics = {"clean_samples": len(index), "rounds": int(resolved["rounds"]), **last}
    return DefenseResult(model=model.eval(), metrics=metrics)
