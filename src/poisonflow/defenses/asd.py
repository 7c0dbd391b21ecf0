"""ASD: backdoor defense via adaptively splitting the poisoned dataset (Gao et al., CVPR 2023;
official code KuofengGao/ASD).

A model is trained from scratch with MixMatch (:mod:`poisonflow.mixmatch`) on a split of the
released training set into a labeled clean pool and an unlabeled polluted pool, re-split before
every epoch with the model as it is, in three stages:

1. **Class-aware loss-guided split** (epochs < ``split_epochs[0]``, 60): the clean pool is a seed
   pool of ``seed_per_class`` (10) clean samples per class plus, per class, the
   ``growth.count``·⌊epoch / ``growth.every``⌋ training samples of lowest symmetric cross entropy
   (α 0.1, β 1) under their released label: none at epochs 0–4, 10 per class at 5–9, …
2. **Class-agnostic loss-guided split** (epochs < ``split_epochs[1]``, 90): the ``epsilon`` (50%)
   of lowest SCE over the whole set.
3. **Meta-split** (to the end, 120): a copy of the model (the "virtual model") is trained for one
   epoch with cross entropy on the whole released set, Adam lr 0.015, only its last two resolution
   stages and its head (official: ResNet's layer3, layer4 and linear); the ``epsilon`` of samples
   whose SCE fell least from the model to the copy form the clean pool (poisons, learned early, are
   not improved by a further step; clean hard samples are).

MixMatch: 1,024 steps per epoch, 64 + 64 per step, Adam lr 0.002, T 0.5, α 0.75, λ_u 15 ramped
over all 120 epochs.

Differences from the official code: the seed pool comes from the reserve (the clean data a
defender holds; the official code draws it from the training set's clean samples with the poison
flags) and stays labeled in every stage (official: in stage 2 and 3 the seeds are ranked like
every sample); SCE ranks un-augmented images (official: under the training augmentation); the
meta model is trained through the trainer with its augmentation; MixMatch's interleaved forwards
are one forward (see :mod:`poisonflow.mixmatch`).

``kept`` reports the training samples of the split under the final model (the stage scores
``gamma``, ``rho_vul``, ``poison_removed`` from it); every sample is trained on, the unlabeled ones
without their label. The defense never reads ground truth.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..kinds import settings_for
from ..mixmatch import MixMatch, steps_per_epoch
from ..models import stage_ends
from ..splits import lowest_per_class, lowest_share, per_sample_sce
from ..trainer import train_model
from . import DefenseContext, DefenseResult, merge


def seed_pool(images: np.ndarray, labels: np.ndarray, per_class: int, num_classes: int,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` samples of every class drawn at random from the reserve."""
    rng = np.random.default_rng([seed, 7])
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ConfigError(f"asd.seed_per_class: the reserve holds {len(members)} samples of class {label}, "
                              f"fewer than {per_class} (raise datasets.<name>.reserve)")
        chosen.append(rng.choice(members, per_class, replace=False))
    index = np.concatenate(chosen)
    return images[index], labels[index]


def stage1_count(epoch: int, growth: dict) -> int:
    """Training samples per class added to the seeds at ``epoch`` (0-based)."""
    return int(growth["count"]) * (epoch // int(growth["every"]))


def trainable_tail(model: torch.nn.Module, image_shape: tuple[int, int], stages: int) -> list[torch.nn.Parameter]:
    """Parameters of the last ``stages`` resolution stages of ``model.body`` and of its head."""
    ends = stage_ends(model.body, image_shape)
    first = ends[-stages - 1] + 1 if len(ends) > stages else 0
    params = [p for child in list(model.body)[first:] for p in child.parameters()]
    return params + list(model.fc.parameters())


def meta_model(model: torch.nn.Module, ctx: DefenseContext, resolved: dict, epoch: int) -> torch.nn.Module:
    """The virtual model: a copy of ``model`` trained on the released set, only its tail."""
    virtual = copy.deepcopy(model)
    tail = {id(p) for p in trainable_tail(virtual, tuple(ctx.train_images.shape[1:3]), int(resolved["meta"]["stages"]))}
    for parameter in virtual.parameters():
        parameter.requires_grad_(id(parameter) in tail)
    meta = resolved["meta"]
    training = merge(ctx.training, {"epochs": int(meta["epochs"]), "batch_size": int(meta["batch_size"]),
                                    "epoch_steps": None, "adversarial": None,
                                    "optimizer": {"name": "adam", "lr": float(meta["lr"]), "weight_decay": 0.0},
                                    "schedule": {"name": "constant"}})
    return train_model(virtual, ctx.train_images, ctx.train_labels, training, seed=ctx.seed * 1000 + epoch,
                       device=ctx.device, desc=f"asd meta {epoch}").model


def clean_pool(epoch: int, model: torch.nn.Module, ctx: DefenseContext, resolved: dict) -> np.ndarray:
    """The stage's labeled training samples (a bool mask over the released set)."""
    alpha, beta = float(resolved["sce"]["alpha"]), float(resolved["sce"]["beta"])
    losses = per_sample_sce(model, ctx.train_images, ctx.train_labels, alpha, beta, ctx.device)
    first, second = (int(e) for e in resolved["split_epochs"])
    if epoch < first:
        return lowest_per_class(losses, ctx.train_labels, stage1_count(epoch, resolved["growth"]))
    if epoch < second:
        return lowest_share(losses, float(resolved["epsilon"]))
    virtual = meta_model(model, ctx, resolved, epoch)
    after = per_sample_sce(virtual, ctx.train_images, ctx.train_labels, alpha, beta, ctx.device)
    return lowest_share(losses - after, float(resolved["epsilon"]))


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    resolved = settings_for(__name__, spec)
    first, second = (int(e) for e in resolved["split_epochs"])
    if first > second:
        raise ConfigError(f"asd.split_epochs: stage 1 must end before stage 2 ({first} > {second})")
    seeds_x, seeds_y = seed_pool(ctx.reserve_images, ctx.reserve_labels, int(resolved["seed_per_class"]),
                                 ctx.num_classes, ctx.seed)
    images = np.concatenate([ctx.train_images, seeds_x])
    labels = np.concatenate([ctx.train_labels, seeds_y]).astype(np.int64)
    training = merge(ctx.training, resolved["mixmatch"])
    settings = {key: resolved[key] for key in ("temperature", "alpha", "lambda_u", "rampup")}
    mixmatch = MixMatch(images, ctx.num_classes, settings, ctx.device)

    def split(epoch: int, net: torch.nn.Module) -> np.ndarray:
        pool = clean_pool(epoch, net, ctx, resolved)
        mask = np.concatenate([pool, np.ones(len(seeds_y), dtype=bool)])
        mixmatch.set_labeled(mask, steps_per_epoch(training, mask))
        return mask

    model = train_model(ctx.fresh_model(0), images, labels, training, seed=ctx.seed, device=ctx.device,
                        objective=mixmatch.objective(), resplit=split, checkpoint=Path(ctx.workdir) / "mixmatch.pt",
                        history=Path(ctx.workdir) / "history-mixmatch.csv", desc="asd mixmatch").model
    kept = clean_pool(int(training["epochs"]), model, ctx, resolved)  # the split under the final model
    return DefenseResult(model=model.eval(), metrics={"labeled_share": float(kept.mean())}, kept=kept)
