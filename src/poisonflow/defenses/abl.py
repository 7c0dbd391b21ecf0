"""ABL: anti-backdoor learning (Li et al., NeurIPS 2021) in three stages.

Backdoor samples are learned much faster than clean ones: their loss drops to near zero within a
few epochs. ABL turns that into a detector and then removes what it detected.

1. **Isolation.** Train a fresh model on the whole released training set with the local gradient
   ascent loss LGA = sign(ℓ − γ)·ℓ, ℓ the cross entropy (γ = 0.5, 20 epochs, SGD lr 0.1). Once
   the loss falls below γ its gradient is reversed, so training hovers at a loss of γ instead of
   fitting everything; the samples that are learned first and most strongly — backdoor samples —
   sit far below γ. Afterwards the per-sample losses (eval mode, no augmentation) are ranked and
   the ``isolation_ratio`` (1%) lowest are isolated as suspected poisons.
2. **Training on the rest.** The isolation model continues training with plain cross entropy on
   the samples that were not isolated (60 epochs, lr 0.1, ×0.1 after epoch 40); its clean accuracy
   recovers while it still carries the backdoor it learned in stage 1.
3. **Unlearning.** Gradient ascent on the isolated samples (loss −CE, lr 5e-4, 20 epochs, no
   augmentation) breaks the link between the trigger and the target label.

The paper writes the last two stages as one objective over the remaining epochs, Σ_rest ℓ −
Σ_isolated ℓ; here they run one after the other (first the rest, then the ascent), which splits
the paper's 100-epoch budget after 20 isolation epochs as 60 + 20. Each stage starts from the
previous stage's model and gets a fresh optimizer.

LGA comes in two forms (``lga``). ``batch`` (the default) applies the sign to the batch-mean
loss, sign(ℓ̄ − γ)·ℓ̄: the mean is held at γ while single samples may fall far below it. This is
the form ABL's published results were produced with. ``sample`` applies the sign to each sample's
loss and averages, the literal reading of the paper's E[sign(ℓ − γ)·ℓ]: it holds every sample,
backdoor samples included, near γ, and isolates far worse (digits at 16 px, 10% BadNets, 1%
isolated, seeds 0–3: precision 1.00 in each for ``batch``, at most 0.06 for ``sample``). Both have the
gradient of flooding, |ℓ − γ| + γ, at their level; at ℓ = γ exactly the sign is 0, which
contributes no gradient.

Every stage is checkpointed in the defense's work directory, and the isolated set is stored there
too, so a killed job resumes where it stopped. The defense never sees which samples are poisoned;
the defense stage scores ``kept`` (the samples that were not isolated) against the ground truth
afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import checkpoint as checkpoints
from .. import fingerprint
from ..kinds import settings_for
from ..trainer import Objective, cross_entropy_objective, images_to_tensor, to_float, train_model
from . import DefenseContext, DefenseResult, merge

# SGD with Nesterov momentum 0.9 and weight decay 1e-4 in every stage (the paper's CIFAR-10 setup).
_SGD = {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}


# Isolation objectives: a batch's per-sample cross entropy and γ → the per-sample loss whose batch
# mean the trainer descends on. For ``batch`` every sample carries the sign of the batch mean, so
# that mean is sign(ℓ̄ − γ)·ℓ̄, with the same gradient.
LGA_FORMS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "sample": lambda ce, gamma: lga_loss(ce, gamma),
    "batch": lambda ce, gamma: torch.sign(ce.mean() - gamma) * ce,
}


@dataclass
class Isolation:
    isolated: np.ndarray  # bool (N,): the lowest-loss samples, suspected poisons
    losses: np.ndarray  # float (N,): per-sample cross entropy under the isolation model


# --- losses and the isolation rule -----------------------------------------------------------------


def lga_loss(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """sign(ℓ − γ)·ℓ elementwise: losses below γ are negated, so descending on them is ascent."""
    return torch.sign(ce - gamma) * ce


def unlearning_loss(ce: torch.Tensor) -> torch.Tensor:
    """−ℓ per sample: descending on its mean is gradient ascent on the cross entropy."""
    return -ce


def lga_objective(resolved: dict) -> Objective:
    """The isolation stage's objective: LGA of the chosen form on the per-sample cross entropy."""
    gamma, form = float(resolved["gamma"]), LGA_FORMS[resolved["lga"]]
    return cross_entropy_objective(lambda ce: form(ce, gamma), {"lga": resolved["lga"], "gamma": gamma})


UNLEARNING = cross_entropy_objective(unlearning_loss, "gradient_ascent")


def isolation_count(n: int, ratio: float) -> int:
    """⌊ratio·n⌋ samples, at least one so that unlearning has something to work on."""
    return min(n, max(1, math.floor(ratio * n)))


def lowest_loss_mask(losses: np.ndarray, ratio: float) -> np.ndarray:
    """bool mask of the ⌊ratio·n⌋ lowest losses (ties: the lower index first)."""
    losses = np.asarray(losses, dtype=np.float64)
    if np.isnan(losses).any():
        raise ValueError("abl: a per-sample loss is NaN; the isolation model diverged")
    order = np.argsort(losses, kind="stable")
    mask = np.zeros(len(losses), dtype=bool)
    mask[order[:isolation_count(len(losses), ratio)]] = True
    return mask


