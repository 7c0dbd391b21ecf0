"""Adversarial training (Madry et al., ICLR 2018) as a backdoor defense: the A-ABL paper's "Adv. Train".

A fresh model of the victim's architecture is trained on the whole released training set with PGD
adversarial training (ε = 8/255, step 2/255, 10 steps by default; the trainer's ``adversarial``
mode, examples against each sample's own label with BatchNorm frozen). Every sample is kept: the
defense removes nothing and relies on robust training alone to suppress triggers that are fragile
to small perturbations. Robust accuracy is measured by the evaluation's PGD-10 like every model's.

Spec keys (defaults in ``adv_train.yaml`` beside this module): ``training``, merged over the
victim's training entry. The A-ABL paper's recipe (100 epochs, SGD lr 0.1, ×0.1 at 50/75/90)
belongs in its presets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..kinds import settings_for
from ..trainer import train_model
from . import DefenseContext, DefenseResult, merge


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    resolved = settings_for(__name__, spec)
    workdir = Path(ctx.workdir)
    model = ctx.fresh_model()
    result = train_model(model, ctx.train_images, ctx.train_labels, merge(ctx.training, resolved["training"]),
                         seed=ctx.seed, device=ctx.device, checkpoint=workdir / "adv-train.pt",
                         history=workdir / "history-adv-train.csv", desc="adv-train", on_epoch=ctx.observer)
    return DefenseResult(model=result.model, kept=np.ones(len(ctx.train_labels), dtype=bool))
