"""MixMatch (Berthelot et al., NeurIPS 2019) as a training mode of the trainer: the semi-supervised
stage of DBD and ASD.

Each step of :func:`poisonflow.trainer.train_model` brings a labeled batch (the samples of the
epoch's subset, augmented once by the training recipe); :class:`MixMatch`'s objective draws an
unlabeled batch of the same size from the samples outside the subset (a seeded shuffle, drawn from
one after the other and reshuffled when used up), augments it twice (K = 2), and

1. guesses its labels: the mean of the two views' softmax (no gradient), sharpened with
   temperature T: p^(1/T) / Σ p^(1/T);
2. mixes: λ ~ Beta(α, α), λ' = max(λ, 1 − λ); the labeled, first-view and second-view inputs (and
   their one-hot / guessed targets) are concatenated and each row is mixed with the row of a random
   permutation, λ'·a + (1 − λ')·b;
3. descends on L_x + λ_u(t)·L_u: L_x the soft cross entropy of the labeled rows, L_u the squared
   error between softmax and target averaged over the unlabeled rows and the classes, and
   λ_u(t) = λ_u · clip(t / rampup, 0, 1) with t = epoch + offset + step / steps-per-epoch.

Defaults (the official DBD and ASD code, which take MixMatch from YU1ut/MixMatch-pytorch): T 0.5,
α 0.75, λ_u 15, K 2. Simplification: the official code runs the mixed batch through the network
in three interleaved chunks of one batch each (so that every forward's BatchNorm statistics mix
labeled and unlabeled rows); here it is one forward over all of it, whose batch statistics are
those of the same mixture.

Which samples are labeled in an epoch is the trainer's ``resplit`` (the defense's split); the
mode only needs the complement, which :meth:`MixMatch.set_labeled` is told.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import augment
from .trainer import Objective, StepContext, StepOutput, images_to_tensor

DEFAULTS = {"temperature": 0.5, "alpha": 0.75, "lambda_u": 15.0, "rampup": 16.0, "rampup_offset": 0.0}


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised per row."""
    p = p ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def mix_weight(generator: torch.Generator, alpha: float) -> float:
    """λ' = max(λ, 1 − λ), λ ~ Beta(α, α), drawn from the run's generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def ramp(t: float, lambda_u: float, length: float) -> float:
    """λ_u · clip(t / length, 0, 1)."""
    return lambda_u * float(np.clip(t / length, 0.0, 1.0)) if length > 0 else lambda_u


def mixmatch_losses(logits: torch.Tensor, targets: torch.Tensor, labeled: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per labeled row: the soft cross entropy; and L_u, the mean squared error of the unlabeled
    rows' softmax against their targets, over rows and classes."""
    lx = -(targets[:labeled] * F.log_softmax(logits[:labeled], dim=1)).sum(1)
    lu = ((F.softmax(logits[labeled:], dim=1) - targets[labeled:]) ** 2).mean()
    return lx, lu


def steps_per_epoch(training: dict, labeled: np.ndarray) -> int:
    """The steps the trainer runs in an epoch of ``training`` with ``labeled`` (a bool mask) as its
    subset: ``epoch_steps``, else one pass over the labeled samples."""
    return int(training.get("epoch_steps") or -(-int(np.sum(labeled)) // int(training["batch_size"])))


class MixMatch:
    """The MixMatch objective over one training set (uint8 NHWC ``images``), for ``train_model``."""

    def __init__(self, images: np.ndarray, num_classes: int, settings: dict, device: torch.device):
        self.settings = {**DEFAULTS, **settings}
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.images = images_to_tensor(images, self.device)
        self.unlabeled = torch.arange(len(images))
        self.queue = torch.zeros(0, dtype=torch.long)
        self.steps_per_epoch = 1
        self.step = 0
        self.epoch = -1
        self.augmenter = None

    def set_labeled(self, labeled: np.ndarray, steps_per_epoch: int) -> None:
        """The epoch's split: a bool mask of the labeled samples; the rest are drawn unlabeled."""
        self.unlabeled = torch.from_numpy(np.flatnonzero(~np.asarray(labeled, dtype=bool)))
        self.queue = torch.zeros(0, dtype=torch.long)
        self.steps_per_epoch = max(1, int(steps_per_epoch))

    def unlabeled_batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        while len(self.queue) < size:
            if len(self.unlabeled) == 0:
                raise ValueError("mixmatch: no unlabeled sample to draw (the split labeled every sample)")
            self.queue = torch.cat([self.queue, self.unlabeled[torch.randperm(len(self.unlabeled), generator=generator)]])
        batch, self.queue = self.queue[:size], self.queue[size:]
        return batch

    def loss(self, net: torch.nn.Module, batch: augment.MixedBatch, ctx: StepContext) -> StepOutput:
        s = self.settings
        if ctx.epoch != self.epoch:
            self.epoch, self.step = ctx.epoch, 0
        if self.augmenter is None:
            names = [n for n in ctx.settings["augment"] if n not in ("cutmix", "mixup")]
            self.augmenter = augment.BatchAugment(names, ctx.settings)
        size = len(batch.labels)
        index = self.unlabeled_batch(size, ctx.generator).to(self.device)
        raw = self.images[index]
        dummy = torch.zeros(size, dtype=torch.long, device=self.device)
        u1 = self.augmenter(raw, dummy, ctx.generator).images
        u2 = self.augmenter(raw, dummy, ctx.generator).images
        with torch.no_grad(), ctx.autocast():
            guess = (F.softmax(net(u1).float(), 1) + F.softmax(net(u2).float(), 1)) / 2
        guess = sharpen(guess, float(s["temperature"]))
        onehot = F.one_hot(batch.labels, self.num_classes).float()
        inputs = torch.cat([batch.images, u1, u2])
        targets = torch.cat([onehot, guess, guess])
        lam = mix_weight(ctx.generator, float(s["alpha"]))
        perm = torch.randperm(len(inputs), generator=ctx.generator).to(self.device)
        mixed_inputs = lam * inputs + (1 - lam) * inputs[perm]
        mixed_targets = lam * targets + (1 - lam) * targets[perm]
        with ctx.autocast():
            logits = net(mixed_inputs).float()
        lx, lu = mixmatch_losses(logits, mixed_targets, size)
        t = self.epoch + float(s["rampup_offset"]) + self.step / self.steps_per_epoch
        self.step += 1
        return StepOutput(lx + ramp(t, float(s["lambda_u"]), float(s["rampup"])) * lu)

    def objective(self) -> Objective:
        return Objective(self.loss, {"mixmatch": {k: self.settings[k] for k in sorted(DEFAULTS)}})
