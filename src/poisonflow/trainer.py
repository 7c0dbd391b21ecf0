"""The one training loop every stage and defense uses.

The uint8 training set sits on the device when it fits (else it is streamed from host memory a
chunk of batches at a time, the next chunk copied while the current one trains); each batch is
gathered and augmented there (:mod:`poisonflow.augment`) and only then converted to float. On a
GPU the loop runs with bf16 autocast and channels_last by default, optionally ``torch.compile``,
and never waits for the device inside an epoch: statistics and training dynamics are accumulated
on the device and read once per epoch. With ``compile`` every batch has the same shape: a short last
batch is padded with repeated samples that weigh nothing (:func:`padded_order`), so the model is
traced once (and once more for PGD's eval mode), not again for the short batch. Every random draw
comes from one seeded CPU generator, so a seed gives the same batches and augmentations on CPU and
GPU; PGD starts are drawn where the batch is, on a GPU from a device generator seeded by that CPU
generator (:mod:`poisonflow.adversarial`).

What a step minimizes is an :class:`Objective`: by default the cross entropy (on PGD examples for
adversarial training); defenses pass their own (ABL's local gradient ascent, NAD's attention
distillation, an autoencoder's reconstruction loss), may train on a subset of the samples or
weight them, and may observe every step and epoch through callbacks. Per-sample training
dynamics (correctness and loss of the training forward, before the step) are recorded on request;
with CutMix/Mixup they are measured against each sample's own label. A checkpoint
(:mod:`poisonflow.checkpoint`) is written atomically after every epoch and resumed only by a run
with the same :func:`training_digest`; the per-epoch history can be written as CSV.

The training set may also be float feature rows (N, D) instead of uint8 NHWC images (the per-class
flows of GSSD train on standardized self-supervised features): the rows are kept as float32, a
batch is its rows as they are (no /255), ``augment`` must be empty and ``channels_last`` is off
(``auto``) or refused (``true``); shuffling, checkpoints, history, resume, ``subset``/``weights`` and
the callbacks are the image path's.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import augment
from . import checkpoint as checkpoints
from . import fingerprint
from .adversarial import pgd
from .errors import ConfigError
from .kinds import definition_defaults

# The keys of a ``trainings:`` entry this module reads, with their defaults: the schema's
# ``$defs/training`` (one place), so code that calls the trainer directly gets the config's defaults.
DEFAULTS: dict = definition_defaults("training", {"model": "-"})

# Streamed data move this many images per host→device copy (rounded down to whole batches).
STREAM_CHUNK_IMAGES = 16384
# ``data_on_device: auto`` keeps the uint8 set resident when it takes at most this share of the
# free device memory; the rest is left to activations.
RESIDENT_MEMORY_SHARE = 0.5


def images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) → uint8 (N, C, H, W) tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)


def to_float(batch_u8: torch.Tensor) -> torch.Tensor:
    return batch_u8.float().div_(255.0)


def feature_rows(data) -> bool:
    """Whether a training set is feature rows (N, D) rather than images (N, H, W, C)."""
    return np.ndim(data) == 2


def data_to_tensor(data: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """The training set as the loop holds it: uint8 (N, C, H, W) images, or float32 (N, D) feature rows."""
    if feature_rows(data):
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(device)
    return images_to_tensor(data, device)


def check_feature_settings(settings: dict) -> None:
    """Feature rows are not images: no image augmentation or label mixing applies to them."""
    names = list(settings["augment"])
    if names:
        raise ConfigError(f"training.augment: feature rows (N, D) take no augmentation, got {names} (set augment: [])")


def with_defaults(training: dict) -> dict:
    """``training`` with its missing top-level keys taken from :data:`DEFAULTS`.

    ``optimizer`` and ``schedule`` are not merged key by key: :func:`make_optimizer` and
    :func:`make_schedule` read their own entries (weight decay 0 and a constant schedule when absent).
    """
    return {**DEFAULTS, **training}


# -- optimizer and learning-rate schedule ----------------------------------------------------

def make_optimizer(params, spec: dict) -> torch.optim.Optimizer:
    name = spec.get("name", "sgd")
    lr = float(spec["lr"])
    wd = float(spec.get("weight_decay", 0.0))
    betas = tuple(float(b) for b in spec.get("betas", (0.9, 0.999)))
    factories: dict[str, Callable] = {
        "sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=float(spec.get("momentum", 0.9)),
                                       weight_decay=wd, nesterov=bool(spec.get("nesterov", False))),
        "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=betas),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas),
    }
    if name not in factories:
        raise ConfigError(f"optimizer.name: unknown optimizer '{name}' (known: {', '.join(sorted(factories))})")
    return factories[name]()


def one_cycle(optimizer, spec: dict, total: int):
    """One-cycle: warm up from lr/div_factor to lr over ``pct_start`` of the steps, then anneal to
    lr/(div_factor·final_div_factor). Momentum is left at the optimizer's setting."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total,
        pct_start=float(spec.get("pct_start", 0.3)), div_factor=float(spec.get("div_factor", 25.0)),
        final_div_factor=float(spec.get("final_div_factor", 1e4)), anneal_strategy=spec.get("anneal", "cos"),
        cycle_momentum=False)


