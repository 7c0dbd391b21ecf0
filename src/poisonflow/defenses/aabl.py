"""A-ABL: adversarially robust anti-backdoor learning in three stages.

1. Naive training on the whole released training set (Adam, lr 1e-3, constant, 20 epochs).
2. Split by adversarial vulnerability: iFGSM (ε = 2/255, step 2/255, 5 steps) against the stage-1 model,
   per-sample symmetric cross entropy of the adversarial examples, Otsu threshold. Samples the
   attack cannot push to a high loss are intrinsically robust — where patch-trigger poisons
   ("Category A") end up — and are removed; the vulnerable rest D_vul is kept.
3. PGD adversarial training of a fresh model on D_vul (ε = 8/255, step 2/255, 10 steps), which
   suppresses the poisons that survived the split because their triggers are fragile.

The losses, in the paper's words. The split is measured on SCE: "To enlarge the distance between
adversarially robust and vulnerable samples for better splitting, we use SCE loss to raise the
weight on the ground-truth label of each sample" (Sec. 4), with "OTSU [53] to search for the
threshold with the maximal variance between two clusters" on that SCE distribution (Fig. 9). Which
loss iFGSM itself ascends is not stated: ``split.attack_loss`` (default ce, the standard iFGSM).
The iFGSM step is the paper's 2/255 ("By using iFGSM with a step size equal to 2/255", Sec. 3), so
its first step already reaches the ε = 2/255 budget. ``split.perturbation: randaugment |
autoaugment`` measures the SCE under a strong augmentation instead (the paper's Table 5).

``split.max_kept`` caps γ: when Otsu keeps more than that share, the share of highest SCE is kept. The
paper does not state a cap, but its Table 1 reports γ = 90.00 exactly for No-Attack, Blend and SSBA on
CIFAR-10 and Tiny-ImageNet next to a (cut-off) sentence on the 90% benign share, which reads as one;
default none, 0.9 in the A-ABL presets.

Both training stages and the split are checkpointed in the defense's work directory, so a killed
job resumes where it stopped. The defense never sees which samples are poisoned.

Spec keys (defaults in ``aabl.yaml`` beside this module): ``stage1`` and ``stage3`` are overrides merged into the
victim's training entry; ``split`` configures stage 2. The paper's stage-3 recipe (100 epochs,
SGD lr 0.1, ×0.1 at epochs 50/75/90) belongs in a config preset; by default stage 3 inherits the
victim's epochs and optimizer. ``stage3: {adversarial: null}`` trains naively on D_vul instead. ``final_scores`` (default true) adds
the whole set's SCE under the final model, before and after the same perturbation, to the per-sample
scores (the paper's Fig. 11; one more pass of the split's attack over the released set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import augment
from .. import checkpoint as checkpoints
from .. import fingerprint
from ..adversarial import ifgsm
from ..kinds import settings_for
from ..losses import symmetric_cross_entropy
from ..thresholds import otsu_threshold
from ..trainer import images_to_tensor, to_float, train_model
from . import DefenseContext, DefenseResult, SplitResult, merge


ATTACK_LOSSES: dict[str, Callable[[dict], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "ce": lambda split: lambda logits, y: F.cross_entropy(logits, y, reduction="sum"),
    "sce": lambda split: lambda logits, y: symmetric_cross_entropy(
        logits, y, float(split["sce_alpha"]), float(split["sce_beta"]), reduction="sum"),
}

PERTURBATION_NAMES = {"ifgsm": "iFGSM", "randaugment": "RandAugment", "autoaugment": "AutoAugment"}


@dataclass
class VulnerabilitySplit:
    kept: np.ndarray  # bool (N,): adversarially vulnerable samples, D_vul
    threshold: float  # Otsu threshold on the SCE of the adversarial examples
    losses: np.ndarray  # float (N,): that per-sample SCE
    clean_losses: np.ndarray | None = None  # float (N,): the SCE of the unperturbed samples


def naive_training(ctx: DefenseContext, stage1: dict) -> torch.nn.Module:
    """Stage 1: train a fresh model on the whole released training set."""
    workdir = Path(ctx.workdir)
    result = train_model(ctx.fresh_model(), ctx.train_images, ctx.train_labels, merge(ctx.training, stage1),
                         seed=ctx.seed, device=ctx.device, checkpoint=workdir / "stage1.pt",
                         history=workdir / "history-stage1.csv", desc="aabl stage 1")
    return result.model


def augmented(names: list[str], images_u8: torch.Tensor, generator: torch.Generator, settings: dict) -> torch.Tensor:
    """Table 5's alternative to iFGSM: the uint8 batch under a strong augmentation, as floats."""
    return to_float(augment.apply(names, images_u8, generator, settings=settings))


