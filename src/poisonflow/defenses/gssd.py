"""GSSD: generative self-supervised defense (appendix and official code ivansabolic/GSSD).

The defender has the released training set and the standardized features of its images from a
model that never saw a label (the ``features`` stage: SimCLR trained on the released images, or
CLIP). GSSD then

1. fits one normalizing flow per class on the features of the samples labelled with it
   (:func:`poisonflow.flows.train_class_flows`) and reads log p(z|c)/D for every sample and class;
2. flags the attacked classes and plans each one (:func:`poisonflow.gssd.plan`): a disruptive
   attack (poisons unlike any class) keeps the ``alpha_c_disruptive`` lowest-scored samples of the
   class and drops the rest; a non-disruptive one (poisons like their source class) keeps the top
   ``alpha_c``, relabels the bottom ``alpha_p`` to their best other class and drops the middle;
   unflagged classes keep everything;
3. trains a fresh model from scratch on the kept samples with the victim's recipe (``retrain``);
4. fine-tunes it on the relabeled samples under their new labels (``finetune``: 2 epochs, lr 1e-4).

The official retraining script reads the ground-truth poison indices when it filters; here the
filter is the flows' verdict alone. Nothing the defense reads tells which samples are poisoned:
the defense stage scores ``kept`` and the relabels against ground truth after it returns.

``classifier: discriminative`` is appendix J's ablation: an MLP on the same features in place of
the flows, its log-softmax as the class scores; it cannot detect, so the defense is told the target
classes (``targets``) and filters and relabels them the same way.

Metrics (no ground truth): ``detected_classes`` and ``attack_types`` (lists, class order),
``relabeled`` (count), and the flows' mean NLL per dimension on their own class.

Flows, retraining and fine-tuning checkpoint in the work directory; the flows' verdict is stored
there too (``densities.pt``, under a digest of what they depend on), so a killed job resumes without
refitting anything finished.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint as checkpoints
from .. import fingerprint
from .. import flows as class_flows
from .. import gssd as decisions
from ..errors import ConfigError
from ..kinds import settings_for
from ..trainer import train_model
from . import DefenseContext, DefenseResult, merge


def flow_settings(resolved: dict) -> dict:
    """The fragment's ``flows`` block as :func:`poisonflow.flows.train_class_flows` settings."""
    block = resolved["flows"]
    optimizer = {**class_flows.DEFAULTS["optimizer"], "lr": float(block["lr"])}
    return {"steps": int(block["steps"]), "hidden_ratio": float(block["hidden_ratio"]),
            "epochs": int(block["epochs"]), "batch_size": int(block["batch_size"]), "optimizer": optimizer}


def detection_settings(resolved: dict) -> dict:
    return {key: resolved[key] for key in decisions.DEFAULTS}


def class_densities(ctx: DefenseContext, resolved: dict) -> np.ndarray:
    """(N, C): log p(z_n|c)/D under flows fitted per class on the released features, or for
    ``classifier: discriminative`` the MLP's log p(c|z_n)."""
    if resolved["classifier"] == "discriminative":
        return discriminative_log_probs(ctx, resolved)
    workdir = Path(ctx.workdir) / "flows"
    flows = class_flows.train_class_flows(ctx.features, ctx.train_labels, ctx.num_classes, flow_settings(resolved),
                                          seed=ctx.seed, device=ctx.device, checkpoint_dir=workdir)
    return class_flows.class_log_probs(flows, ctx.features)


def discriminative_log_probs(ctx: DefenseContext, resolved: dict) -> np.ndarray:
    """Appendix J: linear → ReLU → linear on the features, cross entropy on the released labels;
    its log-softmax for every sample."""
    block = resolved["discriminative"]
    dim = ctx.features.shape[1]
    hidden = int(block["hidden"] or dim)
    torch.manual_seed(ctx.seed)
    mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, ctx.num_classes))
    training = {"epochs": int(block["epochs"]), "batch_size": int(block["batch_size"]),
                "optimizer": {"name": "adam", "lr": float(block["lr"])}, "schedule": {"name": "constant"},
                "augment": [], "adversarial": None, "amp": False, "compile": False}
    mlp = train_model(mlp, ctx.features, ctx.train_labels, training, seed=ctx.seed, device=ctx.device,
                      checkpoint=Path(ctx.workdir) / "discriminative.pt",
                      history=Path(ctx.workdir) / "history-discriminative.csv", desc="gssd discriminative").model
    mlp.eval()
    with torch.no_grad():
        logits = mlp(torch.from_numpy(np.ascontiguousarray(ctx.features, dtype=np.float32)).to(ctx.device))
    return torch.log_softmax(logits.double(), dim=1).cpu().numpy()


