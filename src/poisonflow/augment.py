"""Batched training augmentations on device tensors (N, C, H, W).

Every random number is drawn on the CPU from the trainer's ``torch.Generator`` and sent to the
device without a host sync, so one seed gives the same augmented batches on CPU and GPU.

Image augmentations keep the batch's dtype: on uint8 batches they behave like the usual
per-image PIL/uint8 pipeline (interpolated results are rounded back to uint8), on float batches in
[0, 1] they stay float. Each image draws its own parameters, as a per-image transform in a data
loader would. RandAugment and AutoAugment draw one operation per image and then run each distinct
(operation, magnitude) once on the sub-batch of images that drew it, with the
``torchvision.transforms.v2.functional`` kernels; every result is one that
``torchvision.transforms.v2.RandAugment`` / ``AutoAugment`` could have produced for that image.

Mixing augmentations (CutMix, Mixup) run after the image augmentations, on float batches, and
return a :class:`MixedBatch`: the mixed images, each sample's own label, its partner's label, and
the weight ``lam`` of its own label in the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as transforms_v1
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .errors import ConfigError
from .kinds import definition_defaults

NEAREST = v2.InterpolationMode.NEAREST


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Send a small CPU tensor to ``device`` without waiting for the device's queued work.

    A plain ``.to("cuda")`` of pageable memory synchronizes the stream; a pinned copy with
    ``non_blocking`` does not, so the GPU keeps running while the next batch is planned.
    """
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def max_value(x: torch.Tensor) -> float:
    """The value of a white pixel in ``x``'s dtype."""
    return 1.0 if x.is_floating_point() else 255.0


def fill_value(x: torch.Tensor, fill: float) -> float | int:
    """A [0, 1] fill value in ``x``'s scale (a Python number: no host-to-device copy)."""
    return fill if x.is_floating_point() else round(fill * 255.0)


# -- crop and flip ---------------------------------------------------------------------------

