"""LSP: linearly separable synthetic perturbations (Yu, Zhang, Chen, Yin and Liu, "Availability
Attacks Create Shortcuts", KDD 2022).

Availability poisons work because their perturbations are (almost) linearly separable by class;
LSP builds such perturbations directly, with no model:

1. draw a synthetic K-class data set in dimension d = 3·⌈H/p⌉·⌈W/p⌉ (one value per colour
   channel of each p×p patch): class k's points are its centroid, ``class_sep``·v_k for a distinct
   vertex v_k of {−1, +1}^d, plus Gaussian noise z·A_k with a random mixing matrix A_k uniform in
   [−1, 1]^{d×d} (one well-separated Gaussian cluster per class);
2. give every protected image its own point of its class's cluster;
3. upsample each point to the image by repeating every value over its p×p patch (colour blocks),
   crop to H×W, and scale every perturbation to ℓ2 norm ``eps``·√(3HW), the norm of an ℓ∞
   perturbation of size ``eps`` (≈ 1.30 for 32×32 images at 6/255);
4. add, clip and round.

The perturbations are sample-wise, but their class structure (the cluster centroids) is shared
by each class and different across classes: that is the shortcut.

Keys (defaults in ``lsp.yaml`` beside this module, the paper's CIFAR-10 settings): ``patch_size`` 8 (the paper
uses 32 for 224-px ImageNet images), ``eps`` 6/255, ``class_sep`` 10.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..kinds import settings_for
from .common import add_perturbation, class_count, scale_to_l2
from ..errors import ConfigError


ENUMERATE_BELOW = 20  # up to this dimension, distinct hypercube vertices are drawn by enumeration


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def distinct_vertices(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct random vertices of {−1, +1}^dim, as a (count, dim) float array."""
    if dim <= ENUMERATE_BELOW:
        codes = rng.choice(2 ** dim, size=count, replace=False)
        bits = (codes[:, None] >> np.arange(dim)[None, :]) & 1
        return bits * 2.0 - 1.0
    while True:  # at this dimension a collision is astronomically rare; redraw if it happens
        vertices = rng.choice([-1.0, 1.0], size=(count, dim))
        if len(np.unique(vertices, axis=0)) == count:
            return vertices


def synthetic_points(labels: np.ndarray, num_classes: int, dim: int, class_sep: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(points (N, dim), centroids (K, dim)): each sample a draw from its class's Gaussian cluster."""
    if 2 ** dim < num_classes:
        raise ConfigError(f"lsp.patch_size: {dim} synthetic dimensions give fewer than {num_classes} distinct "
                          f"class centroids; use a smaller patch_size")
    centroids = class_sep * distinct_vertices(num_classes, dim, rng)
    mixing = rng.uniform(-1.0, 1.0, size=(num_classes, dim, dim))
    points = np.empty((len(labels), dim))
    for k in range(num_classes):
        members = np.flatnonzero(labels == k)
        points[members] = rng.standard_normal((len(members), dim)) @ mixing[k] + centroids[k]
    return points, centroids


def patches_to_images(points: np.ndarray, height: int, width: int, patch_size: int) -> torch.Tensor:
    """(N, 3, H, W) images made of colour blocks: value (row, col, channel) fills its p×p patch."""
    rows, cols = patch_grid(height, width, patch_size)
    grid = torch.as_tensor(points, dtype=torch.float32).view(-1, rows, cols, 3).permute(0, 3, 1, 2)
    blocks = grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return blocks[:, :, :height, :width].contiguous()


def synthetic_noise(labels: np.ndarray, num_classes: int, height: int, width: int, settings: dict,
                    seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(δ (N, 3, H, W) with ‖δ_i‖₂ = eps·√(3HW), class centroids (K, d))."""
    patch_size = int(settings["patch_size"])
    if patch_size < 1:
        raise ConfigError(f"lsp.patch_size: must be at least 1, got {patch_size}")
    rows, cols = patch_grid(height, width, patch_size)
    rng = np.random.default_rng(seed)
    points, centroids = synthetic_points(np.asarray(labels), num_classes, rows * cols * 3,
                                         float(settings["class_sep"]), rng)
    budget = float(settings["eps"]) * math.sqrt(3 * height * width)
    return scale_to_l2(patches_to_images(points, height, width, patch_size), budget), centroids


def protect(spec: dict, images: np.ndarray, labels: np.ndarray, context, seed: int) -> np.ndarray:
    settings = settings_for(__name__, spec)
    delta, _ = synthetic_noise(labels, class_count(labels, context), images.shape[1], images.shape[2], settings, seed)
    return add_perturbation(images, delta)
