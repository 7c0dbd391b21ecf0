"""TriggerUE: unlearnable examples from feature elimination and class-wise WaNet triggers.

Li, Xun, Li, Pan and Li, "Exploiting Backdoor Trigger towards Unlearnable Examples". Each image x of
class y becomes

    x' = W_y(x + δ),   δ = PGD_ε(surrogate, x, y),

two steps, each one small function here:

1. **feature elimination** (:func:`eliminate_features`): δ raises the surrogate's cross entropy on
   the true class, ℓ∞ PGD from δ = 0 (the paper states no random start), ``steps`` sign steps of
   size ``step``, each followed by projection onto ‖δ‖∞ ≤ ``eps`` and onto valid pixels. The paper's
   surrogate is CLIP ResNet-50 used zero-shot against the class names (``surrogate_kind: clip``,
   :mod:`poisonflow.clip_surrogate`); the embedded default is the workflow's own trained surrogate
   (``surrogate_kind: trained``, the entry's ``surrogate:``), which needs no downloaded weights.
2. **trigger injection** (:func:`inject_class_triggers`): the image is resampled through the WaNet
   warping field of its class (:func:`class_grid`: a k×k control grid, normalized, upsampled,
   scaled by s/H, ``grid_rescale``, clamped; bilinear ``grid_sample``). The field of class c is
   drawn from a generator seeded with (``trigger.seed``, c) alone, so every image of a class gets
   the same trigger, classes get different ones, and a class never seen before gets its trigger
   without any other data.

**The step size.** The paper states α = 0.05 with ε = 8/255 ≈ 0.0314 on pixels in [0, 1], so
ε < α < 2ε: the first step from δ = 0 overshoots the budget and the projection puts every pixel
with a non-zero gradient at ±ε; afterwards a step along the same sign stays at ±ε, and a step that
flips the sign lands at ±(α − ε) ≈ ±0.0186 (4.7/255) inside the ball. So with the default
``step: 0.05`` a pixel's δ is always one of 0, ±(α − ε), ±ε (before clipping to valid pixels): a
coarse, almost binary sign pattern re-evaluated at each of the ``steps`` points. Set ``step``
below ``eps`` (e.g. 2/255) for classic small-step PGD.

**Per-sample results.** The surrogate runs in eval mode and nothing in either step mixes samples,
so an image's protected version depends on that image, its class and the settings only. Images are
processed in chunks of exactly ``batch_size`` (a short last chunk is padded by repeating its last
image) because float kernels may pick a different summation order for a different batch shape:
with the shape fixed, a sample's result does not depend on which other images share its chunk or
on its position in it (checked bit for bit on CPU for the convnet, ResNet-18 and CLIP ResNet-50).
That is what lets :mod:`poisonflow.stages.protect` protect new images one folder at a time and
produce exactly the bytes the batch stage produces, given the same device, thread count and
``batch_size``. ``batch_size: 1`` makes each image's computation literally its own.

**The CLIP class list.** Zero-shot logits are a softmax over the prompts of all classes in the
class list, so with ``surrogate_kind: clip`` the class list is part of the input: protect new
images with the same list (new classes appended) as the images released before.

Keys (defaults in ``triggerue.yaml`` beside this module; ``rate`` and ``surrogate`` are the poison stage's):

- ``surrogate_kind``: ``trained`` | ``clip``; ``clip``: see :mod:`poisonflow.clip_surrogate`.
- ``eps`` (8/255), ``step`` (0.05, see above), ``steps`` (20): the PGD of feature elimination.
- ``components``: ``[features, trigger]``; ``[features]`` or ``[trigger]`` are the paper's
  ablations (Table 3). Steps always run in the paper's order.
- ``trigger``: ``k`` (4), ``s`` (0.5), ``grid_rescale`` (1) as in WaNet; ``seed`` (default: the
  experiment seed) draws the class fields.
- ``batch_size`` (64): images per chunk, see above.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import clip_surrogate, triggers
from ..adversarial import pgd
from ..errors import ConfigError
from ..kinds import settings_for
from .common import entry_key, float_to_images, images_to_float, seeded_generator

# The paper's order: eliminate features first, then warp; ``components`` only switches steps off.
COMPONENT_ORDER = ("features", "trigger")

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (float images, labels) → float images


# --- trigger injection ----------------------------------------------------------------------


def class_grid(class_id: int, image_size: int, trigger: dict, seed: int) -> torch.Tensor:
    """The (1, H, H, 2) WaNet sampling grid of class ``class_id``, drawn from (seed, class_id) only."""
    generator = seeded_generator(int(seed), int(class_id))
    noise_grid, identity_grid = triggers.wanet_grids(int(trigger["k"]), int(image_size), generator)
    return triggers.warp_grid(identity_grid, noise_grid, float(trigger["s"]), float(trigger["grid_rescale"]))


def inject_class_triggers(x: torch.Tensor, labels: torch.Tensor,
                          grid_for: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Every image of ``x`` warped by its class's grid (``grid_for(class_id)``, (1, H, H, 2))."""
    out = torch.empty_like(x)
    for class_id in labels.unique().tolist():
        rows = labels == class_id
        out[rows] = triggers.warp(x[rows], grid_for(int(class_id)))
    return out


# --- feature elimination --------------------------------------------------------------------


