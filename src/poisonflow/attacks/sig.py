"""SIG: a horizontal sinusoidal signal added to every poisoned image (Barni, Kallas and Tondi,
"A new backdoor attack in CNNs by training set corruption without label poisoning", ICIP 2019).

The signal is v(i, j) = Δ·sin(2π·j·f / m) on the 0–255 pixel scale, for column j of an image m
pixels wide, the same in every row and channel; the poisoned image is clip(x + v). The attack is
clean-label by default: target-class training images get the signal and keep their label, so the
network learns the signal as a feature of the target class. The paper poisons with Δ = 20, f = 6
and notes that a stronger signal at test time raises the success rate: ``test_delta`` (default:
the same Δ) sets the signal of the ASR set. Keys and defaults: ``sig.yaml`` beside this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import triggers
from ..kinds import settings_for
from . import PoisonContext


def sinusoid(delta: float, frequency: float, height: int, width: int) -> torch.Tensor:
    """(3, height, width) signal on the [0, 1] scale: (delta/255)·sin(2π·j·frequency/width) at column j."""
    columns = torch.arange(width, dtype=torch.float64)
    row = (delta / 255.0) * torch.sin(2 * math.pi * columns * frequency / width)
    return row.float().expand(3, height, width).clone()


@dataclass(frozen=True)
class SignalTrigger:
    train_signal: torch.Tensor  # (3, H, W), added to the poisoned training images
    test_signal: torch.Tensor  # (3, H, W), added to the test images of the ASR set
    image_size: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "sig")
        return (x + self.test_signal.to(x.device)).clamp(0, 1)

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "sig")
        return (x + self.train_signal.to(x.device)).clamp(0, 1)


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> SignalTrigger:
    trigger = settings_for(__name__, spec)["trigger"]
    test_delta = trigger["delta"] if trigger["test_delta"] is None else trigger["test_delta"]
    return SignalTrigger(sinusoid(trigger["delta"], trigger["frequency"], image_size, image_size),
                         sinusoid(test_delta, trigger["frequency"], image_size, image_size), image_size)
