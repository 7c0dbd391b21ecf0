"""NAD (Neural Attention Distillation): erase a backdoor by matching a clean-tuned teacher's attention.

1. Teacher: a copy of the victim fine-tuned on the defender's clean split (``clean_fraction`` of
   the clean pool, 5% by default) with the ``teacher`` training overrides (10 epochs, SGD lr 0.01).
2. Student: another copy of the victim, trained on the same split with
   cross entropy + β · Σ_stages AT(student stage output, teacher stage output), the teacher frozen
   in eval mode. The student is returned; the victim is not changed.

Attention map of a feature map A (N, C, H, W): mean over channels of |A|^p (p = ``power`` = 2),
flattened to (N, H·W) and divided by its L2 norm (+1e-6). The distance between the student's and
the teacher's normalized maps (``at_distance``):

- ``mse`` (default): the mean of their squared difference over the batch and the positions, the
  form of the reference implementations, for which β = 500 (the hard-sample paper's value) is set;
- ``l2``: the L2 norm of their difference per sample, averaged over the batch (the equation in the
  NAD paper; when all samples differ alike it equals √(H·W·mse), far larger than ``mse`` for small
  differences, so β needs retuning).

Distilled stages: the outputs of the ``stages`` deepest resolution stages of ``model.body``. A
stage ends at the last direct child of the body before the spatial size changes (and at the last
child): for ``convnet`` the ReLU before each max-pool and the final ReLU (3 stages); for the
CIFAR-stem ResNets the last residual block at each resolution (4 stages; with 3, the outputs of
the second, third and fourth group of blocks). They are found by one probe forward, so any
architecture whose body is an ``nn.Sequential`` works.

Student recipe (``student`` overrides of the victim's training): 20 epochs, SGD with initial lr
0.1, ×0.1 after epoch 2 (the paper tunes for 20 epochs from lr 0.1); batch size and augmentation
follow the victim's training. The student is trained without adversarial examples. Both phases
are checkpointed each epoch in the defense's work directory.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .. import augment
from ..kinds import settings_for
from ..models import stage_ends
from ..trainer import Objective, StepContext, StepOutput, train_model
from . import DefenseContext, DefenseResult, merge
from .clean_data import clean_split


ATTENTION_EPS = 1e-6  # added to the norm so an all-zero map stays zero


def attention_map(feature_map: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """(N, H·W): mean over channels of |A|^p, each row divided by its L2 norm (+1e-6)."""
    attention = feature_map.abs().pow(power).mean(dim=1).flatten(1)
    return attention / (attention.norm(dim=1, keepdim=True) + ATTENTION_EPS)


# per-sample distance between normalized student and teacher attention maps (N, H·W) → (N,); its
# batch mean is the AT loss (for mse: the mean over the batch and the positions)
AT_DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda student, teacher: (student - teacher).pow(2).mean(dim=1),
    "l2": lambda student, teacher: (student - teacher).norm(dim=1),
}


def attention_distance(student: torch.Tensor, teacher: torch.Tensor, power: float = 2.0,
                       distance: str = "mse") -> torch.Tensor:
    """(N,): each sample's AT distance between a student and a teacher feature map of the same shape."""
    return AT_DISTANCES[distance](attention_map(student, power), attention_map(teacher, power))


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, power: float = 2.0,
                   distance: str = "mse") -> torch.Tensor:
    """AT loss between a student and a teacher feature map of the same shape."""
    return attention_distance(student, teacher, power, distance).mean()


def distilled_modules(model: nn.Module, image_shape: tuple[int, int], stages: int) -> list[nn.Module]:
    """The body children whose outputs are distilled: the ends of the ``stages`` deepest stages."""
    ends = stage_ends(model.body, image_shape)
    return [model.body[i] for i in ends[-stages:]]


@contextmanager
def captured_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of ``modules`` (in forward order) during the forwards inside the block."""
    outputs: list[torch.Tensor] = []
    handles = [module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
               for module in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def fine_tune_teacher(victim: nn.Module, images: np.ndarray, labels: np.ndarray, ctx: DefenseContext,
                      teacher: dict) -> nn.Module:
    """A copy of the victim fine-tuned on the clean split."""
    workdir = Path(ctx.workdir)
    return train_model(copy.deepcopy(victim), images, labels, merge(ctx.training, teacher), seed=ctx.seed,
                       device=ctx.device, checkpoint=workdir / "teacher.pt", history=workdir / "history-teacher.csv",
                       desc="nad teacher").model


def distillation_objective(student: nn.Module, teacher: nn.Module, image_shape: tuple[int, int],
                           settings: dict) -> Objective:
    """Per sample: cross entropy + β·Σ_stages AT distance to the frozen ``teacher``'s stage outputs.

    No adversarial examples: the student learns from the clean split as it is.
    """
    student_modules = distilled_modules(student, image_shape, int(settings["stages"]))
    teacher_modules = distilled_modules(teacher, image_shape, int(settings["stages"]))
    beta, power, distance = float(settings["beta"]), float(settings["power"]), settings["at_distance"]

    def loss(net: nn.Module, batch: augment.MixedBatch, ctx: StepContext) -> StepOutput:
        with ctx.autocast():
            with torch.no_grad(), captured_outputs(teacher_modules) as teacher_maps:
                teacher(batch.images)
            with captured_outputs(student_modules) as student_maps:
                logits = net(batch.images).float()
        ce = augment.mixed_cross_entropy(logits, batch, float(ctx.settings["label_smoothing"]))
        at = sum(attention_distance(s.float(), t.float(), power, distance) for s, t in zip(student_maps, teacher_maps))
        return StepOutput(ce + beta * at, logits)

    key = {"distillation": {name: settings[name] for name in ("beta", "power", "stages", "at_distance")}}
    return Objective(loss, key, models=(teacher,))


def distill(student: nn.Module, teacher: nn.Module, images: np.ndarray, labels: np.ndarray, training: dict,
            settings: dict, *, seed: int, device: torch.device | str = "cpu", checkpoint: Path | None = None,
            history: Path | None = None) -> nn.Module:
    """Train ``student`` on uint8 NHWC ``images`` with CE + β·Σ AT loss against the frozen ``teacher``."""
    teacher.to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    objective = distillation_objective(student.to(device), teacher, tuple(images.shape[1:3]), settings)
    # Not compiled: the stage outputs are caught by forward hooks registered around each forward,
    # which a compiled graph would not call.
    return train_model(student, images, labels, {**training, "compile": False}, objective=objective, seed=seed,
                       device=device, checkpoint=checkpoint, history=history, desc="nad student").model


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'nad' needs the victim model")
    resolved = settings_for(__name__, spec)
    index = clean_split(len(ctx.reserve_labels), float(resolved["clean_fraction"]), ctx.seed)
    images, labels = ctx.reserve_images[index], ctx.reserve_labels[index]
    teacher = fine_tune_teacher(ctx.victim, images, labels, ctx, resolved["teacher"])
    student = distill(copy.deepcopy(ctx.victim), teacher, images, labels, merge(ctx.training, resolved["student"]),
                      resolved, seed=ctx.seed, device=ctx.device, checkpoint=Path(ctx.workdir) / "student.pt",
                      history=Path(ctx.workdir) / "history-student.csv")
    ends = stage_ends(student.body, tuple(images.shape[1:3]))
    metrics = {"clean_samples": int(len(index)), "distilled_stages": min(int(resolved["stages"]), len(ends))}
    return DefenseResult(model=student, metrics=metrics)
