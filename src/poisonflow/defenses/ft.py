"""FT: fine-tune the victim on the defender's clean data.

The simplest post-training defense: keep training a copy of the victim with plain cross entropy
on clean samples, so the clean task keeps being reinforced while the trigger's association is
never rehearsed and fades. Data: ``clean_fraction`` of the reserve (all of it by default; the
reserve is 5% of the training set by default, BackdoorBench's ``ratio: 0.05``).

Recipe (``finetune``, merged over the victim's training entry), BackdoorBench's ``ft`` defense
(``defense/ft.py`` with ``config/defense/ft/{cifar10,cifar100,gtsrb}.yaml``): 100 epochs, batch 256,
SGD with lr 0.01, momentum 0.9 and weight decay 5e-4, cosine annealing over the run (its
``CosineAnnealingLR`` with T_max 100, stepped per epoch, where this trainer anneals per step).
Augmentation is the victim's own, as BackdoorBench fine-tunes with the dataset's training
transforms. Its Tiny-ImageNet config (200 epochs, lr reduced on plateau) is not the default; set
``finetune.epochs`` for it (the trainer has no plateau schedule). The training is checkpointed
each epoch in the defense's work directory, so a killed job resumes. The victim is not changed.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..kinds import settings_for
from ..trainer import train_model
from . import DefenseContext, DefenseResult, merge
from .clean_data import clean_split


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'ft' needs the victim model")
    resolved = settings_for(__name__, spec)
    index = clean_split(len(ctx.reserve_labels), float(resolved["clean_fraction"]), ctx.seed)
    workdir = Path(ctx.workdir)
    result = train_model(copy.deepcopy(ctx.victim), ctx.reserve_images[index], ctx.reserve_labels[index],
                         merge(ctx.training, resolved["finetune"]), seed=ctx.seed, device=ctx.device,
                         checkpoint=workdir / "finetune.pt", history=workdir / "history-finetune.csv", desc="ft")
    metrics = {"clean_samples": len(index), "finetune_epochs": len(result.history),
               "final_train_loss": float(result.history[-1]["loss"]) if result.history else float("nan")}
    return DefenseResult(model=result.model, metrics=metrics)
