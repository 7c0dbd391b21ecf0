"""ShrinkPad: shrink every test input and zero-pad it back to its size at a random offset.

A patch trigger is tied to its pixels: shrinking the image by a few pixels (bilinear) and
shifting it by a random amount moves and resamples the trigger, which is often enough to
deactivate a backdoor while the classifier still recognizes the (slightly smaller) object.

For an H×W image and ``size`` s: resize to (H−s)×(W−s) with bilinear interpolation (half-pixel
centres, no antialiasing — for s = 4 of 32 px the scale is 0.875, where antialiasing changes
little), then place it at (top, left) with top and left drawn independently and uniformly from
{0, …, s}, zeros elsewhere. Each image draws its own offset from a generator seeded with the
experiment seed, so the k-th forward call of a run always sees the same offsets. No training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kinds import settings_for
from . import DefenseContext, DefenseResult
from .preprocessing import Preprocessed


def shrink_pad(x: torch.Tensor, size: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Shrink (N, C, H, W) images by ``size`` pixels and zero-pad each back at its (top, left)."""
    n, _, height, width = x.shape
    shrunk = F.interpolate(x, size=(height - size, width - size), mode="bilinear", align_corners=False)
    # place every image with one gather: output pixel (r, c) takes shrunk pixel (r − top, c − left)
    rows = torch.arange(height, device=x.device).view(1, height) - top.to(x.device).view(n, 1)
    cols = torch.arange(width, device=x.device).view(1, width) - left.to(x.device).view(n, 1)
    inside = ((rows >= 0) & (rows < height - size)).view(n, 1, height, 1) \
        & ((cols >= 0) & (cols < width - size)).view(n, 1, 1, width)
    index = torch.arange(n, device=x.device).view(n, 1, 1)
    placed = shrunk.permute(0, 2, 3, 1)[index, rows.clamp(0, height - size - 1).view(n, height, 1),
                                        cols.clamp(0, width - size - 1).view(n, 1, width)]
    return placed.permute(0, 3, 1, 2) * inside


class ShrinkPad(nn.Module):
    """The pre-processing step, with its own seeded generator for the offsets."""

    def __init__(self, size: int, seed: int):
        super().__init__()
        self.size = int(size)
        self.generator = torch.Generator().manual_seed(int(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        top = torch.randint(0, self.size + 1, (n,), generator=self.generator)
        left = torch.randint(0, self.size + 1, (n,), generator=self.generator)
        return shrink_pad(x, self.size, top, left)


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    if ctx.victim is None:
        raise ValueError("defense 'shrinkpad' needs the victim model")
    resolved = settings_for(__name__, spec)
    size = int(resolved["size"])
    side = int(min(ctx.train_images.shape[1:3]))
    if size >= side:
        raise ConfigError(f"shrinkpad.size: {size} leaves nothing of a {side}-px image")
    model = Preprocessed(ShrinkPad(size, ctx.seed), ctx.victim).to(ctx.device).eval()
    return DefenseResult(model=model, metrics={"shrink_pixels": size})
