"""D-ST: decoupling-based secure training (Chen et al., NeurIPS 2022, "Effective Backdoor Defense by
Exploiting Sensitivity of Poisoned Samples"; official code SCLBD/Effective_backdoor_defense).

Poisoned samples are *sensitive*: a strong transformation (a large rotation and a translation)
breaks the trigger, so the features a backdoored model extracts from a poisoned image and from
its transformed copy differ much more than for a clean image. D-ST measures that with the FCT
metric and trains a secure model from scratch in two modules.

**Sample-distinguishment (SD) module.**

1. Train a fresh victim-architecture model on the whole released set *without augmentation* for a
   few epochs (official ``train_attack_noTrans.py``: 2 epochs, SGD lr 0.01, momentum 0.9,
   weight decay 5e-4, batch 128). A few epochs suffice to learn the backdoor.
2. Fine-tune its feature extractor with the intra-class loss L_intra (official
   ``finetune_attack_noTrans.py``, 10 epochs, same optimizer): in each batch, the mean feature of
   every class present is L2-normalized and L_intra is the mean of the matrix of their pairwise
   cosine similarities with its diagonal set to 0 (the mean runs over all C'×C' entries). Pushing
   the class centres apart separates clean target-class samples from poisoned ones.
3. FCT (``calculate_consistency.py``): Δ_trans(x; τ, f) = mean_d (f(x)_d − f(τ(x))_d)², f the
   fine-tuned model's pooled features (everything but the last layer) in eval mode, τ a random
   rotation by an angle uniform in [−180°, 180°] followed by a random translation of up to 20% of
   the width and height (the official defaults ``--trans1 rotate --trans2 affine``:
   RandomRotation(180), RandomAffine(degrees=0, translate=(0.2, 0.2)); nearest interpolation,
   zero fill).
4. Split (``calculate_gamma.py``, ``separate_samples.py``): with s the FCT values sorted
   ascending, N their number, γ_c = s[⌊α_c·N⌋] and γ_p = s[N − ⌊α_p·N⌋] (α_c = 0.20, α_p = 0.05);
   Δ ≤ γ_c → clean D̂_c, Δ ≥ γ_p → poisoned D̂_p, the rest uncertain D̂_u. As in the official code the
   clean set gets ⌊α_c·N⌋ + 1 samples (the comparison is ≤ at index ⌊α_c·N⌋) and the poisoned set
   ⌊α_p·N⌋ (ties aside).

**Secure-training (ST) module.**

5. Semi-supervised contrastive learning of a fresh feature extractor on all N samples (official
   ``ST/train_extractor.py`` + ``ST/losses.py: SupConLoss_Consistency``): two SimCLR views of
   each image (random resized crop at scale [0.2, 1], flip, colour jitter (0.4, 0.4, 0.4, 0.1) with
   probability 0.8, grayscale with probability 0.2), a projection head Linear(d, d) → ReLU →
   Linear(d, 128) (with biases) whose output is L2-normalized, and the SupCon loss at temperature
   0.1 scaled by temperature / base_temperature (0.07). The positives of a view of a *clean*
   sample are the other view and both views of every batch sample with the same label (whatever
   that sample's own split); a view of a *poisoned or uncertain* sample has its other view as its
   only positive (plain SimCLR). 200 epochs, SGD lr 0.5, momentum 0.9, weight decay 1e-4,
   batch 512, cosine.
6. A linear classifier on the frozen extractor (``ST/train_classifier.py``): the same
   augmentation, one view; loss CE(D̂_c) − 0.001·CE(D̂_p) (the uncertain samples are left out;
   the second term unlearns the distinguished poisons); 10 epochs, SGD lr 5, momentum 0.9, no
   weight decay, batch 512, ×0.2 at epochs 60/75/90 (never reached in 10 epochs).

The final model is the extractor with the classifier as its last layer (the victim architecture).
``kept`` is D̂_c, the samples the classifier learns from; D̂_p is only unlearned.

Simplifications, all documented in ``dst.yaml``:

* Learning-rate schedules come from the one trainer. SD: constant lr 0.01 (official: a
  CosineAnnealingLR with T_max = 100 epochs, so lr stays within 3% of 0.01 over those 12 epochs).
  Extractor: the trainer's cosine to 0 per step, without the official 10-epoch linear warm-up from
  0.01 (SupContrast's ``--warm``, on for batch > 256) and without its floor η_min = lr·0.1³.
* τ is applied as one composed affine resampling (rotation then translation), not two successive
  nearest-neighbour resamplings; translations are whole pixels as in torchvision.
* Step 6 weighs each sample's cross entropy instead of taking two separate batch means: clean
  samples get weight 1/q_c and distinguished poisons −0.001/q_p, q_c, q_p their shares of
  D̂_c ∪ D̂_p, so the batch objective equals CE(D̂_c) − 0.001·CE(D̂_p) in expectation over batches.
* Inputs are normalized by the backbone's own mean/std (the official code uses CIFAR statistics).

The SD model, the split and both ST stages are checkpointed in the work directory. The defense
never sees which samples are poisoned.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as checkpoints
from .. import fingerprint
from ..kinds import settings_for
from ..simclr import simclr_view
from ..trainer import Objective, StepOutput, images_to_tensor, to_float, train_model
from . import DefenseContext, DefenseResult, SplitResult, merge

# The split's flags per training sample.
CLEAN, UNCERTAIN, POISONED = 0, 1, 2


# --- SD: intra-class fine-tuning --------------------------------------------------------------------


def intra_class_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_intra of one batch: the mean over all C'×C' entries of the cosine-similarity matrix of the
    class-mean features of the C' classes present, its diagonal set to 0."""
    classes = torch.unique(labels)
    onehot = (labels.view(-1, 1) == classes.view(1, -1)).to(features.dtype)  # (B, C')
    centres = (onehot.T @ features) / onehot.sum(0).view(-1, 1)
    centres = F.normalize(centres, dim=1)
    similarity = centres @ centres.T
    diagonal = torch.eye(len(classes), dtype=torch.bool, device=features.device)
    return similarity.masked_fill(diagonal, 0.0).mean()


