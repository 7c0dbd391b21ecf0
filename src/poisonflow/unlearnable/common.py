"""Pieces shared by the unlearnable-example kinds.

Images come in as uint8 (N, H, W, 3) arrays and go out the same way; inside, they are float
tensors (N, 3, H, W) in [0, 1] (:func:`images_to_float`) and a perturbation δ is a float tensor of
the same shape, added and rounded back by :func:`add_perturbation`.

- config:
  :func:`entry_key`, :func:`class_count`, :func:`require_surrogate`;
- budgets: :func:`project_linf` (ℓ∞ ball and valid pixels), :func:`scale_to_l2`;
- optimization: :func:`uniform_start`, :func:`normal_start`, :func:`sign_gradient_steps` (ℓ∞
  sign-gradient steps that raise or lower any objective of the perturbed batch),
  :func:`cross_entropy_objective`, :func:`augmentation` (differentiable crop/flip for crafting
  under augmentation);
- surrogates trained during generation: :func:`build_surrogate`, :func:`sgd`, :func:`train_step`,
  :func:`accuracy`, :class:`BatchCycler`;
- long generations: :func:`generation_checkpoint` in ``context.workdir``.

Random draws come from CPU generators seeded per stream (:func:`seeded_generator`), so a seed gives
the same perturbations on every device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .. import augment, fingerprint
from ..checkpoint import Checkpoint
from ..errors import ConfigError
from ..models import build_model
from ..trainer import batch_step, images_to_tensor, to_float

Objective = Callable[[torch.Tensor], torch.Tensor]



# --- config ---------------------------------------------------------------------------------


def entry_key(context) -> str:
    """The config key of the entry being generated, for error messages.

    The caller may name it in ``context.extra["key"]`` (``attacks.<name>``); otherwise ``attack``.
    """
    extra = getattr(context, "extra", None) or {}
    return str(extra.get("key", "attack"))


def class_count(labels: np.ndarray, context) -> int:
    """The number of classes: the dataset's (``context.classes``), else one more than the largest label.

    Class-wise patterns are indexed by class, so they must not depend on which classes happen to be
    among the protected samples.
    """
    labels = np.asarray(labels)
    classes = getattr(context, "classes", None)
    count = len(classes) if classes else (int(labels.max()) + 1 if labels.size else 0)
    if labels.size and (labels.min() < 0 or labels.max() >= count):
        raise ValueError(f"labels must lie in 0..{count - 1}, got {int(labels.min())}..{int(labels.max())}")
    return count


def require_surrogate(context, kind: str) -> torch.nn.Module:
    """The entry's trained surrogate in eval mode, or a ConfigError naming ``<entry>.surrogate``."""
    model = getattr(context, "surrogate", None)
    if model is None:
        raise ConfigError(f"{entry_key(context)}.surrogate: {kind} crafts its perturbations on a trained "
                          f"surrogate model; set it to the name of a surrogates entry")
    return model.eval()


def context_device(context) -> torch.device:
    return torch.device(getattr(context, "device", None) or "cpu")


def model_device(model: torch.nn.Module, context) -> torch.device:
    """Where ``model`` lives (its first parameter), else the context's device."""
    for parameter in model.parameters():
        return parameter.device
    return context_device(context)


def seeded_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one random stream of a generation (streams keep their draws independent)."""
    state = np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


# --- images and budgets -------------------------------------------------------------------


def images_to_float(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [0, 1] on ``device``."""
    return to_float(images_to_tensor(images, device))


def float_to_images(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) → uint8 (N, H, W, 3), clipped to [0, 1] and rounded to the nearest level."""
    return x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def add_perturbation(images: np.ndarray, delta: torch.Tensor) -> np.ndarray:
    """The protected uint8 images: clip(x + δ) rounded, so each pixel moves by at most |δ|·255 + 0.5."""
    return float_to_images(images_to_float(images, delta.device) + delta)


def project_linf(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """δ clipped to the ℓ∞ ball of radius ``eps`` and then so that x + δ stays in [0, 1]."""
    delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def sample_norms(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample ℓ2 norms, shaped to broadcast against ``delta``."""
    return delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))