def flagged_classes(log_probs: np.ndarray, labels: np.ndarray, resolved: dict) -> decisions.GssdPlan:
    """The flows detect; the discriminative classifier is told the targets (appendix J)."""
    if resolved["classifier"] == "discriminative":
        return decisions.plan_for(log_probs, labels, {c: resolved["target_attack"] for c in resolved["targets"]},
                                  detection_settings(resolved))
    return decisions.plan(log_probs, labels, detection_settings(resolved))


def verdict(ctx: DefenseContext, resolved: dict) -> tuple[decisions.GssdPlan, np.ndarray]:
    """The plan and the densities it was drawn from. The densities are stored in the work directory
    under a digest of what they depend on (the classifier's settings, the seed, the features and
    labels), so a killed job reruns without refitting and an edited one refits."""
    keys = {key: resolved[key] for key in ("flows", "classifier", "discriminative")}
    digest = fingerprint.digest(keys, int(ctx.seed), fingerprint.data_digest(ctx.features, ctx.train_labels))
    stored = checkpoints.cached(Path(ctx.workdir) / "densities.pt", digest,
                                lambda: {"log_probs": torch.from_numpy(class_densities(ctx, resolved))})
    log_probs = stored["log_probs"].numpy()
    return flagged_classes(log_probs, ctx.train_labels, resolved), log_probs


def own_class_nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean −log p(z|y)/D of the samples under their own label's flow."""
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    resolved = settings_for(__name__, spec)
    if ctx.features is None:
        raise ConfigError("gssd.features: the defense was given no features (the features stage's features.npz)")
    if len(ctx.features) != len(ctx.train_labels):
        raise ConfigError(f"gssd.features: {len(ctx.features)} feature rows for {len(ctx.train_labels)} training "
                          f"samples: the features were computed on another store")
    if resolved["classifier"] == "discriminative":
        if not resolved["targets"]:
            raise ConfigError("gssd.targets: classifier discriminative cannot detect; name the target classes")
        if max(resolved["targets"]) >= ctx.num_classes:
            raise ConfigError(f"gssd.targets: class {max(resolved['targets'])} of {ctx.num_classes}")
    started = time.perf_counter()
    plan, log_probs = verdict(ctx, resolved)
    flows_seconds = time.perf_counter() - started
    if not plan.kept.any():
        raise ConfigError("gssd: the filter kept no sample to retrain on (lower alpha_c / alpha_c_disruptive?)")
    workdir = Path(ctx.workdir)
    retraining = merge(ctx.training, resolved["retrain"])
    model = train_model(ctx.fresh_model(0), ctx.train_images[plan.kept], ctx.train_labels[plan.kept], retraining,
                        seed=ctx.seed, device=ctx.device, checkpoint=workdir / "retrain.pt",
                        history=workdir / "history-retrain.csv", desc="gssd retrain").model
    if len(plan.relabeled):
        model = train_model(model, ctx.train_images[plan.relabeled], plan.new_labels,
                            merge(retraining, resolved["finetune"]), seed=ctx.seed + 1, device=ctx.device,
                            checkpoint=workdir / "finetune.pt", history=workdir / "history-finetune.csv",
                            desc="gssd fine-tune").model
    model.eval()
    retrain_seconds = time.perf_counter() - started - flows_seconds
    flows = resolved["classifier"] == "flows"
    own = "flow_nll" if flows else "classifier_nll"
    # given classes (discriminative) are not a detection: not scored as one
    flagged = sorted(plan.flagged)
    metrics = {"detected_classes" if flows else "given_classes": flagged,
               "attack_types": [plan.flagged[c] for c in flagged], "relabeled": int(len(plan.relabeled)), own: own_class_nll(log_probs, ctx.train_labels),
               "flows_seconds": flows_seconds, "retrain_seconds": retrain_seconds}
    return DefenseResult(model=model, metrics=metrics, kept=plan.kept.copy(), relabeled=plan.relabeled,
                         new_labels=plan.new_labels)