def intra_class_objective() -> Objective:
    def loss(net, batch, ctx) -> StepOutput:
        with ctx.autocast():
            features = net.features(batch.images)
        value = intra_class_loss(features.float(), batch.labels)
        return StepOutput(value.expand(batch.images.shape[0]))
    return Objective(loss, "dst_intra_class")


def sd_model(ctx: DefenseContext, resolved: dict) -> nn.Module:
    """Steps 1-2: a short no-augmentation training, then the intra-class fine-tuning."""
    workdir = Path(ctx.workdir)
    model = train_model(ctx.fresh_model(), ctx.train_images, ctx.train_labels,
                        merge(ctx.training, resolved["sd_training"]), seed=ctx.seed, device=ctx.device,
                        checkpoint=workdir / "sd-training.pt", history=workdir / "history-sd-training.csv",
                        desc="d-st SD training").model
    return train_model(model, ctx.train_images, ctx.train_labels, merge(ctx.training, resolved["sd_finetune"]),
                       seed=ctx.seed, device=ctx.device, objective=intra_class_objective(),
                       checkpoint=workdir / "sd-finetune.pt", history=workdir / "history-sd-finetune.csv",
                       desc="d-st SD intra-class").model


# --- SD: the FCT metric and the split ---------------------------------------------------------------


def feature_consistency(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Δ_trans per sample: the mean over feature dimensions of the squared difference (B,)."""
    first, second = first.flatten(1).float(), second.flatten(1).float()
    return ((first - second) ** 2).mean(dim=1)


def rotate_translate(x: torch.Tensor, angles: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` (B, C, H, W) rotated about its centre by ``angles`` (B,) degrees
    (counter-clockwise) and then moved by ``shifts`` (B, 2) pixels (x right, y down), in one
    nearest-neighbour resampling with zero fill."""
    b, _, h, w = x.shape
    radians = angles.to(torch.float64) * math.pi / 180
    cos, sin = torch.cos(radians), torch.sin(radians)
    # Output pixel p (pixel offsets from the centre) reads input R⁻¹(p − t); R rotates
    # counter-clockwise on screen, i.e. clockwise in (x right, y down) coordinates.
    inverse = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    to_norm = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)
    from_norm = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
    linear = to_norm.view(1, 2, 1) * inverse * from_norm.view(1, 1, 2)
    offset = -(to_norm.view(1, 2) * (inverse @ shifts.to(torch.float64).view(b, 2, 1)).view(b, 2))
    theta = torch.cat([linear, offset.view(b, 2, 1)], 2).to(device=x.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).to(x.dtype)