def eliminate_features(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, step: float,
                       steps: int) -> torch.Tensor:
    """x + δ, ‖δ‖∞ ≤ eps, from δ = 0 by ``steps`` sign steps raising the model's loss on ``labels``."""
    return pgd(model, x, labels, float(eps), float(step), int(steps), random_start=False)


def trained_surrogate(config: dict, context, key: str) -> tuple[nn.Module, int | None]:
    """The entry's surrogate trained by the workflow (``context.surrogate``) and its class count."""
    model = getattr(context, "surrogate", None)
    if model is None:
        raise ConfigError(f"{key}.surrogate: surrogate_kind 'trained' eliminates features on a surrogate trained "
                          f"by the workflow; name a surrogates entry, or use surrogate_kind: clip or components: [trigger]")
    outputs = getattr(getattr(model, "fc", None), "out_features", None)
    return model, (int(outputs) if outputs is not None else None)


def zero_shot_surrogate(config: dict, context, key: str) -> tuple[nn.Module, int]:
    """CLIP zero-shot over the prompts of ``context.classes``."""
    model = clip_surrogate.zero_shot_classifier(config["clip"], list(context.classes or []),
                                                getattr(context, "device", "cpu") or "cpu", key=f"{key}.clip")
    return model, model.num_classes


SURROGATES: dict[str, Callable[[dict, object, str], tuple[nn.Module, int | None]]] = {
    "trained": trained_surrogate,
    "clip": zero_shot_surrogate,
}


def check_known_classes(labels: torch.Tensor, num_classes: int | None, context, key: str) -> None:
    """A class the surrogate has no output for cannot have its features eliminated: say so, by name."""
    if num_classes is None or not len(labels) or int(labels.max()) < num_classes:
        return
    class_id = int(labels.max())
    classes = list(getattr(context, "classes", None) or [])
    name = f" ('{classes[class_id]}')" if class_id < len(classes) else ""
    raise ConfigError(f"{key}.surrogate_kind: class {class_id}{name} is not among the {num_classes} classes the "
                      f"surrogate predicts; the clip surrogate covers any class name in the class list, or use "
                      f"components: [trigger]")


# --- the protector --------------------------------------------------------------------------


@dataclass
class Protector:
    """TriggerUE ready to run: the enabled steps, applied chunk by chunk of ``batch_size`` images."""

    steps: list[Step]
    batch_size: int
    device: torch.device

    def protect_chunk(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Protected uint8 (n, H, W, 3) images for at most ``batch_size`` images and their labels.

        A short chunk is padded to ``batch_size`` by repeating its last image, so every image is
        computed in a batch of the same shape (see the module notes); the padding is dropped.
        """
        n = len(images)
        if n == 0:
            return np.asarray(images, dtype=np.uint8).copy()
        if n > self.batch_size:
            raise ValueError(f"a chunk holds at most {self.batch_size} images, got {n}")
        if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
            raise ValueError(f"expected square RGB uint8 images (N, H, H, 3), got {images.shape}")
        rows = np.minimum(np.arange(self.batch_size), n - 1)
        x = images_to_float(np.asarray(images)[rows], self.device)
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64)[rows], device=self.device)
        for step in self.steps:
            x = step(x, y)
        return float_to_images(x)[:n]


@dataclass
class _GridCache:
    trigger: dict
    seed: int
    device: torch.device
    grids: dict = field(default_factory=dict)

    def grid_for(self, image_size: int) -> Callable[[int], torch.Tensor]:
        def grid(class_id: int) -> torch.Tensor:
            cache_key = (class_id, image_size)
            if cache_key not in self.grids:
                self.grids[cache_key] = class_grid(class_id, image_size, self.trigger, self.seed).to(self.device)
            return self.grids[cache_key]
        return grid


def feature_step(config: dict, context, key: str) -> Step:
    model, num_classes = SURROGATES[config["surrogate_kind"]](config, context, key)
    model.eval()  # running statistics, no dropout: each sample's gradient is its own

    def step(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_known_classes(labels, num_classes, context, key)
        return eliminate_features(model, x, labels, config["eps"], config["step"], config["steps"])
    return step


def trigger_step(config: dict, seed: int, device: torch.device) -> Step:
    trigger = config["trigger"]
    trigger_seed = trigger.get("seed")
    cache = _GridCache(trigger, int(seed if trigger_seed is None else trigger_seed), device)

    def step(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return inject_class_triggers(x, labels, cache.grid_for(int(x.shape[-1])))
    return step


def prepare(spec: dict, context, seed: int) -> Protector:
    """A :class:`Protector` for the entry: surrogate loaded once, class grids drawn on first use."""
    key = entry_key(context)
    config = settings_for(__name__, spec, key)
    device = torch.device(getattr(context, "device", None) or "cpu")
    builders = {
        "features": lambda: feature_step(config, context, key),
        "trigger": lambda: trigger_step(config, seed, device),
    }
    steps = [builders[name]() for name in COMPONENT_ORDER if name in config["components"]]
    return Protector(steps, int(config["batch_size"]), device)


def protect(spec: dict, images: np.ndarray, labels: np.ndarray, context, seed: int) -> np.ndarray:
    """The protected uint8 (N, H, W, 3) images, labels kept (the poison stage's entry point)."""
    protector = prepare(spec, context, seed)
    images = np.asarray(images)
    labels = np.asarray(labels)
    out = np.empty_like(images)
    for start in range(0, len(images), protector.batch_size):
        stop = start + protector.batch_size
        out[start:stop] = protector.protect_chunk(images[start:stop], labels[start:stop])
    return out
