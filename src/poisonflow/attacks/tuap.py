"""TUAP: a targeted universal adversarial perturbation used as an additive trigger.

One perturbation δ (3, H, W), shared by every image, with ‖δ‖∞ ≤ ``eps``, is computed on the
entry's surrogate (a model trained on clean data, ``PoisonContext.surrogate``) so that x + δ is
classified as the target for as many clean training images as possible. Because δ is already a
strong feature of the target class, a victim picks it up from a few target-class images that
keep their labels. The trigger is ``clamp(x + δ, 0, 1)``, both for the poisoned training samples
and for the ASR test set (:meth:`UniversalTrigger.apply`).

Computation (:func:`universal_perturbation`): δ starts at zero; for ``epochs`` passes over at most
``max_samples`` clean training images (all classes, a seeded subset), in shuffled mini-batches of
``batch_size``, δ ← clip_ε(δ − step · sign(∇δ CE(f(clamp(x + δ)), target))): signed-gradient
descent on the mean cross entropy to the target class, projected onto the ε-ball after every
step. The subset and each epoch's order come from generators seeded with the attack seed (and the
epoch), so δ is the same in every process. After each epoch δ is saved in
``PoisonContext.workdir`` (with a fingerprint of the settings, surrogate weights and images): a
killed job resumes from the last finished epoch instead of starting over.

``perturbation:`` keys (defaults in ``tuap.yaml`` beside this module; pixel scale [0, 1]):

- ``eps`` (4/255, the hard-sample paper's budget for 32-px images; it uses 8/255 for
  ImageNet-size images): ℓ∞ budget of δ.
- ``step`` (1/255): signed-gradient step per mini-batch.
- ``epochs`` (5): passes over the images.
- ``batch_size`` (128): images per step.
- ``max_samples`` (5000): at most this many training images are used (a seeded random subset).

``trigger:`` takes only ``seed`` (default: the experiment seed), read by the poison stage and passed
to :func:`build`; it draws the subset and the batch order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import fingerprint, triggers
from ..checkpoint import Checkpoint
from ..errors import ConfigError
from ..kinds import settings_for
from ..trainer import images_to_tensor, to_float
from . import PoisonContext


CHECKPOINT = "tuap-delta.pt"


@dataclass(frozen=True, eq=False)
class UniversalTrigger:
    delta: torch.Tensor  # (3, H, W), ‖δ‖∞ ≤ eps
    image_size: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "tuap")
        return (x + self.delta.to(dtype=x.dtype, device=x.device)).clamp(0.0, 1.0)


def sample_indices(n: int, max_samples: int, seed: int) -> np.ndarray:
    """At most ``max_samples`` distinct indices of 0..n−1, a seeded subset, in increasing order."""
    if n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0]).choice(n, size=max_samples, replace=False))


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The batch order of ``epoch``: a permutation depending only on (seed, epoch), so a resumed run matches."""
    return np.random.default_rng([seed, 1, epoch]).permutation(count)


def targeted_step(model: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor, target: int, eps: float,
                  step: float) -> torch.Tensor:
    """One signed-gradient step of δ that lowers the mean cross entropy to ``target``, projected to the ε-ball."""
    delta = delta.detach().requires_grad_(True)
    logits = model((x + delta).clamp(0.0, 1.0))
    loss = F.cross_entropy(logits, torch.full((len(x),), target, dtype=torch.long, device=x.device))
    (grad,) = torch.autograd.grad(loss, delta)
    return (delta.detach() - step * grad.sign()).clamp(-eps, eps)


def run_epoch(model, images: np.ndarray, delta: torch.Tensor, target: int, settings: dict, seed: int,
              epoch: int, device) -> torch.Tensor:
    """δ after one pass over ``images`` (uint8 NHWC) in the seeded order of ``epoch``."""
    order = epoch_order(len(images), seed, epoch)
    batch_size = int(settings["batch_size"])
    for start in range(0, len(order), batch_size):
        batch = np.sort(order[start:start + batch_size])  # sorted: contiguous reads of the array
        x = to_float(images_to_tensor(images[batch], device))
        delta = targeted_step(model, x, delta, target, float(settings["eps"]), float(settings["step"]))
    return delta


def perturbation_digest(model: torch.nn.Module, images: np.ndarray, target: int, settings: dict, seed: int) -> str:
    """What δ depends on (``epochs`` excluded: epoch e's δ does not depend on the total)."""
    fixed = {k: v for k, v in settings.items() if k != "epochs"}
    return fingerprint.digest(fixed, int(target), int(seed), model, np.asarray(images))


def load_progress(checkpoint: Checkpoint, epochs: int) -> tuple[int, torch.Tensor | None]:
    """(finished epochs, δ) from a checkpoint of the same perturbation, or (0, None)."""
    saved = checkpoint.load()
    if saved is None or int(saved["epoch"]) > epochs:
        return 0, None
    return int(saved["epoch"]), saved["delta"]


def universal_perturbation(model: torch.nn.Module, images: np.ndarray, target: int, settings: dict, seed: int,
                           device="cpu", checkpoint: Path | None = None) -> torch.Tensor:
    """The targeted universal perturbation (3, H, W) on CPU for uint8 NHWC ``images``; see the module doc."""
    subset = images[sample_indices(len(images), int(settings["max_samples"]), seed)]
    epochs = int(settings["epochs"])
    store = Checkpoint(checkpoint, perturbation_digest(model, subset, target, settings, seed))
    done, delta = load_progress(store, epochs)
    height, width = images.shape[1:3]
    delta = (torch.zeros(3, height, width) if delta is None else delta).to(device)
    for epoch in range(done, epochs):
        delta = run_epoch(model, subset, delta, target, settings, seed, epoch, device)
        store.save({"epoch": epoch + 1, "delta": delta.detach().cpu()})
    return delta.detach().cpu()


def entry_key(context: PoisonContext | None) -> str:
    """The config key of the attack entry, for messages (``attacks.<name>`` where the caller says so)."""
    return context.extra.get("key", "attack") if context is not None else "attack"


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> UniversalTrigger:
    settings = settings_for(__name__, spec)["perturbation"]
    if context is None or context.surrogate is None:
        raise ConfigError(f"{entry_key(context)}.surrogate: a tuap attack computes its perturbation on a surrogate "
                          "model; name a surrogates entry (trained on clean data)")
    if context.train_images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"tuap: training images are {context.train_images.shape[1:3]}, expected {image_size}²")
    checkpoint = Path(context.workdir) / CHECKPOINT if context.workdir is not None else None
    delta = universal_perturbation(context.surrogate, context.train_images, int(spec.get("target", 0)), settings,
                                   seed, torch.device(context.device), checkpoint)
    return UniversalTrigger(delta, image_size)
