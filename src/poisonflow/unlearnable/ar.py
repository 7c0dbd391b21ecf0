"""AR: autoregressive perturbations (Sandoval-Segura, Singla, Geiping, Goldblum, Goldstein and
Jacobs, "Autoregressive Perturbations for Data Poisoning", NeurIPS 2022).

Each class k has an AR(8) process per colour channel: every pixel is a fixed linear combination of
the 8 pixels before it in its 3×3 window (the two to its left in its row and the three in each of
the two rows above),

    δ[c, i, j] = Σ_{(u, v) ≠ (2, 2)} β_k[c, u, v] · δ[c, i − 2 + u, j − 2 + v].

A perturbation is generated from a random N(0, 1) signal of size (H + ``crop``)² by running the
recursion over every pixel not in the first two rows or columns, cropping the first ``crop`` rows
and columns (where the random start still shows) and scaling to ℓ2 norm ``eps``. The perturbations
differ from image to image but are all annihilated by their class's filter (β_k with −1 at the
current pixel), which a network picks up easily: that is the shortcut. No model is needed.

The coefficients come from the paper's search: draw β ~ N(0, 1) with the current-pixel entry 0,
normalized to sum 1 per channel; keep it if ``trials`` generated signals stay bounded (largest
|value| after the crop below ``max_abs``, before scaling) and every filter already kept responds
to them with at least ``min_response`` (Σ ReLU of the filter's output on the unit-norm signal), so
that the classes' processes are told apart; repeat until there is one process per class (at most
``max_attempts`` draws).

Keys (defaults in ``ar.yaml`` beside this module, the paper's CIFAR-10 settings): ``eps`` 1.0 (ℓ2, for 32×32
images), ``crop`` 4, ``min_response`` 3, ``max_abs`` 5, ``trials`` 3, ``max_attempts`` 100000.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..kinds import settings_for
from .common import add_perturbation, batch_slices, class_count, scale_to_l2, seeded_generator
from ..errors import ConfigError


WINDOW = 3  # the AR window is 3×3: 8 coefficients before the current pixel
CANDIDATES_PER_DRAW = 64  # coefficient candidates generated together (the recursion is batched)
SIGNALS_PER_CHUNK = 4096  # perturbations generated at once (float64 signals of (H + crop)² pixels)


def random_coefficients(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 3, 3, 3) AR coefficients: N(0, 1), current pixel 0, each channel's 8 summing to 1."""
    beta = torch.randn((count, 3, WINDOW, WINDOW), generator=generator, dtype=torch.float64)
    beta[:, :, WINDOW - 1, WINDOW - 1] = 0.0
    return beta / beta.sum(dim=(2, 3), keepdim=True)


def ar_signals(coefficients: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Run each sample's AR recursion over ``start`` (n, 3, S, S) with its coefficients (n, 3, 3, 3).

    Pixels in the first two rows and columns keep their start values; every other pixel, in
    row-major order, becomes the coefficient-weighted sum of its 3×3 window (its own weight is 0).
    """
    signal = start.clone()
    size = signal.shape[-1]
    for i in range(size - WINDOW + 1):
        for j in range(size - WINDOW + 1):
            window = signal[:, :, i:i + WINDOW, j:j + WINDOW]
            signal[:, :, i + WINDOW - 1, j + WINDOW - 1] = (window * coefficients).sum(dim=(2, 3))
    return signal


def ar_filter(coefficients: torch.Tensor) -> torch.Tensor:
    """(1, 3, 3, 3) convolution filter of one process: the coefficients with −1 at the current pixel.

    It outputs the recursion's residual, which is zero on the process's own signals.
    """
    kernel = coefficients.clone()
    kernel[:, WINDOW - 1, WINDOW - 1] = -1.0
    return kernel.unsqueeze(0)


def filter_response(coefficients: torch.Tensor, signals: torch.Tensor) -> torch.Tensor:
    """(n,) Σ ReLU(filter ∗ signal) of one process's filter on each signal."""
    kernel = ar_filter(coefficients).to(signals.dtype)
    return F.relu(F.conv2d(signals, kernel)).sum(dim=(1, 2, 3))


def generate(coefficients: torch.Tensor, size: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    """Unscaled signals (n, 3, size − crop, size − crop) from fresh N(0, 1) starts."""
    start = torch.randn((len(coefficients), 3, size, size), generator=generator, dtype=torch.float64)
    return ar_signals(coefficients, start)[:, :, crop:, crop:]


def accepts(candidate_signals: torch.Tensor, kept: list[torch.Tensor], settings: dict) -> bool:
    """The search's test for one candidate's ``trials`` signals against the processes kept so far."""
    largest = candidate_signals.abs().flatten(1).max(dim=1).values
    if not torch.isfinite(largest).all() or (largest >= float(settings["max_abs"])).any():
        return False
    unit = scale_to_l2(candidate_signals, 1.0)
    return all(float(filter_response(beta, unit).min()) >= float(settings["min_response"]) for beta in kept)


def search_coefficients(num_classes: int, size: int, settings: dict, generator: torch.Generator) -> torch.Tensor:
    """(K, 3, 3, 3) coefficients of K mutually distinguishable, bounded AR processes."""
    kept: list[torch.Tensor] = []
    trials, crop = int(settings["trials"]), int(settings["crop"])
    attempts = 0
    while len(kept) < num_classes and attempts < int(settings["max_attempts"]):
        count = min(CANDIDATES_PER_DRAW, int(settings["max_attempts"]) - attempts)
        candidates = random_coefficients(count, generator)
        signals = generate(candidates.repeat_interleave(trials, dim=0), size, crop, generator)
        for index, beta in enumerate(candidates):
            if len(kept) < num_classes and accepts(signals[index * trials:(index + 1) * trials], kept, settings):
                kept.append(beta)
        attempts += count
    if len(kept) < num_classes:
        raise ConfigError(f"ar.min_response: found only {len(kept)} of {num_classes} AR processes in "
                          f"{attempts} draws; lower ar.min_response or raise ar.max_attempts")
    return torch.stack(kept)


def autoregressive_noise(labels: np.ndarray, coefficients: torch.Tensor, image_size: int, settings: dict,
                         generator: torch.Generator) -> torch.Tensor:
    """(N, 3, H, H) float perturbations: each sample's class process from its own start, ℓ2 = eps."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    crop = int(settings["crop"])
    out = torch.empty((len(labels), 3, image_size, image_size))
    for part in batch_slices(len(labels), SIGNALS_PER_CHUNK):
        signals = generate(coefficients[labels[part]], image_size + crop, crop, generator)
        out[part] = scale_to_l2(signals, float(settings["eps"])).float()
    return out


def protect(spec: dict, images: np.ndarray, labels: np.ndarray, context, seed: int) -> np.ndarray:
    settings = settings_for(__name__, spec)
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"ar: square images expected, got {images.shape[1]}×{images.shape[2]}")
    size = images.shape[1] + int(settings["crop"])
    coefficients = search_coefficients(class_count(labels, context), size, settings, seeded_generator(seed, 0))
    delta = autoregressive_noise(labels, coefficients, images.shape[1], settings, seeded_generator(seed, 1))
    return add_perturbation(images, delta)
