"""OPS: one-pixel shortcut (Wu, Chen, Zhang and Zhu, "One-Pixel Shortcut: On the Learning
Preference of Deep Neural Networks", ICLR 2023).

Per class, one pixel position p and one colour σ (a corner of the RGB cube, 8 candidates) are set
on every image of the class. They are chosen, with no model, so that the change is as large and as
uniform over the class as possible: for the class's images x (values in [0, 1]),

    score(p, σ) = mean |x(p) − σ| / std |x(p) − σ|,

mean and (population) standard deviation taken over the class's images and the three channels;
(p, σ) is the argmax. A pixel that every image of the class shares (std 0) scores +∞ unless σ is
that very colour (then 0). Classes are searched in label order and a (p, σ) pair already taken by
an earlier class is excluded, so classes never share a shortcut. Ties (typically +∞ on a constant
background, as in upsampled grey datasets) are broken uniformly at random from the seed: a fixed
order would put every class's pixel side by side in one corner, where a random crop of the victim's
augmentation confuses them. Without ties the search is deterministic. The perturbation is
unbounded in ℓ∞ but touches one pixel (ℓ0 = 1). Colour index v has channel bits
(v >> 2 & 1, v >> 1 & 1, v & 1) over (R, G, B).

Keys (defaults in ``ops.yaml`` beside this module): ``pixels`` 1, the number of distinct positions set per class
(the paper's setting is one).
"""

from __future__ import annotations

import numpy as np
import torch

from ..kinds import settings_for
from .common import class_count, images_to_float, seeded_generator
from ..errors import ConfigError


# The 8 corners of the RGB cube, by colour index.
CORNER_COLOURS = torch.tensor([[(v >> 2) & 1, (v >> 1) & 1, v & 1] for v in range(8)], dtype=torch.float32)


def pixel_scores(x: torch.Tensor) -> torch.Tensor:
    """(H, W, 8) search scores of a class's images ``x`` (n, 3, H, W): mean/std of |x(p) − σ|."""
    scores = []
    for colour in CORNER_COLOURS.to(x.device):
        deviation = (x - colour.view(1, 3, 1, 1)).abs()  # (n, 3, H, W)
        mean = deviation.mean(dim=(0, 1))
        std = deviation.std(dim=(0, 1), unbiased=False)
        ratio = mean / std.clamp_min(torch.finfo(x.dtype).tiny)
        scores.append(torch.where(std > 0, ratio, torch.where(mean > 0, torch.inf, 0.0)))
    return torch.stack(scores, dim=-1)


def best_index(scores: torch.Tensor, generator: torch.Generator) -> int:
    """Flat index of the maximum of ``scores``; among tied maxima, one drawn uniformly."""
    flat = scores.flatten()
    tied = torch.nonzero(flat == flat.max()).flatten()
    return int(tied[torch.randint(len(tied), (1,), generator=generator)]) if len(tied) > 1 else int(tied[0])


def search_shortcut(x: torch.Tensor, taken: set, pixels: int,
                    generator: torch.Generator) -> list[tuple[int, int, int]]:
    """The best (row, col, colour index) pairs at ``pixels`` distinct positions, avoiding ``taken`` pairs."""
    scores = pixel_scores(x)
    height, width, colours = scores.shape
    for row, col, colour in taken:
        scores[row, col, colour] = -torch.inf
    chosen = []
    for _ in range(int(pixels)):
        row, rest = divmod(best_index(scores, generator), width * colours)
        col, colour = divmod(rest, colours)
        chosen.append((row, col, colour))
        scores[row, col, :] = -torch.inf  # one colour per position
    return chosen


def class_shortcuts(images: np.ndarray, labels: np.ndarray, num_classes: int, pixels: int = 1,
                    seed: int = 0) -> dict[int, list[tuple[int, int, int]]]:
    """Class → its (row, col, colour index) pixels, searched in label order over the classes present."""
    labels = np.asarray(labels)
    generator = seeded_generator(seed)
    taken: set = set()
    shortcuts = {}
    for k in range(num_classes):
        members = np.flatnonzero(labels == k)
        if len(members) == 0:
            continue
        shortcuts[k] = search_shortcut(images_to_float(images[members]), taken, pixels, generator)
        taken.update(shortcuts[k])
    return shortcuts


def set_pixels(images: np.ndarray, labels: np.ndarray, shortcuts: dict) -> np.ndarray:
    """Each image with its class's pixels set to their colours (0 or 255 per channel)."""
    out = images.copy()
    labels = np.asarray(labels)
    for k, pixels in shortcuts.items():
        members = labels == k
        for row, col, colour in pixels:
            out[members, row, col, :] = (CORNER_COLOURS[colour].numpy() * 255).astype(np.uint8)
    return out


def protect(spec: dict, images: np.ndarray, labels: np.ndarray, context, seed: int) -> np.ndarray:
    settings = settings_for(__name__, spec)
    pixels = int(settings["pixels"])
    if not 1 <= pixels <= images.shape[1] * images.shape[2]:
        raise ConfigError(f"ops.pixels: must be between 1 and the number of pixels, got {pixels}")
    return set_pixels(images, labels, class_shortcuts(images, labels, class_count(labels, context), pixels, seed))
