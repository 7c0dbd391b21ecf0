"""Trigger steps shared by the backdoor attacks, one pure function per step.

Images are batched float tensors (N, 3, H, W) in [0, 1]; every function returns a new tensor and
never modifies its input. Random parts draw from an explicit ``torch.Generator`` so an attack
built from a seed is the same in every process.

Patch triggers (BadNets): :func:`patch_pattern` → :func:`patch_position` → :func:`stamp_patch`.
Blended triggers: :func:`noise_pattern` or :func:`image_pattern` → :func:`blend`.
Warping triggers (WaNet): :func:`wanet_grids` → :func:`warp_grid` → :func:`warp`, and
:func:`noise_grid_for` for the noise-mode samples that are warped but keep their labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .geometry import PATCH_POSITIONS, patch_position  # noqa: F401  (re-exported for the patch triggers)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded from ``seed``: trigger randomness must not depend on the device."""
    return torch.Generator().manual_seed(int(seed))


def check_image_size(x: torch.Tensor, image_size: int, what: str) -> None:
    """A trigger is built for one image size; applying it to another would misplace it silently."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"{what} trigger was built for (N, C, {image_size}, {image_size}) images, got {tuple(x.shape)}"
        )


# --- patch triggers (BadNets) ---------------------------------------------------------------


def checkerboard_patch(size: int) -> torch.Tensor:
    """A (3, size, size) black/white checkerboard, 1 = white.

    White where row + col is even, so the bottom-right cell is white for every size, except the
    top-left cell, which is black: for size 3 this is exactly [[0,0,1],[0,1,0],[1,0,1]], the
    BadNets pattern, whose missing corner makes it asymmetric. A 1×1 patch is a single white pixel.
    """
    rows = torch.arange(size).view(size, 1)
    cols = torch.arange(size).view(1, size)
    board = ((rows + cols) % 2 == 0).float()
    if size > 1:
        board[0, 0] = 0.0
    return board.expand(3, size, size).clone()


PATCH_PATTERNS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {
    "checkerboard": lambda size, generator: checkerboard_patch(size),
    "white": lambda size, generator: torch.ones(3, size, size),
    "black": lambda size, generator: torch.zeros(3, size, size),
    # one noise patch drawn once from the attack's seed and stamped on every image
    "random": lambda size, generator: torch.rand(3, size, size, generator=generator),
}


def patch_pattern(name: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """The (3, size, size) patch named ``name`` (see :data:`PATCH_PATTERNS`), values in [0, 1]."""
    if name not in PATCH_PATTERNS:
        raise ConfigError(f"trigger.pattern: unknown patch pattern {name!r} (known: {', '.join(PATCH_PATTERNS)})")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"trigger.size: expected a positive integer, got {size!r}")
    return PATCH_PATTERNS[name](size, generator)




def stamp_patch(x: torch.Tensor, patch: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """``x`` with ``patch`` (C, h, w) pasted at (row, col) in every image; other pixels unchanged."""
    out = x.clone()
    h, w = patch.shape[-2:]
    out[:, :, row : row + h, col : col + w] = patch.to(dtype=x.dtype, device=x.device)
    return out


# --- blended triggers -----------------------------------------------------------------------


def blend(x: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 − α)·x + α·pattern, with ``pattern`` (3, H, W) shared by every image of ``x``."""
    pattern = pattern.to(dtype=x.dtype, device=x.device)
    # a convex combination of [0, 1] values; the clamp only absorbs float rounding at the ends
    return ((1.0 - alpha) * x + alpha * pattern).clamp(0.0, 1.0)


def noise_pattern(image_size: int, generator: torch.Generator) -> torch.Tensor:
    """A (3, image_size, image_size) uniform [0, 1) noise image drawn from ``generator``."""
    return torch.rand(3, image_size, image_size, generator=generator)


def image_pattern(path: str | Path, image_size: int) -> torch.Tensor:
    """The image file at ``path`` as RGB, resized (bilinear) to image_size², a (3, H, W) float in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trigger.path: no image file at {path}")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError) as error:
        raise ConfigError(f"trigger.path: cannot read {path} as an image ({error})") from error
    array = np.asarray(rgb, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --- warping triggers (WaNet) ---------------------------------------------------------------


def wanet_grids(k: int, height: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise_grid, identity_grid), each (1, H, H, 2), for a ``k``×``k`` random control grid.

    The k×k field of random offsets in [−1, 1) is normalized to mean |offset| 1 and upsampled
    bicubically to H×H; the identity grid holds (y, x) from meshgrid(linspace(−1, 1, H)) with
    ij indexing, as WaNet defines it.
    """
    control = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    control = control / torch.mean(torch.abs(control))
    noise_grid = F.interpolate(control, size=height, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    line = torch.linspace(-1, 1, steps=height)
    x, y = torch.meshgrid(line, line, indexing="ij")
    identity_grid = torch.stack((y, x), dim=2)[None]
    return noise_grid, identity_grid


def warp_grid(identity: torch.Tensor, noise: torch.Tensor, s: float, grid_rescale: float) -> torch.Tensor:
    """clamp((identity + s·noise/H)·grid_rescale, −1, 1): the sampling grid of the warp."""
    height = identity.shape[1]
    return torch.clamp((identity + s * noise / height) * grid_rescale, -1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample every image of ``x`` at ``grid`` (1 or N, H, W, 2): bilinear, zero padding, corners aligned."""
    grid = grid.to(dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1, -1)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    # bilinear weights are convex; the clamp only absorbs float rounding at the ends
    return warped.clamp(0.0, 1.0)


def noise_grid_for(grid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` noise-mode grids (n, H, H, 2): ``grid`` plus uniform offsets in [−1/H, 1/H), clamped to [−1, 1]."""
    height, width = grid.shape[1], grid.shape[2]
    offsets = torch.rand(n, height, width, 2, generator=generator, device=generator.device) * 2 - 1
    return torch.clamp(grid.to(offsets.device) + offsets / height, -1, 1)


