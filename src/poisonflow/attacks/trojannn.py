"""TrojanNN: a patch trigger optimised on a clean model to drive chosen internal neurons to a high
value, then dirty-label poisoning with it (Liu, Ma, Aafer, Lee, Zhai, Wang and Zhang, "Trojaning
Attack on Neural Networks", NDSS 2018).

The trigger is learned once per dataset by the trigger stage from a ``generators:`` entry of this
kind (:func:`train_generator`) on the entry's clean surrogate: the ``neurons`` penultimate features
with the strongest connections to the classifier (largest Σ|W| over its outputs) are selected,
and the pixels inside the mask are optimised with signed-gradient steps (``steps`` of ``step``,
within ``eps`` of their start, 1 = white, as BackdoorBench does) to minimise Σ (feature − target_value)²
on the mask alone over a black background. Poisoning then pastes the masked trigger into the
chosen images (the paper's stamping; ``stamping: add`` adds it and clips, as BackdoorBench's
data-poisoning variant does, without its uint8 overflow). Keys and defaults: ``trojannn.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import triggers
from ..errors import ConfigError
from ..geometry import patch_position
from ..kinds import settings_for
from . import PoisonContext


def square_mask(size: int, position, margin: int, image_size: int) -> torch.Tensor:
    """(S, S) mask, 1 on a ``size``×``size`` square placed like a BadNets patch."""
    row, col = patch_position(position, size, image_size, image_size, margin)
    mask = torch.zeros(image_size, image_size)
    mask[row:row + size, col:col + size] = 1
    return mask


def strongest_neurons(model: torch.nn.Module, count: int) -> torch.Tensor:
    """Indices of the penultimate features most connected to the classifier: largest Σ_out |W|."""
    weight = model.fc.weight.detach().abs()
    return torch.argsort(weight.sum(0), descending=True)[:count]


def optimise_trigger(model: torch.nn.Module, mask: torch.Tensor, neurons: torch.Tensor, settings: dict,
                     desc: str = "trojannn") -> torch.Tensor:
    """The (3, S, S) trigger inside ``mask`` that drives ``neurons`` to ``target_value``."""
    device = next(model.parameters()).device
    mask = mask.to(device)
    start = torch.ones(1, 3, *mask.shape, device=device) * mask
    x = start.clone()
    eps, step, target = float(settings["eps"]), float(settings["step"]), float(settings["target_value"])
    for _ in tqdm(range(int(settings["steps"])), desc=desc, unit="step", leave=False, dynamic_ncols=True):
        x.requires_grad_(True)
        features = model.features(x * mask)[:, neurons.to(device)]
        cost = ((features - target) ** 2).sum()
        (gradient,) = torch.autograd.grad(cost, x)
        with torch.no_grad():
            x = (start + (x - step * gradient.sign() - start).clamp(-eps, eps)).clamp(0, 1) * mask
        if float(cost.detach()) < 1e-3:
            break
    return x.detach()[0].cpu()


def train_generator(spec: dict, context) -> dict[str, torch.Tensor]:
    """Learn the trigger of a ``generators:`` entry of this kind on its surrogate (trigger stage)."""
    if context.surrogate is None:
        raise ConfigError(f"{context.key}.surrogate: a trojannn generator is optimised on a clean surrogate; "
                          "name a surrogates entry")
    size = int(context.train_images.shape[1])
    mask_spec = spec["mask"]
    mask = square_mask(int(mask_spec["size"]), mask_spec["position"], int(mask_spec["margin"]), size)
    model = context.surrogate.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    neurons = strongest_neurons(model, int(spec["neurons"]))
    pattern = optimise_trigger(model, mask, neurons, spec, desc=f"{context.key}: trojannn trigger")
    return {"pattern": pattern, "mask": mask, "neurons": neurons}


@dataclass(frozen=True)
class TrojanTrigger:
    pattern: torch.Tensor  # (3, S, S), zero outside the mask
    mask: torch.Tensor  # (S, S)
    stamping: str
    image_size: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "trojannn")
        pattern, mask = self.pattern.to(x.device, x.dtype), self.mask.to(x.device, x.dtype)
        if self.stamping == "add":
            return (x + pattern * mask).clamp(0, 1)
        return x * (1 - mask) + pattern * mask


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> TrojanTrigger:
    settings = settings_for(__name__, spec)
    generator = getattr(context, "generator", None)
    if not generator:
        raise ConfigError("generator: a trojannn attack stamps a trigger learned by the trigger stage; name a "
                          "generators entry of kind trojannn")
    if generator["mask"].shape[-1] != image_size:
        raise ValueError(f"trojannn: the trigger was learned on {generator['mask'].shape[-1]}-px images, not {image_size}")
    return TrojanTrigger(generator["pattern"], generator["mask"], settings["trigger"]["stamping"], image_size)
