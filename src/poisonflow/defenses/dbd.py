"""DBD: backdoor defense via decoupling the training process (Huang et al., ICLR 2022; official code
SCLBD/DBD).

A model trained end to end with labels learns the trigger → target shortcut because the poisoned
labels pull the poisoned images into the target class. DBD decouples that:

1. **Self-supervised backbone.** SimCLR on the released training images without labels (the
   ``features`` stage, shared with GSSD): the poisoned images stay near their source class.
2. **Linear head** on the frozen backbone with symmetric cross entropy (α 0.1, β 1), 10 epochs
   of Adam (lr 0.002). The backbone gets no gradient; as in the official code it is in training
   mode, so its BatchNorm statistics follow the data.
3. **Split**, before every MixMatch epoch: the per-sample SCE of the current model (eval mode) on
   the released labels; the lowest ``epsilon`` share (0.5) over the whole set is labeled, the rest
   loses its labels. Poisoned samples, whose label disagrees with their features, land mostly in
   the high-loss half.
4. **MixMatch** (:mod:`poisonflow.mixmatch`, a trainer mode) on the whole network: 190 epochs of
   1,024 steps, Adam lr 0.002, T 0.5, α 0.75, λ_u 15 ramped linearly over 190 epochs counting the
   10 head epochs (as the official counter does).

Simplifications against the official code: the split ranks un-augmented images (official: images
under the training augmentation); the MixMatch stage starts a fresh Adam (official: the head's
optimizer, its state included, continues); MixMatch's interleaved forwards are one forward (see
:mod:`poisonflow.mixmatch`); SimCLR's settings are the features entry's (DBD's own: SGD lr 0.4,
batch 512, Gaussian blur, which the features stage does not do).

``kept`` reports the split under the final model (the samples it would label), so the stage scores ``gamma`` (labeled share),
``rho_vul`` (poison share among them) and ``poison_removed`` (share of the poisons left unlabeled);
every sample is still trained on, the unlabeled ones without their label. Never reads ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, StoreError
from ..kinds import settings_for
from ..losses import symmetric_cross_entropy
from ..mixmatch import MixMatch, steps_per_epoch
from ..modelio import load_into
from ..splits import lowest_share, per_sample_sce
from ..trainer import Objective, StepContext, StepOutput, train_model
from . import DefenseContext, DefenseResult, merge


def pretrained_backbone(ctx: DefenseContext, name: str) -> torch.nn.Module:
    """The features entry's SimCLR backbone in a model of the victim's architecture, a fresh head."""
    if ctx.features_dir is None:
        raise ConfigError(f"{name}.features: the defense was given no features folder (the features stage's output)")
    path = Path(ctx.features_dir) / "backbone.pt"
    if not path.exists():
        raise ConfigError(f"{name}.features: {path} does not exist: the features entry must be a SimCLR one")
    model = ctx.fresh_model(0)
    try:
        load_into(model, path, ctx.device)
    except StoreError as error:
        raise ConfigError(f"{name}.features: its backbone is not the victim's architecture ({error})") from None
    torch.manual_seed(ctx.seed)
    model.fc.reset_parameters()
    return model


def head_objective(alpha: float, beta: float) -> Objective:
    """SCE of the head on the backbone's features, computed without gradient (a frozen backbone)."""
    def loss(net, batch, ctx: StepContext) -> StepOutput:
        with ctx.autocast():
            with torch.no_grad():
                features = net.features(batch.images)
            logits = net.fc(features).float()
        return StepOutput(symmetric_cross_entropy(logits, batch.labels, alpha, beta), logits)

    return Objective(loss, {"dbd_head": {"alpha": alpha, "beta": beta}})


def mixmatch_settings(resolved: dict) -> dict:
    return {key: resolved[key] for key in ("temperature", "alpha", "lambda_u", "rampup", "rampup_offset")}


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    resolved = settings_for(__name__, spec)
    workdir = Path(ctx.workdir)
    alpha, beta = float(resolved["sce"]["alpha"]), float(resolved["sce"]["beta"])
    model = pretrained_backbone(ctx, "dbd")
    model = train_model(model, ctx.train_images, ctx.train_labels, merge(ctx.training, resolved["warmup"]),
                        seed=ctx.seed, device=ctx.device, objective=head_objective(alpha, beta),
                        checkpoint=workdir / "warmup.pt", history=workdir / "history-warmup.csv",
                        desc="dbd head").model
    training = merge(ctx.training, resolved["mixmatch"])
    mixmatch = MixMatch(ctx.train_images, ctx.num_classes, mixmatch_settings(resolved), ctx.device)

    def split(epoch: int, net: torch.nn.Module) -> np.ndarray:
        losses = per_sample_sce(net, ctx.train_images, ctx.train_labels, alpha, beta, ctx.device)
        mask = lowest_share(losses, float(resolved["epsilon"]))
        mixmatch.set_labeled(mask, steps_per_epoch(training, mask))
        return mask

    model = train_model(model, ctx.train_images, ctx.train_labels, training, seed=ctx.seed + 1, device=ctx.device,
                        objective=mixmatch.objective(), resplit=split, checkpoint=workdir / "mixmatch.pt",
                        history=workdir / "history-mixmatch.csv", desc="dbd mixmatch").model
    kept = split(int(training["epochs"]), model)  # the split under the final model
    return DefenseResult(model=model.eval(), metrics={"labeled_share": float(kept.mean())}, kept=kept)
