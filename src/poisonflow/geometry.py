"""Where a square patch goes in an image: pure arithmetic, without torch.

The patch triggers place their patches with :func:`patch_position`; the config check runs the same
function when the workflow is parsed, so a patch that does not fit the dataset's images is refused
before any job starts.
"""

from __future__ import annotations

import numbers
from typing import Callable

from .errors import ConfigError


# Named corners → top-left (row, col) of the patch, ``margin`` pixels from the image border.
PATCH_POSITIONS: dict[str, Callable[[int, int, int, int], tuple[int, int]]] = {
    "top-left": lambda size, height, width, margin: (margin, margin),
    "top-right": lambda size, height, width, margin: (margin, width - size - margin),
    "bottom-left": lambda size, height, width, margin: (height - size - margin, margin),
    "bottom-right": lambda size, height, width, margin: (height - size - margin, width - size - margin),
}


def _explicit_corner(position) -> tuple[int, int] | None:
    """``[row, col]`` from the config as two ints, or None if ``position`` is not such a pair."""
    if isinstance(position, (list, tuple)) and len(position) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in position
    ):
        return int(position[0]), int(position[1])
    return None


def patch_position(position, size: int, height: int, width: int, margin: int = 0) -> tuple[int, int]:
    """Top-left (row, col) of a ``size``×``size`` patch: a named corner or an explicit [row, col].

    Raises ConfigError naming ``trigger.size`` when the patch is larger than the image, and
    ``trigger.position`` (or ``trigger.margin``) when the placed patch would leave the image.
    """
    if size > height or size > width:
        raise ConfigError(f"trigger.size: a {size}×{size} patch does not fit a {height}×{width} image")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ConfigError(f"trigger.margin: expected a non-negative integer, got {margin!r}")
    corner = _explicit_corner(position)
    if corner is None:
        if not isinstance(position, str) or position not in PATCH_POSITIONS:
            raise ConfigError(
                f"trigger.position: expected one of {', '.join(PATCH_POSITIONS)} or [row, col], got {position!r}"
            )
        row, col = PATCH_POSITIONS[position](size, height, width, margin)
        if row < 0 or col < 0:
            raise ConfigError(
                f"trigger.margin: {margin} pixels from the border leaves no room for a {size}×{size} "
                f"patch at {position} of a {height}×{width} image"
            )
        return row, col
    row, col = corner
    if row < 0 or col < 0 or row + size > height or col + size > width:
        raise ConfigError(
            f"trigger.position: a {size}×{size} patch at [{row}, {col}] does not fit a {height}×{width} "
            f"image (row must be in 0..{height - size}, col in 0..{width - size})"
        )
    return row, col