def make_schedule(optimizer, spec: dict | None, epochs: int, steps_per_epoch: int):
    """A per-step learning-rate schedule: constant, cosine over all steps, multistep at epochs, or one-cycle."""
    spec = spec or {"name": "constant"}
    name = spec.get("name", "constant")
    total = max(1, epochs * steps_per_epoch)
    milestones = [int(m) * steps_per_epoch for m in spec.get("milestones", [])]
    gamma = float(spec.get("gamma", 0.1))
    factories: dict[str, Callable] = {
        "constant": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total),
        "multistep": lambda: torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma),
        "onecycle": lambda: one_cycle(optimizer, spec, total),
    }
    if name not in factories:
        raise ConfigError(f"schedule.name: unknown schedule '{name}' (known: {', '.join(sorted(factories))})")
    return factories[name]()


# -- device switches -------------------------------------------------------------------------

def switch(value, key: str, auto: bool) -> bool:
    """A config switch: ``true``/``false``, or ``auto`` → ``auto``."""
    choices = {"auto": auto, True: True, False: False}
    if not isinstance(value, (bool, str)) or value not in choices:
        raise ConfigError(f"training.{key}: expected auto, true or false, got {value!r}")
    return choices[value]


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether a uint8 training set of ``nbytes`` should stay resident on ``device``."""
    if device.type != "cuda":
        return True  # the host is the device: the array is in memory already
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= RESIDENT_MEMORY_SHARE * free


@dataclass(frozen=True)
class RuntimeSettings:
    """The device-dependent switches of a run, with ``auto`` resolved."""
    amp: bool
    channels_last: bool
    compile: bool
    data_on_device: bool

    @classmethod
    def resolve(cls, training: dict, device: torch.device, data_bytes: int,
                features: bool = False) -> "RuntimeSettings":
        """``features``: the data are feature rows (N, D), which have no channels to lay out."""
        cuda = device.type == "cuda"
        channels_last = switch(training["channels_last"], "channels_last", cuda and not features)
        if features and channels_last:
            raise ConfigError("training.channels_last: feature rows (N, D) have no channels (set auto or false)")
        return cls(
            amp=switch(training["amp"], "amp", cuda and torch.cuda.is_bf16_supported()),
            channels_last=channels_last,
            compile=switch(training["compile"], "compile", cuda),
            data_on_device=switch(training["data_on_device"], "data_on_device", fits_on_device(data_bytes, device)),
        )


# Extra arguments to torch.compile (tests swap in a fast backend).
compile_options: dict = {}


def training_module(model: torch.nn.Module, runtime: RuntimeSettings) -> torch.nn.Module:
    """The module the loop calls: ``model`` itself, or its compiled wrapper (same parameters)."""
    return torch.compile(model, **compile_options) if runtime.compile else model


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# -- where the training set lives ------------------------------------------------------------

class ResidentData:
    """The whole uint8 (N, C, H, W) training set (or float32 (N, D) rows) on the device; batches are
    gathered there."""

    def __init__(self, images: np.ndarray, device: torch.device):
        self.images = data_to_tensor(images, device)

    def batches(self, order: torch.Tensor, order_device: torch.Tensor, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(order), batch_size):
            index = order_device[start:start + batch_size]
            yield index, self.images[index]


class StreamedData:
    """The uint8 training set in host memory (pinned for CUDA), sent a chunk of whole batches at
    a time; the next chunk is gathered and copied on a side stream while the current one trains."""

    def __init__(self, images: np.ndarray, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.images = data_to_tensor(images, "cpu")
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None

    def send(self, rows: torch.Tensor):
        """Gather ``rows`` on the host and start their copy; returns (tensor, ready event)."""
        staged = torch.empty((len(rows),) + tuple(self.images.shape[1:]), dtype=self.images.dtype,
                             pin_memory=self.cuda)
        torch.index_select(self.images, 0, rows, out=staged)
        if not self.cuda:
            return staged, None
        with torch.cuda.stream(self.copy_stream):
            chunk = staged.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return chunk, ready

    def receive(self, chunk: torch.Tensor, ready) -> torch.Tensor:
        """Make the compute stream wait for ``chunk``'s copy (no host wait)."""
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            chunk.record_stream(stream)  # the copy stream allocated it; keep it alive for compute
        return chunk

    def batches(self, order: torch.Tensor, order_device: torch.Tensor, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunk_size = batch_size * max(1, STREAM_CHUNK_IMAGES // batch_size)
        upcoming = self.send(order[:chunk_size])
        for chunk_start in range(0, len(order), chunk_size):
            current = upcoming
            following = chunk_start + chunk_size
            if following < len(order):
                upcoming = self.send(order[following:following + chunk_size])
            chunk = self.receive(*current)
            for start in range(0, len(chunk), batch_size):
                yield order_device[chunk_start + start:chunk_start + start + batch_size], chunk[start:start + batch_size]


DATA_PLACEMENTS = {True: ResidentData, False: StreamedData}


# -- objectives: what a step minimizes -------------------------------------------------------

@dataclass
class StepContext:
    """What a loss function may use besides the network and the batch."""
    settings: dict  # the resolved training entry
    runtime: RuntimeSettings
    generator: torch.Generator  # the run's one seeded CPU generator: draw every random number from it
    device: torch.device
    epoch: int = 0  # 0-based epoch being trained

    def autocast(self):
        """The run's autocast region (bf16 on a GPU by default); forward passes belong inside it."""
        return autocast(self.device, self.runtime.amp)


@dataclass
class StepOutput:
    """A loss function's result for one batch."""
    loss: torch.Tensor  # (B,) per-sample objective; the step descends on its (weighted) mean
    logits: torch.Tensor | None = None  # (B, classes) for accuracy and dynamics; None for a model without classes
    own_loss: torch.Tensor | None = None  # (B,) cross entropy against the own label, where already computed


LossFunction = Callable[[torch.nn.Module, augment.MixedBatch, StepContext], StepOutput]


@dataclass(frozen=True)
class Objective:
    """A training objective: a loss function, and what identifies it in a checkpoint digest."""
    loss: LossFunction
    key: object  # JSON-able name and settings of the loss: a checkpoint of another objective is not resumed
    # other models the loss reads (a frozen teacher): their weights join the digest
    models: tuple[torch.nn.Module, ...] = ()


def adversarial_examples(net, x, y, adversarial: dict, generator) -> torch.Tensor:
    """PGD examples against each sample's own label, with the model in eval mode (BatchNorm frozen)."""
    net.eval()
    x = pgd(net, x, y, float(adversarial["eps"]), float(adversarial["step"]), int(adversarial["steps"]),
            generator=generator)
    net.train()
    return x


def own_label_objective(batch: augment.MixedBatch, settings: dict) -> bool:
    """Whether the training loss already is the plain cross entropy against the own label."""
    return not batch.mixed and float(settings["label_smoothing"]) == 0.0


def cross_entropy_loss(net, batch: augment.MixedBatch, ctx: StepContext) -> StepOutput:
    """The default loss: cross entropy against the batch's mixed, smoothed targets, on PGD examples
    when the training entry asks for adversarial training."""
    x = batch.images
    with ctx.autocast():
        if ctx.settings["adversarial"]:
            x = adversarial_examples(net, x, batch.labels, ctx.settings["adversarial"], ctx.generator)
        logits = net(x).float()
    per_sample = augment.mixed_cross_entropy(logits, batch, float(ctx.settings["label_smoothing"]))
    return StepOutput(per_sample, logits, per_sample if own_label_objective(batch, ctx.settings) else None)


CROSS_ENTROPY = Objective(cross_entropy_loss, "cross_entropy")


def cross_entropy_objective(transform: Callable[[torch.Tensor], torch.Tensor], key) -> Objective:
    """The default loss with its per-sample cross entropy mapped through ``transform`` (B,) → (B,),
    e.g. ABL's local gradient ascent or its unlearning by ascent; ``key`` names the transform."""
    def loss(net, batch: augment.MixedBatch, ctx: StepContext) -> StepOutput:
        output = cross_entropy_loss(net, batch, ctx)
        return StepOutput(transform(output.loss), output.logits, output.own_loss)
    return Objective(loss, ["cross_entropy", key])


# -- callbacks -------------------------------------------------------------------------------

@dataclass
class BatchEnd:
    """Passed to ``on_batch`` after each optimizer step; its tensors live on the device (do not read them
    on the host, or every step waits for the device). A padded last batch (:func:`padded_order`) is
    passed without its padding rows."""
    epoch: int  # 0-based
    index: torch.Tensor  # the batch's sample indices
    batch: augment.MixedBatch
    output: StepOutput


@dataclass
class EpochEnd:
    """Passed to ``on_epoch`` after each epoch, once its checkpoint and history are written."""
    epoch: int  # epochs finished, 1-based
    row: dict  # the epoch's history row
    model: torch.nn.Module


# -- checkpoints and history -----------------------------------------------------------------

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "lr", "seconds")


def selected_indices(subset, n: int) -> np.ndarray:
    """A bool mask over the n samples, or sample indices → int64 indices (in the order given)."""
    subset = np.asarray(subset)
    indices = np.flatnonzero(subset) if subset.dtype == bool else subset.astype(np.int64)
    if subset.dtype == bool and len(subset) != n:
        raise ValueError(f"subset: a mask of {len(subset)} entries for {n} samples")
    if len(indices) == 0 or indices.min() < 0 or indices.max() >= n:
        raise ValueError(f"subset: needs at least one index in 0..{n - 1}")
    return indices


def training_digest(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, training: dict, *, seed: int,
                    subset=None, weights=None, record_dynamics: bool = False, snapshot_epochs=(),
                    objective: Objective = CROSS_ENTROPY) -> str:
    """What a checkpoint of :func:`train_model` must have been written for to be resumed: the resolved
    training entry, the seed, the data, the samples trained on and their weights, what is recorded, the
    objective with the models it reads, and the starting weights of ``model``."""
    return fingerprint.digest(
        with_defaults(training), int(seed), fingerprint.data_digest(images, labels),
        None if subset is None else selected_indices(subset, len(labels)),
        None if weights is None else np.asarray(weights, dtype=np.float32),
        bool(record_dynamics), [int(e) for e in snapshot_epochs], objective.key,
        [fingerprint.model_digest(m) for m in objective.models], fingerprint.model_digest(model))


@dataclass
class TrainResult:
    model: torch.nn.Module
    correct: np.ndarray | None = None  # (epochs, N) bool, training forward before each step, own label
    loss: np.ndarray | None = None  # (epochs, N) float32, cross entropy against the own label
    snapshots: dict[int, dict] = field(default_factory=dict)  # epoch → state_dict after that epoch
    epoch_seconds: list[float] = field(default_factory=list)  # wall time of each epoch run by this call
    runtime: RuntimeSettings | None = None  # the resolved device switches
    history: list[dict] = field(default_factory=list)  # one row per epoch (HISTORY_COLUMNS), resumed ones included
    digest: str = ""  # the checkpoint digest of this training


@dataclass
class LoopState:
    """What a checkpoint holds besides the model: everything needed to continue bit-for-bit."""
    optimizer: torch.optim.Optimizer
    schedule: object
    generator: torch.Generator
    correct: np.ndarray | None
    losses: np.ndarray | None
    snapshots: dict[int, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0


def resume(saved: dict | None, model, state: LoopState, desc: str, where: Path | None = None) -> None:
    """Continue from a checkpoint ``saved`` for this job (None: start from scratch)."""
    if saved is None:
        return
    model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.schedule.load_state_dict(saved["schedule"])
    state.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    state.start_epoch = int(saved["epoch"])
    state.snapshots = saved["snapshots"]
    state.history = list(saved["history"])
    print(f"{desc}: resuming from {where} after epoch {state.start_epoch}", file=sys.stderr)
    if state.correct is not None:
        state.correct[:state.start_epoch] = saved["correct"][:state.start_epoch].numpy()
        state.losses[:state.start_epoch] = saved["loss"][:state.start_epoch].numpy()


def checkpoint_state(epoch: int, model, state: LoopState) -> dict:
    """Tensors and plain values only, so the checkpoint loads with ``weights_only=True``."""
    return {
        "epoch": epoch, "model": model.state_dict(),
        "optimizer": state.optimizer.state_dict(), "schedule": state.schedule.state_dict(),
        "generator": state.generator.get_state(), "torch_rng": torch.get_rng_state(),
        "snapshots": state.snapshots, "history": state.history,
        "correct": None if state.correct is None else torch.from_numpy(state.correct),
        "loss": None if state.losses is None else torch.from_numpy(state.losses),
    }


def write_history(path: Path, rows: list[dict], columns: tuple[str, ...] = HISTORY_COLUMNS) -> None:
    """A per-epoch history as CSV, written atomically (an empty accuracy where the model has no
    classes); ``columns``: the trainer's, or another per-epoch record's (learning curves)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(rows)
    checkpoints.atomic_write(path, write)


# -- one epoch -------------------------------------------------------------------------------

@dataclass
class EpochStats:
    """Per-epoch sums kept on the device, read once at the end of the epoch."""
    loss_sum: torch.Tensor  # the (weighted) per-sample objective, summed
    hits: torch.Tensor
    correct: torch.Tensor | None  # (N,) bool, own-label correctness per sample
    loss: torch.Tensor | None  # (N,) float32, own-label cross entropy per sample
    classified: bool = False  # whether the loss function gave logits (no accuracy otherwise)

    @classmethod
    def zeros(cls, n: int, device, record_dynamics: bool) -> "EpochStats":
        return cls(torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device),
                   torch.zeros(n, dtype=torch.bool, device=device) if record_dynamics else None,
                   torch.zeros(n, dtype=torch.float32, device=device) if record_dynamics else None)

    @torch.no_grad()
    def add(self, index, per_sample: torch.Tensor, output: StepOutput, labels: torch.Tensor) -> None:
        """Accumulate one step without a host sync."""
        self.loss_sum += per_sample.sum()
        if output.logits is None:
            if self.correct is not None:
                raise ValueError("record_dynamics: the loss function gave no logits to measure correctness on")
            return
        self.classified = True
        hits = output.logits.argmax(1) == labels
        self.hits += hits.sum()
        if self.correct is not None:
            self.correct[index] = hits
            self.loss[index] = output.own_loss if output.own_loss is not None else \
                F.cross_entropy(output.logits, labels, reduction="none")


def first_rows(batch: augment.MixedBatch, rows: int) -> augment.MixedBatch:
    """The batch without its padding: its first ``rows`` samples."""
    partners = batch.partner_labels
    return replace(batch, images=batch.images[:rows], labels=batch.labels[:rows],
                   partner_labels=None if partners is None else partners[:rows])


def first_outputs(output: StepOutput, rows: int) -> StepOutput:
    """A step's output without the padding rows."""
    return StepOutput(output.loss[:rows], None if output.logits is None else output.logits[:rows],
                      None if output.own_loss is None else output.own_loss[:rows])


def train_step(net, batch: augment.MixedBatch, index, optimizer, schedule, stats: EpochStats, objective: Objective,
               ctx: StepContext, weights: torch.Tensor | None = None, real: int | None = None) -> StepOutput:
    """One optimizer step on an augmented batch, accumulating statistics without a host sync.

    ``real``: only the batch's first ``real`` rows are samples, the rest padding (:func:`padded_order`);
    the step descends on the mean over the real rows, only they are counted, and the output returned
    covers them only.
    """
    if ctx.runtime.channels_last:
        batch = replace(batch, images=batch.images.contiguous(memory_format=torch.channels_last))
    output = objective.loss(net, batch, ctx)
    per_sample = output.loss.float()
    if weights is not None:
        per_sample = per_sample * weights
    labels = batch.labels
    if real is not None:
        per_sample, index, labels, output = per_sample[:real], index[:real], labels[:real], first_outputs(output, real)
    descend(optimizer, per_sample.mean(), net)
    schedule.step()
    stats.add(index, per_sample.detach(), output, labels)
    return output


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, net: torch.nn.Module,
            grad_clip: float | None = None) -> None:
    """The optimizer step every training in the package takes: gradients of ``loss``, their global
    norm clipped to ``grad_clip`` when given, one step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), float(grad_clip))
    optimizer.step()


def apply_gradients(optimizer: torch.optim.Optimizer, params, grads) -> None:
    """One optimizer step on gradients computed elsewhere (i-BAU's implicit hypergradient): each
    parameter's gradient set to its entry of ``grads``, then the step."""
    optimizer.zero_grad(set_to_none=True)
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()


def batch_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               *, grad_clip: float | None = None, objective: Objective = CROSS_ENTROPY) -> float:
    """One step of the trainer on a float batch that the caller made, outside an epoch loop.

    For bilevel generators (error-minimizing and robust error-minimizing noise) that interleave
    surrogate steps with updates of their perturbations: the step is the loop's (the same objective
    with the training defaults, :func:`descend`), in train mode and full precision, on the batch as
    given (no augmentation, no schedule). Returns the batch's mean loss.
    """
    model.train()
    device = images.device
    settings = DEFAULTS
    runtime = RuntimeSettings(amp=False, channels_last=False, compile=False, data_on_device=True)
    ctx = StepContext(settings, runtime, torch.Generator(), device)
    loss = objective.loss(model, augment.MixedBatch(images, labels), ctx).loss.float().mean()
    descend(optimizer, loss, model, grad_clip)
    return float(loss.detach())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shuffled(pool: torch.Tensor | None, n: int, generator: torch.Generator, length: int | None = None) -> torch.Tensor:
    """This epoch's sample order: all n samples, or those of ``pool``, permuted (the same draws either
    way); with ``length``, as many fresh permutations one after the other as it takes, cut to that
    length (a loader re-iterated until an epoch of fixed steps is full)."""
    def one() -> torch.Tensor:
        return torch.randperm(n, generator=generator) if pool is None else pool[torch.randperm(len(pool), generator=generator)]

    if length is None:
        return one()
    parts, total = [], 0
    while total < length:
        parts.append(one())
        total += len(parts[-1])
    return torch.cat(parts)[:length]


def padded_order(order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """``order`` filled up to whole batches by repeating its first samples, and the rows added.

    Used with ``compile``: a short last batch would make ``torch.compile`` trace the model again for
    its shape (and again for PGD), then switch to slower dynamic-shape code. The padding rows are
    augmented and run through the network with the batch (BatchNorm's batch statistics see them) but
    weigh nothing: the loss, the epoch's statistics, the recorded dynamics and ``on_batch`` cover the
    real rows only, and every sample is still trained on exactly once per epoch.
    """
    short = -len(order) % batch_size
    if short == 0:
        return order, 0
    return torch.cat([order, order[torch.arange(short) % len(order)]]), short


# -- the loop --------------------------------------------------------------------------------

def train_model(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    training: dict,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    checkpoint: str | os.PathLike | None = None,
    history: str | os.PathLike | None = None,
    record_dynamics: bool = False,
    snapshot_epochs: tuple[int, ...] = (),
    desc: str = "train",
    objective: Objective = CROSS_ENTROPY,
    subset=None,
    weights=None,
    on_batch: Callable[[BatchEnd], None] | None = None,
    on_epoch: Callable[[EpochEnd], None] | None = None,
    resplit: Callable[[int, torch.nn.Module], np.ndarray] | None = None,
) -> TrainResult:
    """Train ``model`` on uint8 NHWC ``images`` with int ``labels`` per a resolved ``trainings:`` entry.

    ``images`` may instead be float feature rows (N, D), trained on as float32 without conversion or
    augmentation (``augment`` must be empty; ``channels_last`` is off).

    ``training`` keys (missing ones take :data:`DEFAULTS`): epochs, batch_size,
    optimizer{name, lr, momentum, weight_decay, nesterov},
    schedule{name, milestones, gamma, pct_start, div_factor, final_div_factor, anneal},
    augment (list of names) and their parameters, label_smoothing, amp, channels_last, compile,
    data_on_device, adversarial (null or {eps, step, steps}).

    ``objective`` gives each batch's per-sample loss (default: cross entropy, PGD examples when
    ``adversarial`` is set); the step descends on its mean, each sample's term multiplied by its
    ``weights`` entry (float per sample) when given. ``subset`` (bool mask or indices) restricts
    training to those samples, drawn in the same order as if only they had been passed. ``on_batch``
    and ``on_epoch`` are called after every step and every epoch. ``resplit(epoch, model)`` (0-based
    epoch), when given, is called before each epoch and returns that epoch's subset (bool mask or
    indices), replacing ``subset`` for it: the semi-supervised defenses re-split the training set
    with the model as it is (it must depend on nothing else, so a resumed run splits the same way;
    the schedule must then be constant, as its steps would follow the subset's size).
    ``epoch_steps`` (a training key) fixes the steps of an epoch instead of one pass over the samples.
    ``checkpoint`` is written after
    every epoch and resumed only for the same :func:`training_digest`; ``history`` is a CSV of one
    row per epoch (:data:`HISTORY_COLUMNS`: the mean objective, the training-forward accuracy, the
    learning rate the epoch began with, its wall time).
    """
    device = torch.device(device)
    settings = with_defaults(training)
    features = feature_rows(images)
    if features:
        check_feature_settings(settings)
        images = np.ascontiguousarray(images, dtype=np.float32)
    pool_indices = None if subset is None else selected_indices(subset, len(labels))
    digest = training_digest(model, images, labels, settings, seed=seed, subset=pool_indices, weights=weights,
                             record_dynamics=record_dynamics, snapshot_epochs=snapshot_epochs, objective=objective)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    runtime = RuntimeSettings.resolve(settings, device, int(np.asarray(images).nbytes), features)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    model.to(device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    net = training_module(model, runtime)
    data = DATA_PLACEMENTS[runtime.data_on_device](images, device)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    sample_weights = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32,
                                                                   device=device)
    pool = None if pool_indices is None else torch.from_numpy(pool_indices)
    n = len(targets)
    trained = n if pool is None else len(pool)  # samples per epoch
    epochs = int(settings["epochs"])
    batch_size = int(settings["batch_size"])
    epoch_steps = settings.get("epoch_steps")
    steps_per_epoch = int(epoch_steps) if epoch_steps else (trained + batch_size - 1) // batch_size
    if resplit is not None and settings["schedule"].get("name", "constant") != "constant":
        raise ValueError("train_model: resplit needs a constant schedule (its subset size varies by epoch)")
    augmenter = augment.BatchAugment(list(settings["augment"]), settings)
    optimizer = make_optimizer(model.parameters(), settings["optimizer"])
    state = LoopState(
        optimizer=optimizer,
        schedule=make_schedule(optimizer, settings["schedule"], epochs, steps_per_epoch),
        generator=generator,
        correct=np.zeros((epochs, n), dtype=bool) if record_dynamics else None,
        losses=np.zeros((epochs, n), dtype=np.float32) if record_dynamics else None,
    )
    store = checkpoints.Checkpoint(Path(checkpoint) if checkpoint else None, digest)
    resume(store.load(), model, state, desc, store.path)
    ctx = StepContext(settings, runtime, generator, device)

    epoch_seconds = []
    progress = tqdm(range(state.start_epoch, epochs), desc=desc, initial=state.start_epoch, total=epochs,
                    unit="epoch", leave=False, dynamic_ncols=True)
    for epoch in progress:
        started = time.perf_counter()
        ctx.epoch = epoch
        lr = float(optimizer.param_groups[0]["lr"])
        if resplit is not None:
            model.eval()
            pool = torch.from_numpy(selected_indices(resplit(epoch, model), n))
            trained = len(pool)
        net.train()
        order = shuffled(pool, n, generator, steps_per_epoch * batch_size if epoch_steps else None)
        trained = len(order) if epoch_steps else trained
        order, padding = padded_order(order, batch_size) if runtime.compile else (order, 0)
        last_batch = (len(order) + batch_size - 1) // batch_size - 1
        stats = EpochStats.zeros(n, device, record_dynamics)
        batches = data.batches(order, augment.to_device(order, device), batch_size)
        for number, (index, batch_u8) in enumerate(batches):
            real = batch_size - padding if padding and number == last_batch else None
            batch = augmenter(batch_u8, targets[index], generator)
            output = train_step(net, batch, index, optimizer, state.schedule, stats, objective, ctx,
                                None if sample_weights is None else sample_weights[index], real)
            if on_batch is not None:
                on_batch(BatchEnd(epoch, index if real is None else index[:real],
                                  batch if real is None else first_rows(batch, real), output))
        loss_sum, hits = float(stats.loss_sum), int(stats.hits)  # the epoch's one wait for the device
        if record_dynamics:
            state.correct[epoch] = stats.correct.cpu().numpy()
            state.losses[epoch] = stats.loss.cpu().numpy()
        _synchronize(device)
        seconds = time.perf_counter() - started
        epoch_seconds.append(seconds)
        row = {"epoch": epoch + 1, "loss": loss_sum / trained,
               "accuracy": hits / trained if stats.classified else None, "lr": lr, "seconds": seconds}
        state.history.append(row)
        if epoch + 1 in snapshot_epochs:
            state.snapshots[epoch + 1] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        progress.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy'] or 0.0:.3f}", refresh=False)
        store.save(checkpoint_state(epoch + 1, model, state))
        if history:
            write_history(Path(history), state.history)
        if on_epoch is not None:
            on_epoch(EpochEnd(epoch + 1, row, model))
    progress.close()
    if history and state.start_epoch == epochs:
        write_history(Path(history), state.history)  # resumed after the last epoch: the CSV still gets written
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return TrainResult(model=model, correct=state.correct, loss=state.losses, snapshots=state.snapshots,
                       epoch_seconds=epoch_seconds, runtime=runtime, history=state.history, digest=digest)


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoints.atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_weights(model: torch.nn.Module, path: str | os.PathLike, device="cpu") -> torch.nn.Module:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
