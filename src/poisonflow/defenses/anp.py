"""ANP (Adversarial Neuron Pruning, Wu & Wang, NeurIPS 2021): prune the neurons a backdoor hides in.

A neuron here is one channel of a BatchNorm layer (every affine ``BatchNorm1d/2d/3d`` of the
model, found by type, so any architecture works and none is rewritten). Each neuron k with BN
weight γ_k and bias β_k gets a mask m_k ∈ [0, 1] (initialised to 1) and, while the masks are
optimised, a multiplicative perturbation (δ_k, ξ_k): the layer computes

    clean:      x̂·γ_k·m_k + β_k
    perturbed:  x̂·γ_k·(m_k + δ_k) + β_k·(1 + ξ_k)

(x̂ the normalised input). The mask scales the weight only, not the bias. The layers are not
replaced: each forward passes the scaled γ and β to the unchanged model through
``torch.func.functional_call``.

Mask optimisation, ``iterations`` steps (official: 2000), each on ``batch_size`` (128) clean
images drawn with replacement from the defender's clean split (augmented with the image
augmentations of the victim's training, as the official code crops and flips):

1. δ, ξ start uniform in [−ε, ε] (ε = 0.4), then take ``steps`` (1) ascent steps of size ε/steps
   along the sign of the gradient of the cross entropy with the perturbation applied;
2. the masks take one SGD step (lr 0.2, momentum 0.9) on α·L_nat + (1−α)·L_adv (α = 0.2), the
   cross entropy without and with the perturbation, and are clipped to [0, 1].

The model runs in training mode during this phase (batch statistics in BatchNorm), as in the
official code, on a working copy whose weights are frozen. As there, the ascent step is not
projected back onto [−ε, ε], so a perturbation can reach 2ε after one step; with ε = 0 the
perturbation is skipped and the masks descend on α·L_nat.

Pruning: ``pruning_by: threshold`` prunes every neuron whose mask is at most ``threshold``
(0.2, the paper's value; the official pruning script sweeps thresholds), ``number`` the
``number`` neurons with the smallest masks over all layers (ties in layer order). Pruning sets the
neuron's BN weight γ_k to 0 in a copy of the victim (its bias stays, as in the official pruning);
the masks themselves are not kept. The victim is not changed.

Defaults are the official ``optimize_mask_cifar.py`` / ``prune_neuron_cifar.py`` arguments
(csdongxian/ANP_backdoor). Simplification: batches come from the project's seeded generator
rather than a data loader; the official code's periodic test-set evaluation is not done.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import augment
from ..errors import ConfigError
from ..kinds import settings_for
from ..progress import bar
from ..trainer import descend, images_to_tensor, to_float
from . import DefenseContext, DefenseResult
from .clean_data import clean_split

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LOSS_WINDOW = 100  # the reported final losses are means over at most this many last iterations


def neuron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every affine BatchNorm layer of ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, BATCH_NORMS) and module.affine]


def neuron_parameters(layers: list[tuple[str, nn.Module]], masks: list[torch.Tensor],
                      weight_noise: list[torch.Tensor] | None = None,
                      bias_noise: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """BN weights and biases as ANP sees them: γ·m and β unperturbed; γ·(m + δ) and β·(1 + ξ) with
    the perturbation (δ = ``weight_noise``, ξ = ``bias_noise``, one tensor per layer)."""
    out: dict[str, torch.Tensor] = {}
    for i, (name, layer) in enumerate(layers):
        weight_scale = masks[i] if weight_noise is None else masks[i] + weight_noise[i]
        out[f"{name}.weight"] = layer.weight * weight_scale
        out[f"{name}.bias"] = layer.bias if bias_noise is None else layer.bias * (1.0 + bias_noise[i])
    return out


def neuron_forward(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, masks: list[torch.Tensor],
                   weight_noise: list[torch.Tensor] | None = None,
                   bias_noise: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``model(x)`` with its BN parameters replaced per :func:`neuron_parameters`."""
    return functional_call(model, neuron_parameters(layers, masks, weight_noise, bias_noise), (x,))