@torch.no_grad()
def per_sample_loss(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                    device: torch.device | str = "cpu", batch_size: int = 256) -> np.ndarray:
    """Cross entropy of each uint8 NHWC image under ``model`` in eval mode, without augmentation."""
    model.eval()
    losses = []
    for start in range(0, len(images), batch_size):
        x = to_float(images_to_tensor(images[start:start + batch_size], device))
        y = torch.as_tensor(np.asarray(labels[start:start + batch_size]), dtype=torch.long, device=device)
        losses.append(F.cross_entropy(model(x), y, reduction="none").double().cpu())
    return torch.cat(losses).numpy() if losses else np.zeros(0)


# --- the three stages ------------------------------------------------------------------------------


def isolation_training(ctx: DefenseContext, resolved: dict) -> torch.nn.Module:
    """Stage 1: LGA training of a fresh model on the whole released training set."""
    workdir = Path(ctx.workdir)
    return train_model(ctx.fresh_model(), ctx.train_images, ctx.train_labels, merge(ctx.training, resolved["isolation"]),
                       seed=ctx.seed, device=ctx.device, objective=lga_objective(resolved),
                       checkpoint=workdir / "isolation.pt", history=workdir / "history-isolation.csv",
                       desc="abl isolation").model


def isolate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, ratio: float,
            device: torch.device | str = "cpu", batch_size: int = 256) -> Isolation:
    """Rank the samples by their loss under the isolation model; isolate the lowest ``ratio``."""
    losses = per_sample_loss(model, images, labels, device, batch_size)
    return Isolation(isolated=lowest_loss_mask(losses, ratio), losses=losses)


def cached_isolation(model: torch.nn.Module, ctx: DefenseContext, resolved: dict) -> Isolation:
    """The isolation, stored in the work directory so a rerun continues on the same split.

    Keyed by the ratio, the data and the isolation model's weights: losses computed on a GPU need
    not be bit-reproducible, and a sample moving across the cut would invalidate the checkpoints
    of the later stages.
    """
    ratio = float(resolved["isolation_ratio"])

    def compute() -> dict:
        result = isolate(model, ctx.train_images, ctx.train_labels, ratio, ctx.device, int(resolved["batch_size"]))
        return {"isolated": torch.from_numpy(result.isolated), "losses": torch.from_numpy(result.losses)}

    digest = fingerprint.digest(ratio, fingerprint.data_digest(ctx.train_images, ctx.train_labels), model)
    stored = checkpoints.cached(Path(ctx.workdir) / "isolated.pt", digest, compute)
    return Isolation(isolated=stored["isolated"].numpy(), losses=stored["losses"].numpy())


def clean_training(model: torch.nn.Module, ctx: DefenseContext, kept: np.ndarray, clean: dict) -> torch.nn.Module:
    """Stage 2: continue training the isolation model with cross entropy on the kept samples.

    The checkpoint's digest covers the starting weights, so it is never resumed on top of a
    different isolation model.
    """
    workdir = Path(ctx.workdir)
    return train_model(model, ctx.train_images, ctx.train_labels, merge(ctx.training, clean), subset=kept,
                       seed=ctx.seed, device=ctx.device, checkpoint=workdir / "clean.pt",
                       history=workdir / "history-clean.csv", desc="abl clean").model


def unlearn(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, training: dict, *, seed: int,
            device: torch.device | str = "cpu", subset: np.ndarray | None = None, checkpoint: Path | None = None,
            history: Path | None = None) -> torch.nn.Module:
    """Stage 3: gradient ascent on the cross entropy of the isolated samples (``subset``, or all given)."""
    return train_model(model, images, labels, training, objective=UNLEARNING, subset=subset, seed=seed,
                       device=device, checkpoint=checkpoint, history=history, desc="abl unlearning").model


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    resolved = settings_for(__name__, spec)
    model = isolation_training(ctx, resolved)
    isolation = cached_isolation(model, ctx, resolved)
    kept = ~isolation.isolated
    if not kept.any():
        raise ValueError("abl: every sample was isolated; nothing is left to train on")
    model = clean_training(model, ctx, kept, resolved["clean"])
    model = unlearn(model, ctx.train_images, ctx.train_labels, merge(ctx.training, resolved["unlearning"]),
                    subset=isolation.isolated, seed=ctx.seed, device=ctx.device,
                    checkpoint=Path(ctx.workdir) / "unlearning.pt",
                    history=Path(ctx.workdir) / "history-unlearning.csv")
    metrics = {
        "isolated": int(isolation.isolated.sum()),
        # the largest isolation-model loss among the isolated samples: the cut the ratio implied
        "isolation_cutoff": float(isolation.losses[isolation.isolated].max()),
    }
    return DefenseResult(model=model, metrics=metrics, kept=kept)