def fct_transform(x: torch.Tensor, fct: dict, generator: torch.Generator) -> torch.Tensor:
    """τ: a rotation by an angle uniform in [−degrees, degrees], then a translation by a whole
    number of pixels uniform up to ``translate`` of the width / height (torchvision's RandomAffine)."""
    b, _, h, w = x.shape
    degrees, translate = float(fct["rotation_degrees"]), float(fct["translate"])
    angles = (torch.rand(b, generator=generator, dtype=torch.float64) * 2 - 1) * degrees
    limits = torch.tensor([translate * w, translate * h], dtype=torch.float64)
    shifts = torch.round((torch.rand(b, 2, generator=generator, dtype=torch.float64) * 2 - 1) * limits)
    return rotate_translate(x, angles, shifts)


@torch.no_grad()
def fct_scores(encoder, images: np.ndarray, fct: dict, *, seed: int, device: torch.device | str = "cpu",
               batch_size: int = 256, transform=fct_transform) -> np.ndarray:
    """Δ_trans of every uint8 NHWC image under ``encoder`` (images in [0, 1] → (B, d) features),
    τ drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    scores = []
    for start in range(0, len(images), batch_size):
        x = to_float(images_to_tensor(images[start:start + batch_size], device))
        moved = transform(x, fct, generator)
        scores.append(feature_consistency(encoder(x), encoder(moved)).double().cpu())
    return torch.cat(scores).numpy() if scores else np.zeros(0)


def split_thresholds(scores: np.ndarray, clean_ratio: float, poison_ratio: float) -> tuple[float, float]:
    """(γ_c, γ_p) = (s[⌊α_c·N⌋], s[N − ⌊α_p·N⌋]) on the ascending FCT values s, clamped to the
    array (a ratio of 1 or 0 would index past it)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    clean_index = min(int(n * clean_ratio), n - 1)
    poison_count = int(n * poison_ratio)
    gamma_c = float(ordered[clean_index])
    gamma_p = float(ordered[n - poison_count]) if poison_count > 0 else math.inf
    return gamma_c, gamma_p


def split_by_fct(scores: np.ndarray, clean_ratio: float, poison_ratio: float) -> tuple[np.ndarray, float, float]:
    """Flags (N,) of CLEAN (Δ ≤ γ_c), POISONED (Δ ≥ γ_p, checked second as in the official code)
    and UNCERTAIN (the rest), with γ_c and γ_p."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("d-st: an FCT value is NaN; the SD model diverged")
    gamma_c, gamma_p = split_thresholds(scores, clean_ratio, poison_ratio)
    flags = np.full(len(scores), UNCERTAIN, dtype=np.int64)
    flags[scores >= gamma_p] = POISONED
    flags[scores <= gamma_c] = CLEAN
    return flags, gamma_c, gamma_p


def cached_split(model: nn.Module, ctx: DefenseContext, resolved: dict) -> dict:
    """The FCT values and the split, stored so a rerun trains the ST stages on the same split."""
    keys = {key: resolved[key] for key in ("fct", "clean_ratio", "poison_ratio", "batch_size")}

    def compute() -> dict:
        model.eval()
        scores = fct_scores(model.features, ctx.train_images, resolved["fct"], seed=ctx.seed, device=ctx.device,
                            batch_size=int(resolved["batch_size"]))
        flags, gamma_c, gamma_p = split_by_fct(scores, float(resolved["clean_ratio"]), float(resolved["poison_ratio"]))
        return {"scores": torch.from_numpy(scores), "flags": torch.from_numpy(flags),
                "gamma_c": float(gamma_c), "gamma_p": float(gamma_p)}

    digest = fingerprint.digest(keys, ctx.seed, fingerprint.data_digest(ctx.train_images, ctx.train_labels), model)
    stored = checkpoints.cached(Path(ctx.workdir) / "split.pt", digest, compute)
    return {"scores": stored["scores"].numpy(), "flags": stored["flags"].numpy(),
            "gamma_c": float(stored["gamma_c"]), "gamma_p": float(stored["gamma_p"])}


# --- ST: semi-supervised contrastive learning -------------------------------------------------------


class SupConNet(nn.Module):
    """A backbone (its ``fc`` unused) and SupContrast's MLP head; outputs unit-norm projections."""

    def __init__(self, backbone: nn.Module, projection_dim: int):
        super().__init__()
        channels = backbone.fc.in_features
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True),
                                  nn.Linear(channels, projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone.features(x)), dim=1)