def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset per image."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), x.device)
    dx = to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # (n, w)
    index = torch.arange(n, device=x.device).view(n, 1, 1)
    # gather (n, h, w) positions for every channel at once
    out = padded.permute(0, 2, 3, 1)[index, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p`` (1/2 by default)."""
    flip = to_device(torch.rand(x.shape[0], generator=generator) < p, x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


# -- random resized crop ---------------------------------------------------------------------

RRC_ATTEMPTS = 10  # box proposals per image before falling back to the central crop


def sample_resized_crop_boxes(n: int, height: int, width: int, scale, ratio,
                              generator: torch.Generator) -> torch.Tensor:
    """Per-image crop boxes (n, 4) = (top, left, box_height, box_width), int64 on the CPU.

    Each image proposes boxes of area ``scale`` × the image area and aspect ratio ``ratio``
    (log-uniform) and keeps the first that fits; if none of :data:`RRC_ATTEMPTS` fits, the
    largest central box with an aspect ratio inside ``ratio`` is used.
    """
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, RRC_ATTEMPTS, generator=generator,
                                                                         dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, RRC_ATTEMPTS, generator=generator,
                                                               dtype=torch.float64))
    box_w = torch.sqrt(target_area * aspect).round().long()
    box_h = torch.sqrt(target_area / aspect).round().long()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    box_w = box_w.gather(1, first).squeeze(1)
    box_h = box_h.gather(1, first).squeeze(1)
    fallback_h, fallback_w = central_box_size(height, width, ratio)
    found = fits.any(1)
    box_w = torch.where(found, box_w, torch.full_like(box_w, fallback_w))
    box_h = torch.where(found, box_h, torch.full_like(box_h, fallback_h))
    offsets = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, (offsets[:, 0] * (height - box_h + 1)).long(), (height - box_h) // 2)
    left = torch.where(found, (offsets[:, 1] * (width - box_w + 1)).long(), (width - box_w) // 2)
    return torch.stack([top, left, box_h, box_w], dim=1)


def central_box_size(height: int, width: int, ratio) -> tuple[int, int]:
    """The largest box whose aspect ratio (width/height) is clamped into ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def resized_crop(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box and resize it back to the image size (bilinear).

    Sample positions follow the half-pixel convention and are clamped to the box, so each image
    equals ``torchvision.transforms.v2.functional.resized_crop(image, *box, size, antialias=False)``;
    uint8 results are rounded.
    """
    n, _, height, width = x.shape
    top, left, box_h, box_w = (boxes[:, k].to(x.device, torch.float32).view(n, 1) for k in range(4))
    cols = torch.arange(width, device=x.device, dtype=torch.float32).view(1, width)
    rows = torch.arange(height, device=x.device, dtype=torch.float32).view(1, height)
    src_x = torch.maximum(torch.minimum(left + (cols + 0.5) * (box_w / width) - 0.5, left + box_w - 1), left)
    src_y = torch.maximum(torch.minimum(top + (rows + 0.5) * (box_h / height) - 0.5, top + box_h - 1), top)
    grid_x = (src_x * (2.0 / max(width - 1, 1)) - 1.0).view(n, 1, width).expand(n, height, width)
    grid_y = (src_y * (2.0 / max(height - 1, 1)) - 1.0).view(n, height, 1).expand(n, height, width)
    grid = torch.stack([grid_x, grid_y], dim=-1)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out if x.is_floating_point() else out.round_().clamp_(0, 255).to(x.dtype)


def random_resized_crop(x: torch.Tensor, scale, ratio, generator: torch.Generator) -> torch.Tensor:
    """Random-resized-crop each image back to its own size (box drawn per image)."""
    n, _, height, width = x.shape
    boxes = sample_resized_crop_boxes(n, height, width, scale, ratio, generator)
    return resized_crop(x, to_device(boxes, x.device))


# -- colour: jitter and grayscale (SimCLR's views) --------------------------------------------
# Per-image versions of torchvision's tensor kernels (``adjust_brightness``, ``adjust_contrast``,
# ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale``): image i with factor f_i gives what
# the torchvision kernel gives for that image and f_i (up to float rounding in the hue conversion).

LUMA = (0.2989, 0.587, 0.114)  # torchvision's (ITU-R 601-2) grayscale weights


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) float grayscale of float RGB images (N, 3, H, W)."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def per_image(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) CPU values as (N, 1, 1, 1) on ``x``'s device, to broadcast over each image."""
    return to_device(values.to(torch.float32), x.device).view(-1, 1, 1, 1)


def blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor·a + (1 − factor)·b, clamped to [0, 1] (torchvision's blend, a factor per image)."""
    return (a * factor + b * (1.0 - factor)).clamp_(0.0, 1.0)


def scale_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor).clamp_(0.0, 1.0)


def scale_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with the mean of its grayscale."""
    return blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def scale_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its grayscale."""
    return blend(x, luma(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in [0, 1), saturation and value of float RGB images, each (N, H, W); grey pixels get hue 0."""
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)
    spread = high - low
    grey = spread == 0  # also every black pixel: no hue, no saturation, and no division by zero
    saturation = spread / torch.where(grey, torch.ones_like(high), high)
    divisor = torch.where(grey, torch.ones_like(spread), spread)
    rc, gc, bc = (high - r) / divisor, (high - g) / divisor, (high - b) / divisor
    hue = torch.where(high == r, bc - gc, torch.where(high == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return (hue / 6.0 + 1.0).fmod(1.0), saturation, high


# For each of the six hue sectors, which of (v, p, q, t) are its red, green and blue.
HSV_SECTORS = torch.tensor([(0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2)])


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB of hue in [0, 1), saturation and value, each (N, H, W)."""
    scaled = hue * 6.0
    sector = torch.floor(scaled)
    fraction = scaled - sector
    p = ((1.0 - saturation) * value).clamp(0.0, 1.0)
    q = ((1.0 - saturation * fraction) * value).clamp(0.0, 1.0)
    t = ((saturation * fraction + (1.0 - saturation)) * value).clamp(0.0, 1.0)
    candidates = torch.stack([value, p, q, t], dim=1)  # (N, 4, H, W)
    table = to_device(HSV_SECTORS, hue.device)
    select = table[sector.long().remainder(6)].permute(0, 3, 1, 2)  # (N, 3, H, W) indices into candidates
    return candidates.gather(1, select)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (N, 1, 1, 1), a fraction of the hue circle in [−0.5, 0.5]."""
    hue, saturation, value = rgb_to_hsv(x)
    return hsv_to_rgb((hue + shift.view(-1, 1, 1)).remainder(1.0), saturation, value)


# Colour jitter's adjustments in torchvision's numbering (brightness, contrast, saturation, hue);
# each takes float images and a per-image factor (N, 1, 1, 1).
COLOR_ADJUSTMENTS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    scale_brightness, scale_contrast, scale_saturation, shift_hue)


def jitter_factors(n: int, brightness: float, contrast: float, saturation: float, hue: float,
                   generator: torch.Generator) -> torch.Tensor:
    """(n, 4) CPU factors as ``ColorJitter`` draws them: brightness, contrast and saturation uniform in
    [max(0, 1 − s), 1 + s], the hue shift uniform in [−h, h]."""
    low = torch.tensor([max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast), max(0.0, 1.0 - saturation), -hue])
    high = torch.tensor([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue])
    return low + (high - low) * torch.rand(n, 4, generator=generator)


def adjust_colors(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                  applied: torch.Tensor | None = None) -> torch.Tensor:
    """Apply image i's four adjustments (``factors[i]``: brightness, contrast, saturation factors and
    hue shift) in the order ``order[i]`` (a permutation of 0..3); images with ``applied`` False (CPU
    bool) are left as they are. Each (position, adjustment) runs once on the images that have it there."""
    n = x.shape[0]
    applied = torch.ones(n, dtype=torch.bool) if applied is None else applied
    out = x.clone()
    for position in range(4):
        for adjustment, adjust in enumerate(COLOR_ADJUSTMENTS):
            rows = (applied & (order[:, position] == adjustment)).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            device_rows = to_device(rows, x.device)
            out[device_rows] = adjust(out[device_rows], per_image(factors[rows, adjustment], x))
    return out


def on_float(x: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``transform`` of float images in [0, 1]; a uint8 batch is converted and rounded back."""
    if x.is_floating_point():
        return transform(x)
    return transform(x.float().div(255.0)).mul_(255.0).round_().to(x.dtype)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float, p: float,
                 generator: torch.Generator) -> torch.Tensor:
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` per image: with probability
    ``p`` an image gets its own four factors, applied in its own random order."""
    n = x.shape[0]
    applied = torch.rand(n, generator=generator) < p
    factors = jitter_factors(n, brightness, contrast, saturation, hue, generator)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)  # a uniform permutation per image
    return on_float(x, lambda images: adjust_colors(images, factors, order, applied))


def random_grayscale(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each image by its grayscale (in all three channels) with probability ``p``."""
    gray = to_device(torch.rand(x.shape[0], generator=generator) < p, x.device)
    return torch.where(gray.view(-1, 1, 1, 1), on_float(x, lambda images: luma(images).expand_as(images)), x)


# -- Cutout ----------------------------------------------------------------------------------

def cutout(x: torch.Tensor, size: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Fill a ``size``×``size`` square centred at a uniform random pixel of each image.

    The square is clipped at the border, so it may be smaller near the edges (as in Cutout).
    """
    n, _, height, width = x.shape
    centres = torch.stack([torch.randint(0, height, (n,), generator=generator),
                           torch.randint(0, width, (n,), generator=generator)], dim=1)
    centres = to_device(centres, x.device)
    rows = torch.arange(height, device=x.device).view(1, height)
    cols = torch.arange(width, device=x.device).view(1, width)
    half = size // 2
    cy, cx = centres[:, :1], centres[:, 1:]
    in_rows = (rows >= cy - half) & (rows < cy - half + size)  # (n, H)
    in_cols = (cols >= cx - half) & (cols < cx - half + size)  # (n, W)
    mask = (in_rows.view(n, 1, height, 1) & in_cols.view(n, 1, 1, width))
    return torch.where(mask, fill_value(x, fill), x)


# -- RandAugment / AutoAugment ---------------------------------------------------------------

def _affine(x, shear_x=0.0, shear_y=0.0, translate=(0, 0), centre=None):
    return TF.affine(x, angle=0.0, translate=list(translate), scale=1.0, shear=[shear_x, shear_y],
                     interpolation=NEAREST, fill=None, center=centre)


# Operation name → f(batch, magnitude). Shears take tan(angle) (the AutoAugment convention),
# translations whole pixels, rotations degrees, colour operations a factor offset from 1.
OPERATIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "Identity": lambda x, m: x,
    "ShearX": lambda x, m: _affine(x, shear_x=math.degrees(math.atan(m)), centre=[0, 0]),
    "ShearY": lambda x, m: _affine(x, shear_y=math.degrees(math.atan(m)), centre=[0, 0]),
    "TranslateX": lambda x, m: _affine(x, translate=(int(m), 0)),
    "TranslateY": lambda x, m: _affine(x, translate=(0, int(m))),
    "Rotate": lambda x, m: TF.rotate(x, angle=m, interpolation=NEAREST, fill=None),
    "Brightness": lambda x, m: TF.adjust_brightness(x, brightness_factor=1.0 + m),
    "Color": lambda x, m: TF.adjust_saturation(x, saturation_factor=1.0 + m),
    "Contrast": lambda x, m: TF.adjust_contrast(x, contrast_factor=1.0 + m),
    "Sharpness": lambda x, m: TF.adjust_sharpness(x, sharpness_factor=1.0 + m),
    "Posterize": lambda x, m: TF.posterize(x, bits=int(m)),
    "Solarize": lambda x, m: TF.solarize(x, threshold=max_value(x) * m),
    "AutoContrast": lambda x, m: TF.autocontrast(x),
    "Equalize": lambda x, m: TF.equalize(x),
    "Invert": lambda x, m: TF.invert(x),
}


def magnitude_space(bins: int, height: int, width: int) -> dict[str, tuple[torch.Tensor | None, bool]]:
    """Operation name → (magnitude per bin or None, whether the sign is drawn at random)."""
    return {
        "Identity": (None, False),
        "ShearX": (torch.linspace(0.0, 0.3, bins), True),
        "ShearY": (torch.linspace(0.0, 0.3, bins), True),
        "TranslateX": (torch.linspace(0.0, 150.0 / 331.0 * width, bins), True),
        "TranslateY": (torch.linspace(0.0, 150.0 / 331.0 * height, bins), True),
        "Rotate": (torch.linspace(0.0, 30.0, bins), True),
        "Brightness": (torch.linspace(0.0, 0.9, bins), True),
        "Color": (torch.linspace(0.0, 0.9, bins), True),
        "Contrast": (torch.linspace(0.0, 0.9, bins), True),
        "Sharpness": (torch.linspace(0.0, 0.9, bins), True),
        "Posterize": ((8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int(), False),
        "Solarize": (torch.linspace(1.0, 0.0, bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
        "Invert": (None, False),
    }


# RandAugment's operation list (no Invert).
RANDAUGMENT_OPERATIONS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                          "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")

AUTOAUGMENT_POLICIES = {
    "cifar10": v2.AutoAugmentPolicy.CIFAR10,
    "imagenet": v2.AutoAugmentPolicy.IMAGENET,
    "svhn": v2.AutoAugmentPolicy.SVHN,
}
AUTOAUGMENT_BINS = 10  # AutoAugment's policies index magnitudes on a 10-bin scale


def signed_operation(name: str, bin_index: int | None, negative: bool, space: dict) -> tuple[str, float]:
    """(name, magnitude) of one operation at a magnitude bin, negated when drawn negative."""
    magnitudes, signed = space[name]
    if magnitudes is None:
        return name, 0.0
    magnitude = float(magnitudes[bin_index])
    return name, -magnitude if (signed and negative) else magnitude


def randaugment_choices(names, magnitude: int, space: dict) -> list[tuple[str, float]]:
    """RandAugment's possible operations: index 2k (+) and 2k+1 (− when signed) for operation k."""
    return [signed_operation(name, magnitude, negative, space) for name in names for negative in (False, True)]


def autoaugment_choices(policies, stage: int, space: dict) -> list[tuple[str, float]]:
    """A policy stage's possible operations: index 2p (+) and 2p+1 (− when signed) for sub-policy p."""
    return [signed_operation(policy[stage][0], policy[stage][2], negative, space)
            for policy in policies for negative in (False, True)]


def apply_per_image(x: torch.Tensor, choice: torch.Tensor, choices: list[tuple[str, float]]) -> torch.Tensor:
    """Apply ``choices[choice[i]]`` to image i (``choice`` on the CPU; −1 = leave the image as is).

    Each distinct (operation, magnitude) runs once, on the sub-batch that drew it.
    """
    distinct: dict[tuple[str, float], list[int]] = {}
    for index, operation in enumerate(choices):
        distinct.setdefault(operation, []).append(index)
    out = x.clone()
    for (name, magnitude), indices in distinct.items():
        if name == "Identity":
            continue  # leaves the sub-batch as it is; skipping it saves a gather and a scatter
        rows = torch.isin(choice, torch.tensor(indices)).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        rows = to_device(rows, x.device)
        out[rows] = OPERATIONS[name](out[rows], magnitude)
    return out


def randaugment(x: torch.Tensor, generator: torch.Generator, num_ops: int, magnitude: int, bins: int) -> torch.Tensor:
    """RandAugment: ``num_ops`` operations per image, each uniform over the list, at bin ``magnitude``."""
    n, _, height, width = x.shape
    choices = randaugment_choices(RANDAUGMENT_OPERATIONS, magnitude, magnitude_space(bins, height, width))
    for _ in range(num_ops):
        operation = torch.randint(0, len(RANDAUGMENT_OPERATIONS), (n,), generator=generator)
        negative = (torch.rand(n, generator=generator) <= 0.5).long()
        x = apply_per_image(x, 2 * operation + negative, choices)
    return x


def autoaugment_policies(policy: str) -> list:
    """The sub-policies ((name, probability, bin), (name, probability, bin)) of a named policy."""
    return transforms_v1.AutoAugment(AUTOAUGMENT_POLICIES[policy]).policies


def autoaugment(x: torch.Tensor, generator: torch.Generator, policy: str) -> torch.Tensor:
    """AutoAugment: one sub-policy per image; each of its two operations runs with its probability."""
    n, _, height, width = x.shape
    policies = autoaugment_policies(policy)
    space = magnitude_space(AUTOAUGMENT_BINS, height, width)
    sub_policy = torch.randint(0, len(policies), (n,), generator=generator)
    for stage in (0, 1):
        probability = torch.tensor([p[stage][1] for p in policies], dtype=torch.float32)[sub_policy]
        applied = torch.rand(n, generator=generator) <= probability
        negative = (torch.rand(n, generator=generator) <= 0.5).long()
        choice = torch.where(applied, 2 * sub_policy + negative, torch.full_like(sub_policy, -1))
        x = apply_per_image(x, choice, autoaugment_choices(policies, stage, space))
    return x


# -- mixing: CutMix and Mixup ---------------------------------------------------------------

@dataclass
class MixedBatch:
    """A training batch after augmentation. Sample i's target is ``lam``·labels[i] + (1−lam)·partner_labels[i]."""
    images: torch.Tensor
    labels: torch.Tensor
    partner_labels: torch.Tensor | None = None
    lam: float = 1.0

    @property
    def mixed(self) -> bool:
        return self.partner_labels is not None and self.lam < 1.0


def beta_sample(alpha: float, generator: torch.Generator) -> float:
    """One draw from Beta(alpha, alpha), seeded from ``generator`` (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def partner(x: torch.Tensor) -> torch.Tensor:
    """Each sample's mixing partner: the next one in the (already shuffled) batch."""
    return x.roll(1, dims=0)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator) -> MixedBatch:
    """Mixup: every image becomes lam·x + (1−lam)·partner, one lam ~ Beta(alpha, alpha) per batch."""
    lam = beta_sample(alpha, generator)
    return MixedBatch(x * lam + partner(x) * (1.0 - lam), y, partner(y), lam)


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2): a box of area ≈ (1−lam)·H·W at a uniform random centre, clipped to the image."""
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    half = 0.5 * math.sqrt(1.0 - lam)
    half_h, half_w = int(half * height), int(half * width)
    return max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width)


def cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator) -> MixedBatch:
    """CutMix: paste the partner's box into every image; lam is the area left of the image's own."""
    _, _, height, width = x.shape
    y1, y2, x1, x2 = cutmix_box(height, width, beta_sample(alpha, generator), generator)
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = partner(x)[:, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
    return MixedBatch(out, y, partner(y), lam)


def mixed_cross_entropy(logits: torch.Tensor, batch: MixedBatch, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross entropy against the batch's (possibly mixed, possibly smoothed) targets."""
    own = F.cross_entropy(logits, batch.labels, reduction="none", label_smoothing=label_smoothing)
    if not batch.mixed:
        return own
    other = F.cross_entropy(logits, batch.partner_labels, reduction="none", label_smoothing=label_smoothing)
    return batch.lam * own + (1.0 - batch.lam) * other


# -- registries and the batch pipeline -------------------------------------------------------

# name → f(batch, generator, settings); ``settings`` is the resolved ``trainings:`` entry.
IMAGE_AUGMENTATIONS: dict[str, Callable] = {
    "crop": lambda x, g, s: random_crop(x, int(s["crop_padding"]), g),
    "flip": lambda x, g, s: random_flip(x, g),
    "rrc": lambda x, g, s: random_resized_crop(x, s["rrc_scale"], s["rrc_ratio"], g),
    "cutout": lambda x, g, s: cutout(x, int(s["cutout_size"]), float(s["cutout_fill"]), g),
    "randaugment": lambda x, g, s: randaugment(x, g, int(s["randaugment_ops"]), int(s["randaugment_magnitude"]),
                                               int(s["randaugment_bins"])),
    "autoaugment": lambda x, g, s: autoaugment(x, g, s["autoaugment_policy"]),
}

# name → f(float batch, labels, generator, settings) → MixedBatch
MIXING_AUGMENTATIONS: dict[str, Callable] = {
    "cutmix": lambda x, y, g, s: cutmix(x, y, float(s["cutmix_alpha"]), g),
    "mixup": lambda x, y, g, s: mixup(x, y, float(s["mixup_alpha"]), g),
}

# The keys each augmentation reads, with their defaults: the schema's ``$defs/training`` (one place).
AUGMENT_KEYS = ("crop_padding", "rrc_scale", "rrc_ratio", "cutout_size", "cutout_fill", "randaugment_ops",
                "randaugment_magnitude", "randaugment_bins", "autoaugment_policy", "cutmix_alpha", "mixup_alpha",
                "mix_prob")
DEFAULTS: dict = {key: value for key, value in definition_defaults("training", {"model": "-"}).items()
                  if key in AUGMENT_KEYS}


def check_settings(names: list[str], settings: dict) -> None:
    """Reject unknown augmentation names and parameter values the schema cannot express."""
    known = {**IMAGE_AUGMENTATIONS, **MIXING_AUGMENTATIONS}
    for name in names:
        if name not in known:
            raise ConfigError(f"training.augment: unknown augmentation '{name}' (known: {', '.join(sorted(known))})")
    for key in ("rrc_scale", "rrc_ratio"):
        low, high = settings[key]
        if not 0 < low <= high:
            raise ConfigError(f"training.{key}: needs 0 < low <= high, got {list(settings[key])}")
    if settings["rrc_scale"][1] > 1:
        raise ConfigError(f"training.rrc_scale: the upper bound must be at most 1, got {settings['rrc_scale'][1]}")
    if not 0 <= int(settings["randaugment_magnitude"]) < int(settings["randaugment_bins"]):
        raise ConfigError(f"training.randaugment_magnitude: must be below randaugment_bins "
                          f"({settings['randaugment_bins']}), got {settings['randaugment_magnitude']}")
    if settings["autoaugment_policy"] not in AUTOAUGMENT_POLICIES:
        raise ConfigError(f"training.autoaugment_policy: unknown policy '{settings['autoaugment_policy']}' "
                          f"(known: {', '.join(sorted(AUTOAUGMENT_POLICIES))})")


class BatchAugment:
    """The augmentation of one training batch: image augmentations in list order, on the batch's
    own dtype; then conversion to float in [0, 1]; then, with probability ``mix_prob``, one of the
    listed mixing augmentations (chosen uniformly per batch when both are listed)."""

    def __init__(self, names: list[str], settings: dict):
        settings = {**DEFAULTS, **settings}
        check_settings(names, settings)
        self.settings = settings
        self.image_steps = [IMAGE_AUGMENTATIONS[name] for name in names if name in IMAGE_AUGMENTATIONS]
        self.mixing_steps = [MIXING_AUGMENTATIONS[name] for name in names if name in MIXING_AUGMENTATIONS]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> MixedBatch:
        for step in self.image_steps:
            x = step(x, generator, self.settings)
        x = x.float().div_(255.0) if not x.is_floating_point() else x
        if not self.mixing_steps:
            return MixedBatch(x, y)
        if float(torch.rand(1, generator=generator)) >= float(self.settings["mix_prob"]):
            return MixedBatch(x, y)
        pick = int(torch.randint(0, len(self.mixing_steps), (1,), generator=generator))
        return self.mixing_steps[pick](x, y, generator, self.settings)


def apply(names: list[str], x: torch.Tensor, generator: torch.Generator, crop_padding: int = 4,
          settings: dict | None = None) -> torch.Tensor:
    """Apply the image augmentations ``names`` in order (no mixing), keeping ``x``'s dtype."""
    settings = {**DEFAULTS, **(settings or {}), "crop_padding": crop_padding}
    check_settings(names, settings)
    for name in names:
        if name in MIXING_AUGMENTATIONS:
            raise ConfigError(f"training.augment: '{name}' mixes labels and needs the batch's labels")
        x = IMAGE_AUGMENTATIONS[name](x, generator, settings)
    return x
