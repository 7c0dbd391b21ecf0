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

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import augment
from ..errors import ConfigError
from ..kinds import settings_for
from ..trainer import images_to_tensor, make_optimizer, make_schedule, to_float, train_model
from . import DefenseContext, DefenseResult, merge

# SGD with Nesterov momentum 0.9 and weight decay 1e-4 in every stage (the paper's CIFAR-10 setup).
_SGD = {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}


# Batch objectives of the isolation stage: per-sample cross entropy and γ → the loss to minimize.
LGA_FORMS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "sample": lambda ce, gamma: lga_loss(ce, gamma).mean(),
    "batch": lambda ce, gamma: lga_loss(ce.mean(), gamma),
}

# The loops written here (isolation, unlearning) train on clean inputs only.
CUSTOM_LOOP_STAGES = ("isolation", "unlearning")


@dataclass
class Isolation:
    isolated: np.ndarray  # bool (N,): the lowest-loss samples, suspected poisons
    losses: np.ndarray  # float (N,): per-sample cross entropy under the isolation model


# --- losses and the isolation rule -----------------------------------------------------------------


def lga_loss(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """sign(ℓ − γ)·ℓ elementwise: losses below γ are negated, so descending on them is ascent."""
    return torch.sign(ce - gamma) * ce


def unlearning_loss(ce: torch.Tensor) -> torch.Tensor:
    """−mean(ℓ) of a batch's per-sample losses: descending on it is gradient ascent."""
    return -ce.mean()


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


# --- a small training loop for objectives other than cross entropy ---------------------------------


def digest_of(*parts) -> str:
    """A short content hash of JSON-able parts and arrays."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(part.tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """A content hash of a model's state (parameters and buffers)."""
    return digest_of(*(tensor.detach().cpu().numpy() for tensor in model.state_dict().values()))


def save_atomically(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_with_objective(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, training: dict,
                         objective: Callable[[torch.Tensor], torch.Tensor], *, seed: int,
                         device: torch.device | str = "cpu", checkpoint: Path | None = None,
                         desc: str = "abl") -> torch.nn.Module:
    """Minimize ``objective(per-sample cross entropy)`` over shuffled, augmented batches.

    ``training`` is a resolved training entry (epochs, batch_size, optimizer, schedule, augment and
    its parameters, label_smoothing); batches are augmented as the training loop does, so CutMix
    or Mixup give the mixed cross entropy. Runs in float32, without compilation. A checkpoint is
    written after every epoch; it is resumed only for the same training, seed, data and starting
    weights.
    """
    device = torch.device(device)
    model.to(device)
    key = digest_of(training, seed, images, np.asarray(labels, dtype=np.int64), weights_digest(model))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = images_to_tensor(images, device)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    n, epochs, batch_size = len(targets), int(training["epochs"]), int(training["batch_size"])
    optimizer = make_optimizer(model.parameters(), training["optimizer"])
    schedule = make_schedule(optimizer, training.get("schedule"), epochs, (n + batch_size - 1) // batch_size)
    augmenter = augment.BatchAugment(list(training.get("augment", [])), training)
    label_smoothing = float(training.get("label_smoothing", 0.0))

    start_epoch = 0
    if checkpoint and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("digest") == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start_epoch = state["epoch"]
            print(f"{desc}: resuming from {checkpoint} after epoch {start_epoch}", file=sys.stderr)

    progress = tqdm(range(start_epoch, epochs), desc=desc, initial=start_epoch, total=epochs, unit="epoch",
                    leave=False, dynamic_ncols=True)
    for epoch in progress:
        model.train()
        order = torch.randperm(n, generator=generator)
        running = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size].to(device)
            batch = augmenter(data[index], targets[index], generator)
            per_sample = augment.mixed_cross_entropy(model(batch.images), batch, label_smoothing)
            loss = objective(per_sample)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.detach() * len(index)
        progress.set_postfix(loss=f"{float(running) / max(1, n):.3f}")
        if checkpoint:
            save_atomically({"digest": key, "epoch": epoch + 1, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                             "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}, checkpoint)
    progress.close()
    model.eval()
    return model


# --- the three stages ------------------------------------------------------------------------------


def fresh_model(ctx: DefenseContext) -> torch.nn.Module:
    """An untrained victim-architecture model whose initialization depends only on the seed."""
    torch.manual_seed(ctx.seed)
    return ctx.build_model()


def isolation_training(ctx: DefenseContext, resolved: dict) -> torch.nn.Module:
    """Stage 1: LGA training of a fresh model on the whole released training set."""
    gamma, form = float(resolved["gamma"]), LGA_FORMS[resolved["lga"]]
    return train_with_objective(fresh_model(ctx), ctx.train_images, ctx.train_labels,
                                merge(ctx.training, resolved["isolation"]), lambda ce: form(ce, gamma),
                                seed=ctx.seed, device=ctx.device, checkpoint=Path(ctx.workdir) / "isolation.pt",
                                desc="abl isolation")


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
    path = Path(ctx.workdir) / "isolation.npz"
    key = digest_of(float(resolved["isolation_ratio"]), ctx.train_images,
                    np.asarray(ctx.train_labels, dtype=np.int64), weights_digest(model))
    if path.exists():
        with np.load(path) as stored:
            if str(stored["key"]) == key:
                return Isolation(isolated=stored["isolated"], losses=stored["losses"])
    result = isolate(model, ctx.train_images, ctx.train_labels, float(resolved["isolation_ratio"]), ctx.device,
                     int(resolved["batch_size"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("isolation.tmp.npz")
    np.savez(tmp, key=key, isolated=result.isolated, losses=result.losses)
    os.replace(tmp, path)
    return result


def clean_training(model: torch.nn.Module, ctx: DefenseContext, kept: np.ndarray, clean: dict) -> torch.nn.Module:
    """Stage 2: continue training the isolation model with cross entropy on the kept samples.

    The checkpoint's name carries the starting weights, so it is never resumed on top of a
    different isolation model.
    """
    checkpoint = Path(ctx.workdir) / f"clean-{weights_digest(model)}.pt"
    return train_model(model, ctx.train_images[kept], ctx.train_labels[kept], merge(ctx.training, clean),
                       seed=ctx.seed, device=ctx.device, checkpoint=checkpoint, desc="abl clean").model


def unlearn(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, training: dict, *, seed: int,
            device: torch.device | str = "cpu", checkpoint: Path | None = None) -> torch.nn.Module:
    """Stage 3: gradient ascent on the cross entropy of the isolated samples."""
    return train_with_objective(model, images, labels, training, unlearning_loss, seed=seed, device=device,
                                checkpoint=checkpoint, desc="abl unlearning")


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    resolved = settings_for(__name__, spec)
    model = isolation_training(ctx, resolved)
    isolation = cached_isolation(model, ctx, resolved)
    kept = ~isolation.isolated
    if not kept.any():
        raise ValueError("abl: every sample was isolated; nothing is left to train on")
    model = clean_training(model, ctx, kept, resolved["clean"])
    model = unlearn(model, ctx.train_images[isolation.isolated], ctx.train_labels[isolation.isolated],
                    merge(ctx.training, resolved["unlearning"]), seed=ctx.seed, device=ctx.device,
                    checkpoint=Path(ctx.workdir) / "unlearning.pt")
    metrics = {
        "isolated": int(isolation.isolated.sum()),
        # the largest isolation-model loss among the isolated samples: the cut the ratio implied
        "isolation_cutoff": float(isolation.losses[isolation.isolated].max()),
    }
    return DefenseResult(model=model, metrics=metrics, kept=kept)
