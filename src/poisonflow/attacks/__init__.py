"""Poisoning kinds: config ``kind:`` → the module that implements it.

Two roles share the ``attacks:`` section of the config and the poison stage:

- **backdoor triggers** (:data:`ATTACKS`): a module with
  ``build(spec, image_size, seed, context=None) -> Trigger``. A trigger works on batched float images
  (N, 3, H, W) in [0, 1]: ``apply(x)`` returns the triggered images (used for the ASR test set and,
  unless the trigger defines ``poison``, for the poisoned training samples); ``poison(x, y)``, where
  defined, makes the poisoned training samples from their images and true labels (e.g. a
  label-consistent perturbation before the trigger); ``noise(x, generator)`` with a
  ``noise_ratio`` attribute, where defined, makes samples that are modified but keep their label
  (WaNet's noise mode). Selecting and relabelling samples is the poison stage's job.
- **unlearnable examples** (:data:`UNLEARNABLE`): a module with
  ``protect(spec, images, labels, context, seed) -> images`` that returns the protected uint8
  (N, H, W, 3) training images (labels are kept). The store of a protected set has no test split.

:class:`PoisonContext` carries what a kind may need beyond its spec: the clean training set, the
surrogate model named by the entry's ``surrogate:`` (weights loaded, eval mode), the device, and a
work directory for checkpoints of long generations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..kinds import ATTACKS, UNLEARNABLE, Registry

if TYPE_CHECKING:  # the registry is read when the workflow is parsed: keep numpy/torch out of it
    import numpy as np
    import torch


class Trigger(Protocol):
    def apply(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class PoisonContext:
    train_images: np.ndarray  # uint8 (N, H, W, 3): the clean training set
    train_labels: np.ndarray  # int64 (N,)
    classes: list[str]  # class names (prompts of vision-language surrogates)
    surrogate: Any = None  # the entry's surrogate model (torch.nn.Module), or None
    device: Any = "cpu"
    workdir: Path | None = None  # checkpoints of long generations, kept across a killed job
    extra: dict = field(default_factory=dict)
    generator: dict | None = None  # the trained trigger of the entry's ``generator:`` (tensors by name)




def kind_registry(kind: str) -> Registry:
    """The registry that holds ``kind`` (backdoor triggers unless it is an unlearnable-example kind)."""
    return UNLEARNABLE if kind in UNLEARNABLE else ATTACKS
