"""Shared steps of the input-detection defenses (STRIP, SentiNet).

Both perturb each screened input with images from the defender's clean split, turn the victim's
reaction into a suspicion score, and fit their flagging threshold on the clean split's own scores
at a chosen false rejection rate (FRR: the share of clean inputs the defender accepts to flag).
The screened set's ground truth is never used.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Callable

import numpy as np
import torch


# How a threshold at quantile q of the clean split's scores is fitted: the empirical quantile, or
# the quantile of a normal distribution fitted to the scores (STRIP's choice for its entropies).
THRESHOLD_FITS: dict[str, Callable[[np.ndarray, float], float]] = {
    "quantile": lambda values, q: float(np.quantile(values, q)),
    "normal": lambda values, q: float(NormalDist(float(np.mean(values)), max(float(np.std(values)), 1e-12)).inv_cdf(q)),
}


def fitted_threshold(values: np.ndarray, quantile: float, fit: str) -> float:
    """The ``quantile`` of ``values`` (clean scores) under the named fit."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("cannot fit a detection threshold on an empty clean split")
    return THRESHOLD_FITS[fit](values, quantile)


def background_indices(pool_size: int, count: int, own_index: np.ndarray | None, rng: np.random.Generator,
                       num_inputs: int) -> np.ndarray:
    """(num_inputs, count) indices into the clean pool, drawn uniformly with replacement.

    ``own_index[i]`` ≥ 0 marks input i as pool image ``own_index[i]``: it is never drawn for
    itself (an image superimposed on itself is no perturbation), by drawing from the other
    pool_size − 1 images and shifting the draws at or above its own index up by one.
    """
    if own_index is None:
        if pool_size < 1:
            raise ValueError("the defender's clean split is empty")
        return rng.integers(0, pool_size, size=(num_inputs, count))
    if pool_size < 2:
        raise ValueError("the defender's clean split needs at least two images to perturb its own images")
    own = np.asarray(own_index).reshape(-1, 1)
    draws = rng.integers(0, pool_size - 1, size=(num_inputs, count))
    return draws + ((own >= 0) & (draws >= own))


@torch.no_grad()
def probabilities(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Softmax outputs of ``model`` (eval mode) for float images, in batches."""
    model.eval()
    return torch.cat([torch.softmax(model(x[start:start + batch_size]).float(), dim=1)
                      for start in range(0, len(x), batch_size)])


def inputs_per_chunk(perturbations: int, batch_size: int) -> int:
    """Screened inputs processed at once, so each chunk holds about ``batch_size`` perturbed images."""
    return max(1, batch_size // max(1, perturbations))
