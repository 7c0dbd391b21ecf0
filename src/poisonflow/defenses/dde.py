"""DDE: prune the BatchNorm neurons whose pre-activation distribution exposes them as backdoor neurons.

Zheng, Tang, Li & Liu, "Pre-activation distributions expose backdoor neurons" (NeurIPS 2022).
A backdoor neuron responds to benign and to poisoned inputs with two differently placed
populations, so on data that mixes them its pre-activation (the input of the BatchNorm that
follows the convolution) is far from the single bell a benign neuron shows. The paper turns this
into two detectors, both applied layer by layer; ``criterion`` picks one:

- ``entropy`` (default; the paper's entropy-based pruning, EP). Data: ``samples`` images (500)
  drawn, seeded, from the released training set, the poisoned mixture itself; no clean data and
  no labels. Per neuron: each image's largest pre-activation over the spatial positions,
  standardized over the images (mean 0, unbiased std 1), and the differential entropy of those
  values, estimated from a histogram with bins of width ``bin_width`` (0.01) on a grid shared by
  the layer's neurons that starts at its smallest standardized value: ĥ = −Σ p·log(p / w). At a
  fixed variance a unimodal bell has the largest entropy; a two-population mixture has less, so a
  neuron is flagged when ĥ < mean − u·std of its layer's ĥ (``u`` = 3, std unbiased).
- ``kl`` (the paper's BN-statistics pruning, BNP). Data: ``samples`` images from the defender's
  clean split of the reserve (``clean_fraction``). Per neuron: the KL divergence from a Gaussian
  with the pre-activation's mean and unbiased variance over the clean images and positions
  (μ₁, σ₁²) to the Gaussian of the BatchNorm's running statistics, which the training set fixed
  (μ₂, σ₂²): log(σ₂/σ₁) + (σ₁² + (μ₁ − μ₂)²) / (2σ₂²) − ½. Poisoned samples shift the running
  statistics of a backdoor neuron away from its clean ones, so a neuron is flagged when its KL
  exceeds mean + u·std of its layer.

Pruning a flagged neuron zeroes its BatchNorm weight γ, so in evaluation the neuron outputs the
constant β whatever its input; ``zero_bias: true`` zeroes β as well (output 0). Every
``nn.BatchNorm2d`` of the model is treated, found with ``model.modules()``, so any architecture
works without changing its classes. The statistics are measured once on the unpruned victim (in
eval mode) before any layer is pruned. The victim is not changed: the defense prunes a deep copy.
There is no fine-tuning.

Defaults are those of the official code (github.com/RJ-T/NIPS2022_EP_BNP, ``defense.py`` and
``test.py``): u = 3, one batch of 500 images, entropy bins 0.01 wide, only γ zeroed. Its EP
function reports its count as "DDE pruned" (differential-entropy detection).

The VSSC paper's "DDE (Zheng et al., 2022b)" is the ``entropy`` criterion: VSSC ran the defenses as
BackdoorBench implements them, and BackdoorBench's ``defense/dde.py`` (renamed ``ep.py`` in June
2023, code unchanged) is this entropy pruning; its BNP was a separate defense (``mbns``, later
``bnp``). BackdoorBench's own settings (``config/defense/ep/*.yaml`` and ``defense/ep.py``) differ
from the official ones: ``samples: 256`` (one training batch), ``bin_width: 0.1``,
``zero_bias: true``; set those keys to reproduce its numbers.

Simplifications: the sampled images are not augmented (both reference codes draw the batch from
a loader with random crop and flip); the histogram counts every value, where the official counter's
strict inequalities drop values that fall exactly on a bin edge (each layer's minimum among them);
neurons whose sampled pre-activation is constant (zero spread, where the references divide by
zero) get no score and are never pruned; mean, variance and maxima are accumulated over batches of
``batch_size`` instead of one forward pass of all samples, which gives the same values.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..kinds import settings_for
from ..trainer import images_to_tensor, to_float
from . import DefenseContext, DefenseResult
from .clean_data import clean_split


# --- the pre-activations of every BatchNorm ---------------------------------------------------------


@dataclass
class PreActivations:
    """What one BatchNorm2d saw as input: per image and channel the largest value over the spatial
    positions, and per channel the sums giving mean and variance over images and positions."""
    maxima: list[torch.Tensor] = field(default_factory=list)  # float64 (n, C) per batch
    total: torch.Tensor | None = None  # float64 (C,): Σ x
    squares: torch.Tensor | None = None  # float64 (C,): Σ x²
    count: int = 0  # images × positions

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.maxima.append(x.amax(dim=(2, 3)).cpu())
        total, squares = x.sum(dim=(0, 2, 3)).cpu(), x.square().sum(dim=(0, 2, 3)).cpu()
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += x.shape[0] * x.shape[2] * x.shape[3]

    def spatial_maxima(self) -> torch.Tensor:
        """(C, N): each channel's per-image maximum, one row per channel."""
        return torch.cat(self.maxima).T

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def variance(self) -> torch.Tensor:
        """Unbiased variance over images and positions (n − 1 in the denominator)."""
        return ((self.squares - self.total.square() / self.count) / max(1, self.count - 1)).clamp_min(0.0)


