"""Training on another defense's split (``kind: split-train``).

A splitting defense (its fragment declares ``split:``; A-ABL) computes its split — which released
training samples it keeps, and the per-sample scores it decided on — in a job of its own, the split
stage (``results/splits/{dataset}/{attack}/{training}/seed{seed}/{entry}/split.npz``). The defense
itself and any number of ``split-train`` entries naming it (``splitter: <entry>``) read that one
file, so a split feeds naive training (A-ABL's Table 2: the victim's recipe on D_vul), adversarial
training (``training: {adversarial: {...}}``) or anything else, and editing a training never
recomputes the split. This kind trains a fresh model of the victim's architecture on the kept
samples with ``training`` merged over the victim's recipe; the stage scores ``kept`` afterwards.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..kinds import settings_for
from ..trainer import train_model
from . import DefenseContext, DefenseResult, merge


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    resolved = settings_for(__name__, spec)
    if ctx.split is None:
        raise ConfigError(f"split-train.splitter: the defense was given no split (the split job of "
                          f"'{resolved.get('splitter')}')")
    kept = ctx.split.kept
    if len(kept) != len(ctx.train_labels) or not kept.any():
        raise ConfigError(f"split-train.splitter: the split keeps {int(kept.sum())} of {len(kept)} samples for a "
                          f"training set of {len(ctx.train_labels)}")
    workdir = Path(ctx.workdir)
    model = train_model(ctx.fresh_model(0), ctx.train_images, ctx.train_labels, merge(ctx.training, resolved["training"]),
                        subset=kept, seed=ctx.seed, device=ctx.device, checkpoint=workdir / "train.pt",
                        history=workdir / "history-train.csv", desc="split-train", on_epoch=ctx.observer).model
    return DefenseResult(model=model.eval(), metrics={"gamma": float(kept.mean())}, kept=kept,
                         sample_scores=ctx.split.sample_scores, thresholds=ctx.split.thresholds)