def scale_to_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Each sample of δ rescaled to ℓ2 norm exactly ``eps`` (an all-zero sample stays zero)."""
    norms = sample_norms(delta)
    return torch.where(norms > 0, delta * (eps / norms.clamp_min(torch.finfo(delta.dtype).tiny)),
                       torch.zeros_like(delta))


# --- sign-gradient optimization -------------------------------------------------------------


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """δ uniform in [−ε, ε] per pixel (projected onto valid pixels)."""
    noise = torch.rand(x.shape, generator=generator).to(x.device)
    return project_linf((noise * 2 - 1) * eps, x, eps)


def normal_start(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """δ = ε·N(0, 1) per pixel, clipped to [−ε, ε] (and onto valid pixels)."""
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    return project_linf(noise * eps, x, eps)


def sign_gradient_steps(x: torch.Tensor, delta: torch.Tensor, objective: Objective, eps: float, step: float,
                        steps: int, *, ascend: bool) -> torch.Tensor:
    """``steps`` ℓ∞ sign-gradient steps on δ that raise (``ascend``) or lower ``objective(x + δ)``.

    ``objective`` maps the perturbed batch to a scalar summed over samples, so each sample follows
    its own gradient sign whatever the batch holds. After every step δ is projected back onto the
    ε-ball and onto x + δ ∈ [0, 1]. Only δ receives gradients; the caller sets the model's mode.
    """
    x = x.detach()
    delta = project_linf(delta.detach(), x, eps)
    direction = 1.0 if ascend else -1.0
    for _ in range(int(steps)):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x + delta), delta)
        delta = project_linf(delta.detach() + direction * step * grad.sign(), x, eps)
    return delta.detach()


def cross_entropy_objective(model: torch.nn.Module, labels: torch.Tensor,
                            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Objective:
    """Summed cross entropy of ``model`` on the perturbed batch (after ``transform``, if any)."""
    def objective(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(transform(z) if transform else z), labels, reduction="sum")
    return objective


def augmentation(names, crop_padding: int, generator: torch.Generator):
    """Random crop/flip of float batches, differentiable in the pixels, or None for no augmentation.

    Crafting a perturbation through the augmentations a victim will train with (expectation over
    transformations) keeps it effective on augmented copies.
    """
    names = list(names or [])
    if not names:
        return None
    augment.check_settings(names, {**augment.DEFAULTS, "crop_padding": int(crop_padding)})
    return lambda x: augment.apply(names, x, generator, int(crop_padding))


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, int(batch_size)):
        yield slice(start, min(n, start + int(batch_size)))


# --- surrogates trained during generation ---------------------------------------------------


def build_surrogate(model_spec: dict, num_classes: int, image_size: int, seed: int,
                    device: torch.device | str) -> torch.nn.Module:
    """A fresh model of a ``models:``-like entry (``{arch, width}``), initialized from ``seed``."""
    return build_model(model_spec, num_classes, image_size, seed=seed).to(device)


def sgd(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=float(lr), momentum=float(momentum),
                           weight_decay=float(weight_decay))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               grad_clip: float | None = None) -> float:
    """One surrogate step on a batch: the trainer's :func:`~poisonflow.trainer.batch_step` (cross
    entropy, gradient norm clipped to ``grad_clip`` if given)."""
    return batch_step(model, optimizer, x, y, grad_clip=grad_clip)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Eval-mode accuracy of ``model`` on ``x``."""
    model.eval()
    correct = sum(int((model(x[part]).argmax(1) == y[part]).sum()) for part in batch_slices(len(y), batch_size))
    return correct / max(1, len(y))


class BatchCycler:
    """Minibatch indices for a fixed number of training steps: seeded epochs of shuffled samples.

    Its position is part of a generation checkpoint, so a resumed generation sees the same batches.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = int(n), int(batch_size), generator
        self.order = torch.randperm(self.n, generator=generator)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        if self.cursor >= self.n:
            self.order = torch.randperm(self.n, generator=self.generator)
            self.cursor = 0
        index = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += len(index)
        return index

    def state_dict(self) -> dict:
        return {"order": self.order.clone(), "cursor": self.cursor, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order = state["order"].clone()
        self.cursor = int(state["cursor"])
        self.generator.set_state(state["generator"])


# --- checkpoints of long generations --------------------------------------------------------


def generation_checkpoint(context, kind: str, settings: dict, seed: int, images: np.ndarray,
                          labels: np.ndarray) -> Checkpoint | None:
    """A checkpoint in ``context.workdir`` (None when the caller gave no work directory), resumed only
    by a generation of the same kind, resolved settings, seed, images and labels."""
    workdir = getattr(context, "workdir", None)
    if workdir is None:
        return None
    digest = fingerprint.digest(kind, settings, int(seed), fingerprint.data_digest(images, labels))
    return Checkpoint(Path(workdir) / f"{kind}.pt", digest)


def cpu_state(module_or_optimizer) -> dict:
    """A state dict with every tensor on the CPU (checkpoints load on any device)."""
    def to_cpu(value):
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        if isinstance(value, dict):
            return {k: to_cpu(v) for k, v in value.items()}
        if isinstance(value, list):
            return [to_cpu(v) for v in value]
        return value
    return to_cpu(module_or_optimizer.state_dict())