def adversarial_sce(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, split: dict,
                    device: torch.device | str = "cpu", settings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample SCE of uint8 NHWC ``images`` and of their iFGSM adversarial examples (model in
    eval mode): (before, after). With ``split.perturbation`` randaugment or autoaugment, the
    augmented images (``settings``: the training entry's augmentation settings) replace the
    adversarial ones."""
    model.eval()
    perturbation = split.get("perturbation", "ifgsm")
    generator = torch.Generator().manual_seed(0)
    attack_loss = ATTACK_LOSSES[split["attack_loss"]](split)
    eps, steps = float(split["eps"]), int(split["steps"])
    step = None if split["step"] is None else float(split["step"])
    batch_size = int(split["batch_size"])
    losses, clean_losses = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="aabl split", unit="batch", leave=False,
                      dynamic_ncols=True):
        x_u8 = images_to_tensor(images[start:start + batch_size], device)
        x = to_float(x_u8)
        y = torch.as_tensor(np.asarray(labels[start:start + batch_size]), dtype=torch.long, device=device)
        if perturbation == "ifgsm":
            x_adv = ifgsm(model, x, y, eps, steps, step, loss_fn=attack_loss)
        else:
            x_adv = augmented([perturbation], x_u8, generator, settings or {})
        with torch.no_grad():
            for batch, out in ((x, clean_losses), (x_adv, losses)):
                out.append(symmetric_cross_entropy(model(batch), y, float(split["sce_alpha"]),
                                                   float(split["sce_beta"])).cpu())

    def joined(parts):
        return torch.cat(parts).double().numpy() if parts else np.zeros(0)
    return joined(clean_losses), joined(losses)


def split_by_vulnerability(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, split: dict,
                           device: torch.device | str = "cpu", settings: dict | None = None) -> VulnerabilitySplit:
    """Stage 2: keep the samples whose adversarial (or augmented) SCE lies above the Otsu threshold."""
    clean_losses, losses = adversarial_sce(model, images, labels, split, device, settings)
    threshold = otsu_threshold(losses, bins=int(split["bins"]))
    kept = losses > threshold
    if split.get("max_kept") is not None and kept.mean() > float(split["max_kept"]):
        kept, threshold = capped(losses, float(split["max_kept"]))
    return VulnerabilitySplit(kept=kept, threshold=threshold, losses=losses, clean_losses=clean_losses)


def capped(losses: np.ndarray, share: float) -> tuple[np.ndarray, float]:
    """The ⌊share·N⌋ samples of highest loss (ties by index) and, as the threshold, the highest loss
    of the samples left out (``split.max_kept``: Otsu kept more than that share)."""
    count = int(share * len(losses))
    order = np.argsort(-losses, kind="stable")
    kept = np.zeros(len(losses), dtype=bool)
    kept[order[:count]] = True
    return kept, float(losses[order[count]]) if count < len(losses) else float(losses.min())


def cached_split(model: torch.nn.Module, ctx: DefenseContext, split: dict) -> VulnerabilitySplit:
    """The split, stored in the work directory so a rerun trains stage 3 on the same D_vul.

    The cache key covers the split settings, the data and the stage-1 weights. A GPU attack need not
    be bit-reproducible; recomputing it after a kill could move samples across the threshold under a
    half-trained stage-3 checkpoint.
    """

    def compute() -> dict:
        result = split_by_vulnerability(model, ctx.train_images, ctx.train_labels, split, ctx.device, ctx.training)
        return {"kept": torch.from_numpy(result.kept), "threshold": float(result.threshold),
                "losses": torch.from_numpy(result.losses), "clean_losses": torch.from_numpy(result.clean_losses)}

    digest = fingerprint.digest(split, fingerprint.data_digest(ctx.train_images, ctx.train_labels), model)
    stored = checkpoints.cached(Path(ctx.workdir) / "split.pt", digest, compute)
    return VulnerabilitySplit(kept=stored["kept"].numpy(), threshold=float(stored["threshold"]),
                              losses=stored["losses"].numpy(), clean_losses=stored["clean_losses"].numpy())


def adversarial_training(ctx: DefenseContext, kept: np.ndarray, stage3: dict) -> torch.nn.Module:
    """Stage 3: train a fresh model on D_vul with the stage-3 training (PGD-AT by default)."""
    if not kept.any():
        raise ValueError("aabl: the split kept no samples; stage 3 has nothing to train on")
    workdir = Path(ctx.workdir)
    result = train_model(ctx.fresh_model(), ctx.train_images, ctx.train_labels, merge(ctx.training, stage3),
                         subset=kept, seed=ctx.seed, device=ctx.device, checkpoint=workdir / "stage3.pt",
                         history=workdir / "history-stage3.csv", desc="aabl stage 3", on_epoch=ctx.observer)
    return result.model


def split(spec: dict, ctx: DefenseContext) -> SplitResult:
    """Stages 1 and 2: the naive model and the vulnerability split (``stage1`` and ``split`` keys only)."""
    resolved = settings_for(__name__, spec)
    stage1_model = naive_training(ctx, resolved["stage1"])
    result = cached_split(stage1_model, ctx, resolved["split"])
    perturbation = PERTURBATION_NAMES[resolved["split"]["perturbation"]]
    before, after = f"SCE before {perturbation}", f"SCE after {perturbation}"
    return SplitResult(kept=result.kept, sample_scores={before: result.clean_losses, after: result.losses},
                       thresholds={after: float(result.threshold)},
                       metrics={"gamma": float(result.kept.mean()), "threshold": float(result.threshold)})


def final_scores(model: torch.nn.Module, ctx: DefenseContext, split: dict) -> dict[str, np.ndarray]:
    """The whole released set's per-sample SCE under the final (stage-3) model, before and after the
    split's perturbation (the paper's Fig. 11: "the final distribution of the entire poisoned dataset
    D in the robust model after the adversarial training in Stage 3")."""
    before, after = adversarial_sce(model, ctx.train_images, ctx.train_labels, split, ctx.device, ctx.training)
    name = PERTURBATION_NAMES[split["perturbation"]]
    return {f"final model: SCE before {name}": before, f"final model: SCE after {name}": after}


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    """Stage 3 on the split (the split job's, when the workflow gives one; else computed here)."""
    resolved = settings_for(__name__, spec)
    vulnerable = ctx.split if ctx.split is not None else split(spec, ctx)
    model = adversarial_training(ctx, vulnerable.kept, resolved["stage3"])
    scores = dict(vulnerable.sample_scores)
    if resolved["final_scores"]:
        scores.update(final_scores(model, ctx, resolved["split"]))
    return DefenseResult(model=model, metrics=dict(vulnerable.metrics), kept=vulnerable.kept,
                         sample_scores=scores, thresholds=vulnerable.thresholds)
