"""Shared pieces of the adaptive attacks Adap-Patch and Adap-Blend (Qi, Xie, Li, Wang and Mittal,
"Revisiting the Assumption of Latent Separability for Backdoor Defenses", ICLR 2023).

Both keep the poisoned samples' latent representations close to the clean ones with two devices:
*cover* samples (the training trigger applied, label kept; the poison stage draws them, ``cover_rate``
of the training set) and a training trigger that is weaker or partial, while the test trigger is
the full one. Images are float (N, 3, H, W) in [0, 1]; a trigger pattern is (3, H, W) and its
mask (H, W) in [0, 1]; blending is x + α·m·(pattern − x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_blend(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """x + α·mask·(pattern − x); ``alpha`` a number or one per image (N,)."""
    alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    mask = mask.to(x.device, x.dtype).expand(x.shape[0], 1, *x.shape[-2:])
    return x + alpha * mask * (pattern.to(x.device, x.dtype) - x)


def resized(pattern: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 32×32 pattern and mask brought to ``size`` pixels (nearest, so masks stay binary)."""
    if pattern.shape[-1] == size:
        return pattern, mask
    pattern = F.interpolate(pattern[None], size=(size, size), mode="nearest")[0]
    mask = F.interpolate(mask[None, None], size=(size, size), mode="nearest")[0, 0]
    return pattern, mask


def balanced_groups(n: int, k: int) -> torch.Tensor:
    """Group of each of ``n`` samples in index order: k consecutive, equal-as-possible runs."""
    return (torch.arange(n) * k) // max(n, 1)
