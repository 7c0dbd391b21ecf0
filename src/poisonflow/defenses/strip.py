"""STRIP: flag test inputs whose prediction survives superimposed clean images.

A trigger dominates the victim's decision wherever it appears, so an input carrying it keeps its
(target) prediction when another image is blended over it; a clean input's prediction wanders
between the classes of what it is mixed with. STRIP superimposes each screened input with ``n``
images drawn at random from the defender's clean split and averages the Shannon entropy (in bits)
of the victim's softmax over those ``n`` perturbed copies: low entropy = suspicious, so the
suspicion score is −entropy.

Superimposition: ``clip(alpha·input + beta·background, 0, 1)`` with alpha = beta = 0.5 by
default, the average of the two images (the original STRIP code adds both images at full weight
and saturates, i.e. alpha = beta = 1; both are a config choice).

Threshold: the clean split's own images go through the same test (each blended with clean images
other than itself), and the ``frr`` quantile of their entropies is the detection boundary (the
paper's preset false rejection rate is 1%); inputs below it are flagged. By default this is the
empirical quantile; ``threshold_fit: normal`` fits a normal distribution to the clean entropies and
takes its quantile, as the STRIP paper does — on skewed entropy distributions (digits: many clean
images have entropy near 0) that boundary can fall below 0 and flag nothing. The screened set's
ground truth is never seen; the model returned is the victim itself (STRIP detects, it does not
repair).
"""

from __future__ import annotations

import numpy as np
import torch

from ..kinds import settings_for
from ..trainer import images_to_tensor, to_float
from . import DefenseContext, DefenseResult
from .clean_data import clean_split
from .screening import (background_indices, fitted_threshold, inputs_per_chunk,
                        probabilities)


def superimpose(inputs: torch.Tensor, backgrounds: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``clip(alpha·input + beta·background, 0, 1)``: inputs (k, C, H, W), backgrounds (k, n, C, H, W)."""
    return (alpha * inputs.unsqueeze(1) + beta * backgrounds).clamp_(0.0, 1.0)


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of each row of probabilities (0·log 0 = 0)."""
    return torch.special.entr(p).sum(dim=1) / np.log(2.0)


def strip_entropy(model: torch.nn.Module, images: np.ndarray, pool: np.ndarray, backgrounds: np.ndarray,
                  alpha: float, beta: float, device: torch.device | str = "cpu",
                  batch_size: int = 512) -> np.ndarray:
    """Mean entropy of ``model`` over each uint8 image superimposed with its ``pool[backgrounds[i]]``."""
    pool_u8 = images_to_tensor(pool, device)
    count = backgrounds.shape[1]
    chunk = inputs_per_chunk(count, batch_size)
    out = []
    for start in range(0, len(images), chunk):
        x = to_float(images_to_tensor(images[start:start + chunk], device))
        index = torch.as_tensor(backgrounds[start:start + chunk], device=pool_u8.device)
        blended = superimpose(x, to_float(pool_u8[index]), alpha, beta)
        p = probabilities(model, blended.flatten(0, 1), batch_size)
        out.append(entropy_bits(p).view(len(x), count).mean(dim=1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'strip' needs the victim model")
    if ctx.screen_images is None:
        raise ValueError("defense 'strip' needs test inputs to screen (DefenseContext.screen_images)")
    resolved = settings_for(__name__, spec)
    n, alpha, beta = int(resolved["n"]), float(resolved["alpha"]), float(resolved["beta"])
    batch_size = int(resolved["batch_size"])
    pool = ctx.reserve_images[clean_split(len(ctx.reserve_labels), float(resolved["clean_fraction"]), ctx.seed)]
    rng = np.random.default_rng([ctx.seed, 5])
    own = background_indices(len(pool), n, np.arange(len(pool)), rng, len(pool))
    clean_entropy = strip_entropy(ctx.victim, pool, pool, own, alpha, beta, ctx.device, batch_size)
    screened = background_indices(len(pool), n, None, rng, len(ctx.screen_images))
    entropy = strip_entropy(ctx.victim, ctx.screen_images, pool, screened, alpha, beta, ctx.device, batch_size)
    threshold = fitted_threshold(clean_entropy, float(resolved["frr"]), resolved["threshold_fit"])
    flags = entropy < threshold
    metrics = {"threshold": threshold, "flagged": float(flags.mean()) if len(flags) else 0.0,
               "clean_entropy": float(clean_entropy.mean()), "clean_samples": int(len(pool))}
    return DefenseResult(model=ctx.victim, metrics=metrics, input_scores=-entropy, input_flags=flags)
