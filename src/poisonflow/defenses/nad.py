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
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import augment
from ..errors import ConfigError
from ..kinds import settings_for
from ..trainer import data_fingerprint, images_to_tensor, make_optimizer, make_schedule, spec_digest, train_model
from . import DefenseContext, DefenseResult, merge
from .checkpoint import load_checkpoint, save_checkpoint, state_fingerprint
from .clean_data import clean_split


ATTENTION_EPS = 1e-6  # added to the norm so an all-zero map stays zero


def attention_map(feature_map: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """(N, H·W): mean over channels of |A|^p, each row divided by its L2 norm (+1e-6)."""
    attention = feature_map.abs().pow(power).mean(dim=1).flatten(1)
    return attention / (attention.norm(dim=1, keepdim=True) + ATTENTION_EPS)


# distance between normalized student and teacher attention maps (N, H·W) → scalar
AT_DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda student, teacher: F.mse_loss(student, teacher),
    "l2": lambda student, teacher: (student - teacher).norm(dim=1).mean(),
}


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, power: float = 2.0,
                   distance: str = "mse") -> torch.Tensor:
    """AT loss between a student and a teacher feature map of the same shape."""
    return AT_DISTANCES[distance](attention_map(student, power), attention_map(teacher, power))


@torch.no_grad()
def stage_ends(body: nn.Module, image_shape: tuple[int, int]) -> list[int]:
    """Indices of the body's children that end a resolution stage (the spatial size changes after them)."""
    if not isinstance(body, nn.Sequential):
        raise TypeError(f"nad: model.body must be an nn.Sequential to find its stages, got {type(body).__name__}")
    parameter = next(body.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = body.training
    body.eval()  # the probe must not move BatchNorm running statistics
    try:
        x = torch.zeros(1, 3, *image_shape, device=device)
        sizes = []
        for child in body:
            x = child(x)
            sizes.append(tuple(x.shape[-2:]))
    finally:
        body.train(was_training)
    return [i for i, size in enumerate(sizes) if i == len(sizes) - 1 or sizes[i + 1] != size]


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
    return train_model(copy.deepcopy(victim), images, labels, merge(ctx.training, teacher), seed=ctx.seed,
                       device=ctx.device, checkpoint=Path(ctx.workdir) / "teacher.pt", desc="nad teacher").model


def distill(student: nn.Module, teacher: nn.Module, images: np.ndarray, labels: np.ndarray, training: dict,
            settings: dict, *, seed: int, device: torch.device | str = "cpu",
            checkpoint: Path | None = None) -> nn.Module:
    """Train ``student`` on uint8 NHWC ``images`` with CE + β·Σ AT loss against the frozen ``teacher``."""
    device = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    student.to(device)
    teacher.to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    data = images_to_tensor(images, device)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    n, epochs, batch_size = len(targets), int(training["epochs"]), int(training["batch_size"])
    optimizer = make_optimizer(student.parameters(), training["optimizer"])
    schedule = make_schedule(optimizer, training.get("schedule"), epochs, (n + batch_size - 1) // batch_size)
    batch_augment = augment.BatchAugment(list(training.get("augment", [])), training)
    image_shape = tuple(images.shape[1:3])
    student_modules = distilled_modules(student, image_shape, int(settings["stages"]))
    teacher_modules = distilled_modules(teacher, image_shape, int(settings["stages"]))
    beta, power, distance = float(settings["beta"]), float(settings["power"]), settings["at_distance"]
    label_smoothing = float(training.get("label_smoothing", 0.0))
    distillation = {key: settings[key] for key in ("beta", "power", "stages", "at_distance")}
    digest = spec_digest(training, distillation, seed, data_fingerprint(images, labels), state_fingerprint(teacher))
    start_epoch = 0
    state = load_checkpoint(checkpoint, digest, device)
    if state is not None:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = state["epoch"]
    for epoch in tqdm(range(start_epoch, epochs), desc="nad student", initial=start_epoch, total=epochs,
                      unit="epoch", leave=False, dynamic_ncols=True):
        student.train()
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            batch = batch_augment(data[index], targets[index], generator)
            with torch.no_grad(), captured_outputs(teacher_modules) as teacher_maps:
                teacher(batch.images)
            with captured_outputs(student_modules) as student_maps:
                logits = student(batch.images)
            loss = augment.mixed_cross_entropy(logits, batch, label_smoothing).mean()
            for s, t in zip(student_maps, teacher_maps):
                loss = loss + beta * attention_loss(s, t, power, distance)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        save_checkpoint(checkpoint, {
            "digest": digest, "epoch": epoch + 1, "model": student.state_dict(),
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state()})
    student.eval()
    return student


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'nad' needs the victim model")
    resolved = settings_for(__name__, spec)
    index = clean_split(len(ctx.reserve_labels), float(resolved["clean_fraction"]), ctx.seed)
    images, labels = ctx.reserve_images[index], ctx.reserve_labels[index]
    teacher = fine_tune_teacher(ctx.victim, images, labels, ctx, resolved["teacher"])
    student = distill(copy.deepcopy(ctx.victim), teacher, images, labels, merge(ctx.training, resolved["student"]),
                      resolved, seed=ctx.seed, device=ctx.device, checkpoint=Path(ctx.workdir) / "student.pt")
    ends = stage_ends(student.body, tuple(images.shape[1:3]))
    metrics = {"clean_samples": int(len(index)), "distilled_stages": min(int(resolved["stages"]), len(ends))}
    return DefenseResult(model=student, metrics=metrics)