def perturb_neurons(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, y: torch.Tensor,
                    masks: list[torch.Tensor], eps: float, steps: int,
                    generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The neuron perturbation (δ, ξ) that raises the cross entropy on (x, y): a uniform start in
    [−ε, ε], then ``steps`` steps of ε/steps along the gradient's sign (no projection)."""
    device = x.device
    frozen = [mask.detach() for mask in masks]
    weight_noise = [augment.to_device(torch.rand(m.shape, generator=generator) * 2 * eps - eps, device) for m in masks]
    bias_noise = [augment.to_device(torch.rand(m.shape, generator=generator) * 2 * eps - eps, device) for m in masks]
    for _ in range(steps):
        noise = [t.requires_grad_(True) for t in weight_noise + bias_noise]
        loss = F.cross_entropy(neuron_forward(model, layers, x, frozen, weight_noise, bias_noise), y)
        grads = torch.autograd.grad(loss, noise)
        with torch.no_grad():
            stepped = [t + (eps / steps) * g.sign() for t, g in zip(noise, grads)]
        weight_noise, bias_noise = stepped[:len(masks)], stepped[len(masks):]
    return weight_noise, bias_noise


def batch_augmenter(training: dict) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The victim training's image augmentations (mixing ones dropped) for a uint8 batch."""
    names = [name for name in training.get("augment") or [] if name in augment.IMAGE_AUGMENTATIONS]
    settings = {key: training[key] for key in augment.AUGMENT_KEYS if key in training}
    padding = int(settings.get("crop_padding", augment.DEFAULTS["crop_padding"]))
    return lambda x, generator: augment.apply(names, x, generator, padding, settings)


def optimize_masks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: dict, *, seed: int,
                   augmenter: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
                   ) -> tuple[list[torch.Tensor], dict]:
    """ANP's masks (one tensor per :func:`neuron_layers` entry, values in [0, 1]) for ``model`` on
    uint8 NCHW ``images`` already on the model's device. ``model`` is used in training mode with
    frozen weights; pass a copy (its BatchNorm running statistics move). Returns the masks and the
    mean natural / perturbed losses over the last iterations."""
    layers = neuron_layers(model)
    if not layers:
        raise ValueError("ANP needs a model with BatchNorm layers: it has none")
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    device = images.device
    generator = torch.Generator().manual_seed(seed)
    masks = [torch.ones(layer.num_features, device=device, requires_grad=True) for _, layer in layers]
    optimizer = torch.optim.SGD(masks, lr=float(settings["lr"]), momentum=float(settings["momentum"]))
    eps, steps, alpha = float(settings["eps"]), int(settings["steps"]), float(settings["alpha"])
    iterations, batch_size = int(settings["iterations"]), int(settings["batch_size"])
    natural_losses, robust_losses = [], []
    progress = bar(range(iterations), desc="anp masks", unit="it")
    for _ in progress:
        index = augment.to_device(torch.randint(0, len(images), (batch_size,), generator=generator), device)
        x, y = images[index], labels[index]
        x = to_float(augmenter(x, generator) if augmenter is not None else x)
        if eps > 0:
            weight_noise, bias_noise = perturb_neurons(model, layers, x, y, masks, eps, steps, generator)
            robust = F.cross_entropy(neuron_forward(model, layers, x, masks, weight_noise, bias_noise), y)
        else:
            robust = torch.zeros((), device=device)
        natural = F.cross_entropy(neuron_forward(model, layers, x, masks), y)
        descend(optimizer, alpha * natural + (1 - alpha) * robust, model)  # the trainer's step, on the masks
        with torch.no_grad():
            for mask in masks:
                mask.clamp_(0.0, 1.0)
        natural_losses.append(natural.detach())
        robust_losses.append(robust.detach())
        if len(natural_losses) > LOSS_WINDOW:
            natural_losses.pop(0)
            robust_losses.pop(0)
    progress.close()
    losses = {"final_natural_loss": float(torch.stack(natural_losses).mean()),
              "final_perturbed_loss": float(torch.stack(robust_losses).mean())}
    return [mask.detach() for mask in masks], losses


def at_or_below(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool: the neurons whose mask is at most ``threshold``."""
    return values <= threshold


def smallest(values: torch.Tensor, number: int) -> torch.Tensor:
    """bool: the ``number`` neurons with the smallest masks (ties: the earlier neuron first)."""
    selected = torch.zeros_like(values, dtype=torch.bool)
    selected[torch.argsort(values, stable=True)[:number]] = True
    return selected


# pruning_by → (selection over the concatenated masks, the key holding its value)
PRUNING_RULES: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], str]] = {
    "threshold": (at_or_below, "threshold"),
    "number": (smallest, "number"),
}


def pruned_neurons(masks: list[torch.Tensor], pruning_by: str, value) -> list[torch.Tensor]:
    """Per layer, bool: which neurons the rule prunes (the rule sees all layers' masks at once)."""
    select, _ = PRUNING_RULES[pruning_by]
    flat = torch.cat([mask.flatten() for mask in masks])
    return list(torch.split(select(flat, value), [mask.numel() for mask in masks]))


@torch.no_grad()
def prune(layers: list[tuple[str, nn.Module]], selected: list[torch.Tensor]) -> None:
    """Zero the BN weight of every selected neuron in place (biases are kept)."""
    for (_, layer), chosen in zip(layers, selected):
        layer.weight[chosen.to(layer.weight.device)] = 0.0


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'anp' needs the victim model")
    resolved = settings_for(__name__, spec)
    pruning_by = resolved["pruning_by"]
    value = resolved[PRUNING_RULES[pruning_by][1]]
    if value is None:
        raise ConfigError(f"anp.{PRUNING_RULES[pruning_by][1]}: needed when pruning_by is {pruning_by}")
    index = clean_split(len(ctx.reserve_labels), float(resolved["clean_fraction"]), ctx.seed)
    images = images_to_tensor(ctx.reserve_images[index], ctx.device)
    labels = torch.as_tensor(np.asarray(ctx.reserve_labels[index]), dtype=torch.long, device=ctx.device)

    working = copy.deepcopy(ctx.victim).to(ctx.device)
    augmenter = batch_augmenter(ctx.training) if resolved["augment"] else None
    masks, losses = optimize_masks(working, images, labels, resolved, seed=ctx.seed, augmenter=augmenter)
    del working

    model = copy.deepcopy(ctx.victim).to(ctx.device)
    selected = pruned_neurons(masks, pruning_by, value)
    prune(neuron_layers(model), selected)
    flat = torch.cat(masks)
    metrics = {"clean_samples": len(index), "neurons": int(flat.numel()),
               "pruned_neurons": int(sum(int(s.sum()) for s in selected)),
               "mask_mean": float(flat.mean()), "mask_min": float(flat.min()), **losses}
    return DefenseResult(model=model.eval(), metrics=metrics)