def consistency_supcon(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor,
                       temperature: float, base_temperature: float) -> torch.Tensor:
    """SupConLoss_Consistency per image (B,) for unit projections ``z1``, ``z2`` (B, P) of two views.

    Over the 2B views a, with s(a, k) = z_a·z_k / temperature and log p(a, k) = s(a, k) −
    log Σ_{k'≠a} exp s(a, k'): ℓ_a = −(temperature / base_temperature) · mean_{k∈P(a)} log p(a, k).
    P(a) for a view of a ``labelled`` (distinguished-clean) image: every other view whose image has
    the same label; for any other image: its other view only. Image i's term is (ℓ_i + ℓ_{B+i}) / 2,
    so the batch mean is the official loss (the mean over 2B anchors).
    """
    b = z1.shape[0]
    z = torch.cat([z1, z2]).float()
    logits = z @ z.T / float(temperature)
    self_pairs = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_pairs, float("-inf")), dim=1, keepdim=True)
    same = labels.view(-1, 1) == labels.view(1, -1)
    identity = torch.eye(b, dtype=torch.bool, device=z.device)
    mask = torch.where(labelled.view(-1, 1), same, identity).repeat(2, 2) & ~self_pairs
    mask = mask.to(log_prob.dtype)
    per_view = -(float(temperature) / float(base_temperature)) * (mask * log_prob).sum(1) / mask.sum(1)
    return (per_view[:b] + per_view[b:]) / 2


def view_settings(views: dict) -> dict:
    """The SupContrast augmentation in :func:`poisonflow.simclr.simclr_view`'s terms."""
    return {"crop_scale": list(views["crop_scale"]), "crop_ratio": list(views["crop_ratio"]),
            "flip_prob": float(views["flip_prob"]), "jitter_strength": float(views["jitter_strength"]),
            "jitter_prob": float(views["jitter_prob"]), "grayscale_prob": float(views["grayscale_prob"])}


def sscl_objective(resolved: dict, num_classes: int) -> Objective:
    """The SS-CTL objective. Labels arrive encoded as label + num_classes·(image not clean)."""
    views = view_settings(resolved["views"])
    temperature, base = float(resolved["temperature"]), float(resolved["base_temperature"])

    def loss(net, batch, ctx) -> StepOutput:
        codes = batch.labels
        labels, labelled = codes % num_classes, codes < num_classes
        first = simclr_view(batch.images, views, ctx.generator)
        second = simclr_view(batch.images, views, ctx.generator)
        with ctx.autocast():
            z1, z2 = net(first), net(second)
        return StepOutput(consistency_supcon(z1, z2, labels, labelled, temperature, base))

    return Objective(loss, ["dst_sscl", temperature, base, views, num_classes])


def train_extractor(ctx: DefenseContext, flags: np.ndarray, resolved: dict) -> nn.Module:
    """Step 5: SS-CTL of a fresh victim-architecture backbone on every training sample."""
    backbone = ctx.fresh_model()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        net = SupConNet(backbone, int(resolved["projection_dim"]))
    codes = np.asarray(ctx.train_labels, dtype=np.int64) + ctx.num_classes * (np.asarray(flags) != CLEAN)
    workdir = Path(ctx.workdir)
    train_model(net, ctx.train_images, codes, merge(ctx.training, resolved["extractor"]), seed=ctx.seed,
                device=ctx.device, objective=sscl_objective(resolved, ctx.num_classes),
                checkpoint=workdir / "extractor.pt", history=workdir / "history-extractor.csv",
                desc="d-st extractor")
    return backbone


# --- ST: the linear classifier on frozen features ---------------------------------------------------