def batch_norms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Every BatchNorm2d of ``model``, by module name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}


@torch.no_grad()
def collect_pre_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, PreActivations]:
    """Run ``model`` in eval mode over ``batches`` (its input tensors) and record the input of every
    BatchNorm2d. The model's mode is restored afterwards; its running statistics do not change."""
    norms = batch_norms(model)
    records = {name: PreActivations() for name in norms}
    handles = [module.register_forward_pre_hook(lambda _module, inputs, record=records[name]: record.add(inputs[0]))
               for name, module in norms.items()]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return records


# --- the per-neuron statistics ------------------------------------------------------------------------


def standardized(values: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, divided by its unbiased std; a row without spread becomes NaN."""
    values = values.double()
    std = values.std(dim=1, keepdim=True)
    centered = values - values.mean(dim=1, keepdim=True)
    return torch.where(std > 0, centered / std.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


def histogram_entropy(values: torch.Tensor, bin_width: float) -> torch.Tensor:
    """(C,): differential entropy of each row of ``values`` (C, N) estimated by a histogram, −Σ p·log(p/w).

    The bins (width w) lie on one grid shared by all rows, starting at the smallest value of the
    rows without NaN; bin k holds [origin + k·w, origin + (k+1)·w). A row with a NaN gives NaN.
    """
    values = values.double()
    scores = torch.full((values.shape[0],), torch.nan, dtype=torch.float64)
    valid = ~torch.isnan(values).any(dim=1)
    if not valid.any():
        return scores
    rows = values[valid]
    bins = torch.floor((rows - rows.min()) / bin_width).long()
    width = int(bins.max()) + 1
    row_index = torch.arange(rows.shape[0]).unsqueeze(1).expand_as(bins)
    keys, counts = torch.unique(row_index * width + bins, return_counts=True)
    p = counts.double() / rows.shape[1]
    plogp = torch.zeros(rows.shape[0], dtype=torch.float64).index_add_(0, keys // width, p * p.log())
    scores[valid] = math.log(bin_width) - plogp
    return scores


def gaussian_kl(mean: torch.Tensor, var: torch.Tensor, reference_mean: torch.Tensor,
                reference_var: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, var) ‖ N(reference_mean, reference_var) ) per entry; NaN where ``var`` is 0."""
    mean, var = mean.double(), var.double()
    reference_mean, reference_var = reference_mean.double(), reference_var.double()
    kl = (0.5 * (reference_var / var).log() + (var + (mean - reference_mean).square()) / (2 * reference_var) - 0.5)
    return torch.where(var > 0, kl, torch.nan)


def entropy_scores(norm: nn.BatchNorm2d, record: PreActivations, settings: dict) -> torch.Tensor:
    """DDE statistic: entropy of each neuron's standardized per-image maxima."""
    return histogram_entropy(standardized(record.spatial_maxima()), float(settings["bin_width"]))


def kl_scores(norm: nn.BatchNorm2d, record: PreActivations, settings: dict) -> torch.Tensor:
    """BNP statistic: KL from the clean pre-activation Gaussian to the running-statistics Gaussian."""
    if norm.running_mean is None:
        raise ValueError("dde criterion 'kl' needs BatchNorm layers that track running statistics")
    return gaussian_kl(record.mean(), record.variance(), norm.running_mean.cpu(), norm.running_var.cpu())


def beyond_threshold(scores: torch.Tensor, u: float, side: float) -> torch.Tensor:
    """Bool (C,): scores beyond mean + u·std (``side`` +1) or below mean − u·std (``side`` −1).

    Mean and unbiased std are taken over the finite scores of the layer; NaN scores are never
    flagged, and with fewer than two finite scores nothing is.
    """
    finite = torch.isfinite(scores)
    if int(finite.sum()) < 2:
        return torch.zeros_like(scores, dtype=torch.bool)
    mean, std = scores[finite].mean(), scores[finite].std()
    return finite & (side * (scores - mean) > u * std)


@torch.no_grad()
def prune_neurons(norm: nn.BatchNorm2d, neurons: torch.Tensor, zero_bias: bool) -> None:
    """Zero the BatchNorm weight (and with ``zero_bias`` the bias) of ``neurons`` (bool mask) in place."""
    if norm.weight is None:
        raise ValueError("dde prunes through the BatchNorm weight; this BatchNorm2d has no affine parameters")
    neurons = neurons.to(norm.weight.device)
    norm.weight[neurons] = 0.0
    if zero_bias:
        norm.bias[neurons] = 0.0


# --- the two criteria -----------------------------------------------------------------------------------


def sample_rows(pool_size: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded draw of min(count, pool_size) rows without replacement."""
    return np.sort(np.random.default_rng(seed).choice(pool_size, size=min(count, pool_size), replace=False))


def released_sample(ctx: DefenseContext, settings: dict) -> np.ndarray:
    """The entropy criterion looks at the released (poisoned) training set, labels unused."""
    if len(ctx.train_images) < 2:
        raise ValueError("dde criterion 'entropy' needs at least two training images")
    return ctx.train_images[sample_rows(len(ctx.train_images), int(settings["samples"]), ctx.seed)]


def clean_sample(ctx: DefenseContext, settings: dict) -> np.ndarray:
    """The KL criterion looks at clean data: a draw from the defender's clean split of the reserve."""
    if len(ctx.reserve_labels) == 0:
        raise ConfigError("dde.criterion: 'kl' needs clean data; the dataset has no reserve (datasets.<name>.reserve)")
    index = clean_split(len(ctx.reserve_labels), float(settings["clean_fraction"]), ctx.seed)
    return ctx.reserve_images[index[sample_rows(len(index), int(settings["samples"]), ctx.seed)]]


@dataclass(frozen=True)
class Criterion:
    score: Callable[[nn.BatchNorm2d, PreActivations, dict], torch.Tensor]  # (C,) per layer
    side: float  # +1: flag scores above mean + u·std; −1: below mean − u·std
    images: Callable[[DefenseContext, dict], np.ndarray]  # the uint8 images it measures on


CRITERIA: dict[str, Criterion] = {
    "entropy": Criterion(entropy_scores, -1.0, released_sample),
    "kl": Criterion(kl_scores, 1.0, clean_sample),
}


def flag_neurons(model: nn.Module, batches: Iterable[torch.Tensor], settings: dict) -> dict[str, torch.Tensor]:
    """Bool mask of flagged neurons per BatchNorm2d (by module name), measured on ``batches``."""
    criterion = CRITERIA[settings["criterion"]]
    records = collect_pre_activations(model, batches)
    norms = batch_norms(model)
    return {name: beyond_threshold(criterion.score(norms[name], record, settings), float(settings["u"]), criterion.side)
            for name, record in records.items()}


def image_batches(images: np.ndarray, batch_size: int, device: torch.device | str) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield to_float(images_to_tensor(images[start:start + batch_size], device))


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'dde' needs the victim model")
    resolved = settings_for(__name__, spec)
    model = copy.deepcopy(ctx.victim).to(ctx.device)
    norms = batch_norms(model)
    if not norms:
        raise ValueError("defense 'dde' prunes BatchNorm2d neurons; the victim has none")
    images = CRITERIA[resolved["criterion"]].images(ctx, resolved)
    flagged = flag_neurons(model, image_batches(images, int(resolved["batch_size"]), ctx.device), resolved)
    for name, neurons in flagged.items():
        prune_neurons(norms[name], neurons, bool(resolved["zero_bias"]))
    model.eval()
    per_layer = {name: int(neurons.sum()) for name, neurons in flagged.items()}
    neurons = sum(norm.num_features for norm in norms.values())
    metrics = {"pruned_neurons": sum(per_layer.values()), "pruned_share": sum(per_layer.values()) / neurons,
               "pruned_layers": sum(count > 0 for count in per_layer.values()), "samples": len(images),
               "pruned_per_layer": per_layer}
    return DefenseResult(model=model, metrics=metrics)
