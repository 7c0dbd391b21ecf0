"""SentiNet (simplified): flag test inputs whose most salient region hijacks other images.

A localized trigger is where the victim looks when it predicts the target, and pasting that
region onto other images carries the prediction with it; the salient region of a clean input is
part of its object and rarely overrides another image's content. For each screened input x:

1. Saliency: Grad-CAM of the victim's predicted class y on its last feature map
   (``model.feature_map``; channel weights = spatial mean of the gradient of logit y, the logit
   computed by ``model.fc`` on the pooled map), ReLU, bilinear upsampling to the image size.
2. Mask: the top ``mask_fraction`` of the image's pixels by saliency.
3. Fooled rate: the masked region of x pasted onto ``n`` clean images from the defender's clean
   split; the fraction the victim classifies as y.
4. Inert confidence: the same region of the same clean images filled with uniform noise instead;
   the mean of the victim's top softmax probability (how much a meaningless patch of that size
   and place disturbs it).
5. Decision boundary, fitted on the clean split only: the clean split's own images go through
   steps 1–4 (never pasted onto themselves); their (inert confidence, fooled rate) points are
   binned along the confidence axis (width ``bin_width``), the ``per_bin`` highest fooled rates
   of each bin are kept, and a polynomial of degree ``degree`` is least-squares fitted through
   them: the upper envelope of clean behaviour.
6. Score = fooled rate − boundary(inert confidence) (the boundary evaluated with the confidence
   clipped to the fitted range): the vertical distance above the clean envelope; higher = more
   suspicious. Flags: score above the (1 − ``frr``) quantile of the clean split's own scores.

Simplifications against the paper, all deliberate: one class only (the predicted one; the paper
also proposes other classes with selective search and subtracts their saliency), a top-fraction
mask instead of a threshold on the normalized heat map, and the vertical offset from the boundary
with an FRR-quantile threshold instead of the Euclidean distance with the mean-distance threshold.
The screened set's ground truth is never seen; the model returned is the victim itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..kinds import settings_for
from ..trainer import images_to_tensor, to_float
from . import DefenseContext, DefenseResult
from .clean_data import clean_split
from .screening import (background_indices, fitted_threshold, inputs_per_chunk,
                        probabilities)


@dataclass
class SentinetPoints:
    predicted: np.ndarray  # int (N,): the victim's class for each input
    fooled: np.ndarray  # float (N,): fraction of pasted clean images classified as that class
    inert_confidence: np.ndarray  # float (N,): mean top probability with noise in the region


def grad_cam(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM heat maps (N, H, W) of ``classes`` for float images ``x``, upsampled to the image size."""
    model.eval()
    with torch.enable_grad():
        feature_map = model.feature_map(x).detach().requires_grad_(True)
        logits = model.fc(torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1))
        (gradient,) = torch.autograd.grad(logits.gather(1, classes.view(-1, 1)).sum(), feature_map)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feature_map.detach()).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def salient_masks(heat: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool masks (N, H, W) of the round(fraction·H·W) most salient pixels (at least one; ties by position)."""
    n, height, width = heat.shape
    count = min(height * width, max(1, int(round(fraction * height * width))))
    order = torch.argsort(-heat.reshape(n, -1), dim=1, stable=True)[:, :count]
    mask = torch.zeros(n, height * width, dtype=torch.bool, device=heat.device)
    mask.scatter_(1, order, True)
    return mask.view(n, height, width)


def paste(regions: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targets (k, n, C, H, W) with each input's masked pixels taken from ``regions`` (k, n or 1, C, H, W)."""
    return torch.where(masks.view(masks.shape[0], 1, 1, *masks.shape[1:]), regions, targets)


def sentinet_points(model: torch.nn.Module, images: np.ndarray, pool: np.ndarray, targets: np.ndarray,
                    mask_fraction: float, generator: torch.Generator, device: torch.device | str = "cpu",
                    batch_size: int = 512) -> SentinetPoints:
    """Steps 1–4 for uint8 NHWC ``images``; ``targets[i]`` indexes the clean images of input i in ``pool``."""
    pool_u8 = images_to_tensor(pool, device)
    count = targets.shape[1]
    chunk = inputs_per_chunk(count, batch_size)
    predicted, fooled, confidence = [], [], []
    for start in range(0, len(images), chunk):
        x = to_float(images_to_tensor(images[start:start + chunk], device))
        k = len(x)
        y = probabilities(model, x, batch_size).argmax(dim=1)
        masks = salient_masks(grad_cam(model, x, y), mask_fraction)
        clean = to_float(pool_u8[torch.as_tensor(targets[start:start + chunk], device=pool_u8.device)])
        pasted = paste(x.unsqueeze(1), masks, clean)
        noise = torch.rand(clean.shape, generator=generator).to(clean.device)
        inert = paste(noise, masks, clean)
        hits = probabilities(model, pasted.flatten(0, 1), batch_size).argmax(dim=1).view(k, count) == y.view(k, 1)
        top = probabilities(model, inert.flatten(0, 1), batch_size).max(dim=1).values.view(k, count)
        predicted.append(y.cpu())
        fooled.append(hits.double().mean(dim=1).cpu())
        confidence.append(top.double().mean(dim=1).cpu())
    if not predicted:
        return SentinetPoints(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    return SentinetPoints(torch.cat(predicted).numpy(), torch.cat(fooled).numpy(), torch.cat(confidence).numpy())


def envelope_points(confidence: np.ndarray, fooled: np.ndarray, bin_width: float,
                    per_bin: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``per_bin`` highest fooled rates in each confidence bin [j·w, (j+1)·w) and their confidences."""
    bins = np.floor(np.asarray(confidence) / bin_width).astype(np.int64)
    keep = []
    for value in np.unique(bins):
        members = np.flatnonzero(bins == value)
        keep.extend(members[np.argsort(-fooled[members], kind="stable")[:per_bin]])
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    return np.asarray(confidence)[keep], np.asarray(fooled)[keep]


@dataclass
class Boundary:
    coefficients: np.ndarray  # polynomial coefficients, highest power first (numpy.polyval order)
    low: float  # the confidence range it was fitted on
    high: float

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        return np.polyval(self.coefficients, np.clip(confidence, self.low, self.high))


def fit_boundary(confidence: np.ndarray, fooled: np.ndarray, bin_width: float, per_bin: int,
                 degree: int) -> Boundary:
    """Least-squares polynomial through the clean envelope (degree capped by the distinct confidences)."""
    x, y = envelope_points(confidence, fooled, bin_width, per_bin)
    if len(x) == 0:
        raise ValueError("sentinet: no clean points to fit the decision boundary on")
    degree = min(int(degree), len(np.unique(x)) - 1)
    return Boundary(np.polyfit(x, y, degree), float(x.min()), float(x.max()))


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'sentinet' needs the victim model")
    if ctx.screen_images is None:
        raise ValueError("defense 'sentinet' needs test inputs to screen (DefenseContext.screen_images)")
    resolved = settings_for(__name__, spec)
    n, fraction, batch_size = int(resolved["n"]), float(resolved["mask_fraction"]), int(resolved["batch_size"])
    pool = ctx.reserve_images[clean_split(len(ctx.reserve_labels), float(resolved["clean_fraction"]), ctx.seed)]
    rng = np.random.default_rng([ctx.seed, 6])
    noise = torch.Generator().manual_seed(int(rng.integers(2**62)))
    own = background_indices(len(pool), n, np.arange(len(pool)), rng, len(pool))
    clean = sentinet_points(ctx.victim, pool, pool, own, fraction, noise, ctx.device, batch_size)
    screened_targets = background_indices(len(pool), n, None, rng, len(ctx.screen_images))
    screened = sentinet_points(ctx.victim, ctx.screen_images, pool, screened_targets, fraction, noise, ctx.device,
                               batch_size)
    boundary = fit_boundary(clean.inert_confidence, clean.fooled, float(resolved["bin_width"]),
                            int(resolved["per_bin"]), int(resolved["degree"]))
    clean_scores = clean.fooled - boundary(clean.inert_confidence)
    scores = screened.fooled - boundary(screened.inert_confidence)
    threshold = fitted_threshold(clean_scores, 1.0 - float(resolved["frr"]), resolved["threshold_fit"])
    flags = scores > threshold
    metrics = {"threshold": threshold, "flagged": float(flags.mean()) if len(flags) else 0.0,
               "clean_fooled": float(clean.fooled.mean()), "clean_samples": int(len(pool))}
    return DefenseResult(model=ctx.victim, metrics=metrics, input_scores=scores, input_flags=flags)