class FrozenFeatures(nn.Module):
    """The backbone's ``fc`` on its frozen features: the body stays in eval mode and gets no gradient."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        for name, parameter in backbone.named_parameters():
            parameter.requires_grad_(name.startswith("fc."))

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone.features(x)
        return self.backbone.fc(features.detach())


def classifier_objective(resolved: dict) -> Objective:
    """Cross entropy of one augmented view; the signs and scales come in as sample weights."""
    views = view_settings(resolved["views"])

    def loss(net, batch, ctx) -> StepOutput:
        x = simclr_view(batch.images, views, ctx.generator)
        with ctx.autocast():
            logits = net(x).float()
        per_sample = F.cross_entropy(logits, batch.labels, reduction="none")
        return StepOutput(per_sample, logits, None)

    return Objective(loss, ["dst_classifier", views])


def classifier_weights(flags: np.ndarray, unlearning_weight: float) -> np.ndarray:
    """Per-sample weights whose batch mean is CE(D̂_c) − w·CE(D̂_p) in expectation: 1/q_c for clean,
    −w/q_p for poisoned, 0 for uncertain (not trained on), q the shares within D̂_c ∪ D̂_p."""
    flags = np.asarray(flags)
    trained = (flags == CLEAN) | (flags == POISONED)
    total = max(int(trained.sum()), 1)
    weights = np.zeros(len(flags), dtype=np.float32)
    clean, poisoned = int((flags == CLEAN).sum()), int((flags == POISONED).sum())
    if clean:
        weights[flags == CLEAN] = total / clean
    if poisoned:
        weights[flags == POISONED] = -float(unlearning_weight) * total / poisoned
    return weights


def train_classifier(backbone: nn.Module, ctx: DefenseContext, flags: np.ndarray, resolved: dict) -> nn.Module:
    """Step 6: train ``backbone.fc`` on the frozen extractor; returns the whole backbone."""
    probe = FrozenFeatures(backbone)
    trained = (flags == CLEAN) | (flags == POISONED)
    workdir = Path(ctx.workdir)
    train_model(probe, ctx.train_images, ctx.train_labels, merge(ctx.training, resolved["classifier"]),
                seed=ctx.seed, device=ctx.device, objective=classifier_objective(resolved), subset=trained,
                weights=classifier_weights(flags, float(resolved["unlearning_weight"])),
                checkpoint=workdir / "classifier.pt", history=workdir / "history-classifier.csv",
                desc="d-st classifier")
    for parameter in backbone.parameters():
        parameter.requires_grad_(True)
    return backbone.eval()


def split(spec: dict, ctx: DefenseContext) -> SplitResult:
    """SD: the sensitivity model and the FCT split (clean / uncertain / poisoned in ``groups``;
    ``kept`` the clean ones), from the ``sd_*``, ``fct``, ratio and batch keys only."""
    resolved = settings_for(__name__, spec)
    found = cached_split(sd_model(ctx, resolved), ctx, resolved)
    flags = found["flags"]
    metrics = {"clean": int((flags == CLEAN).sum()), "uncertain": int((flags == UNCERTAIN).sum()),
               "poisoned": int((flags == POISONED).sum()), "gamma_c": found["gamma_c"], "gamma_p": found["gamma_p"]}
    # one FCT panel per threshold (the figure draws one threshold per named score)
    scores = {"FCT, clean cut γ_c": found["scores"], "FCT, poisoned cut γ_p": found["scores"]}
    thresholds = {"FCT, clean cut γ_c": found["gamma_c"]}
    if math.isfinite(found["gamma_p"]):
        thresholds["FCT, poisoned cut γ_p"] = found["gamma_p"]
    return SplitResult(kept=flags == CLEAN, sample_scores=scores, thresholds=thresholds, metrics=metrics,
                       groups=flags)


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    """ST on the split (the split job's, when the workflow gives one; else computed here)."""
    resolved = settings_for(__name__, spec)
    found = ctx.split if ctx.split is not None and ctx.split.groups is not None else split(spec, ctx)
    flags = np.asarray(found.groups)
    if not (flags == CLEAN).any():
        raise ValueError("d-st: the split found no clean samples; the classifier has nothing to learn from")
    backbone = train_extractor(ctx, flags, resolved)
    model = train_classifier(backbone, ctx, flags, resolved)
    return DefenseResult(model=model, metrics=dict(found.metrics), kept=flags == CLEAN,
                         sample_scores=found.sample_scores, thresholds=found.thresholds)
