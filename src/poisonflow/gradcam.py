"""Grad-CAM heat maps of a :class:`poisonflow.models.Classifier`, and a figure of them.

Grad-CAM (Selvaraju et al., 2017) explains the logit y_c of one class c at a layer with feature
maps A^k (k the channels): α_k = the spatial mean of ∂y_c/∂A^k, and the map is ReLU(Σ_k α_k A^k),
the regions whose features raise y_c. Here the map is upsampled bilinearly to the input's H×W
(``align_corners=False``) and scaled per image to [0, 1] by its minimum and maximum; a map with
no positive evidence stays all zero. Captum's ``LayerGradCam`` (with ``relu_attributions``) and
``LayerAttribution.interpolate`` compute it.

- Class explained: the model's predicted class by default (the usual choice; the VSSC paper does
  not say which class its Fig. 5 explains), so on a triggered image whose trigger fires the map
  shows what drives the target class; or ``target``: one class for every image or one per image
  (e.g. the attack's target class, or the true labels).
- Layer: the output of one child of ``model.body`` (an ``nn.Sequential``). ``layer`` is its index
  (negative counts from the end); by default (None) the end of the last resolution stage
  (:func:`poisonflow.models.stage_ends`), i.e. the last convolutional feature map, the usual
  Grad-CAM choice. The channel mask that fine-pruning sets acts after the body, so pruned
  channels get zero weight α_k.

In-place activations of the model are switched off while the maps are computed (and restored),
so a later module cannot overwrite the hooked feature maps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write
from .errors import ConfigError
from .evaluate import device_batches
from .models import stage_ends
from .trainer import to_float

OVERLAY_ALPHA = 0.5  # weight of the heat map's colours over the image
COLORMAP = "jet"


def target_layer(model: nn.Module, layer: int | None, image_shape: tuple[int, int], key: str = "layer") -> nn.Module:
    """The child of ``model.body`` whose output Grad-CAM weighs: index ``layer``, or (None) the end
    of the last resolution stage."""
    if layer is None:
        return model.body[stage_ends(model.body, image_shape)[-1]]
    count = len(model.body)
    if not -count <= layer < count:
        raise ConfigError(f"{key}: {layer} is not a child of this model's body, which has {count} "
                          f"(use -{count} to {count - 1})")
    return model.body[layer]


@contextlib.contextmanager
def no_inplace(model: nn.Module) -> Iterator[None]:
    switched = [module for module in model.modules() if getattr(module, "inplace", False) is True]
    for module in switched:
        module.inplace = False
    try:
        yield
    finally:
        for module in switched:
            module.inplace = True


def target_classes(target, count: int, key: str = "target") -> np.ndarray | None:
    """``target`` as one int64 class per image, or None (the predicted class)."""
    if target is None:
        return None
    classes = np.full(count, int(target), np.int64) if np.ndim(target) == 0 else np.array(target, dtype=np.int64)
    if classes.shape != (count,):
        raise ConfigError(f"{key}: {classes.shape[0]} classes for {count} images")
    return classes


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map (N, H, W) scaled to [0, 1] by its minimum and maximum; a constant map becomes 0."""
    flat = maps.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1)
    span = (flat.max(1).values.view(-1, 1, 1) - low)
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def grad_cam(model: nn.Module, images: np.ndarray, target=None, layer: int | None = None, batch_size: int = 64,
             key: str = "gradcam") -> np.ndarray:
    """Grad-CAM maps of uint8 NHWC ``images``: float32 (N, H, W) in [0, 1]. ``target``: None (each
    image's predicted class), one class for all, or one class per image; ``layer``: see the module."""
    from captum.attr import LayerAttribution, LayerGradCam

    images = np.asarray(images)
    height, width = images.shape[1:3]
    classes = target_classes(target, len(images), f"{key}.target")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    cams = []
    try:
        with no_inplace(model), torch.enable_grad():
            explainer = LayerGradCam(model, target_layer(model, layer, (height, width), f"{key}.layer"))
            start = 0
            for batch in device_batches(images, device, batch_size):
                x = to_float(batch)
                if classes is None:
                    with torch.no_grad():
                        wanted = model(x).argmax(1)
                else:
                    wanted = torch.as_tensor(classes[start:start + len(x)], device=device)
                start += len(x)
                maps = explainer.attribute(x, target=wanted, relu_attributions=True)
                maps = LayerAttribution.interpolate(maps.detach(), (height, width), interpolate_mode="bilinear")
                cams.append(normalise(maps[:, 0].float()).cpu())
    finally:
        model.train(was_training)
    if not cams:
        return np.zeros((0, height, width), np.float32)
    return torch.cat(cams).numpy().astype(np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 (H, W, 3) image with the colour-mapped ``cam`` (H, W, in [0, 1]) blended over it; float in [0, 1]."""
    from matplotlib import colormaps

    colours = colormaps[COLORMAP](np.clip(cam, 0.0, 1.0))[..., :3]
    return (1.0 - alpha) * (image.astype(np.float64) / 255.0) + alpha * colours


def heatmap_figure(images: Sequence[np.ndarray], cams: Sequence[np.ndarray], titles: Sequence[str],
                   path: str | os.PathLike, dpi: int = 150, groups_per_row: int = 1) -> Path:
    """A figure of groups of images with their heat maps, written to ``path`` (format from its
    suffix) atomically; returns ``path``.

    ``images[g]`` is a group, uint8 (n, H, W, 3) or one image (H, W, 3), ``cams[g]`` its maps
    ((n, H, W) or (H, W), in [0, 1]) and ``titles[g]`` its title. Each group takes two rows, the
    images above and the maps blended over them below, one column per image; ``groups_per_row``
    groups sit side by side (e.g. one attack's plain and distorted images on one row).
    """
    from matplotlib.figure import Figure

    groups = [np.asarray(group) for group in images]
    maps = [np.asarray(cam) for cam in cams]
    if not len(groups) == len(maps) == len(titles) or not groups:
        raise ValueError(f"heatmap_figure: {len(groups)} groups of images, {len(maps)} of maps, {len(titles)} titles")
    groups = [group[None] if group.ndim == 3 else group for group in groups]
    maps = [cam[None] if cam.ndim == 2 else cam for cam in maps]
    width = max(len(group) for group in groups)
    per_row = max(1, min(int(groups_per_row), len(groups)))
    rows = -(-len(groups) // per_row)
    figure = Figure(figsize=(1.5 * width * per_row, 3.2 * rows))
    axes = figure.subplots(2 * rows, width * per_row, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for index, (group, cam, title) in enumerate(zip(groups, maps, titles)):
        if group.shape[:3] != cam.shape:
            raise ValueError(f"heatmap_figure: group '{title}' has images {group.shape} and maps {cam.shape}")
        row, first = 2 * (index // per_row), width * (index % per_row)
        for column in range(len(group)):
            axes[row, first + column].imshow(group[column])
            axes[row + 1, first + column].imshow(overlay(group[column], cam[column]))
        axes[row, first].set_title(str(title), fontsize=8, loc="left")
    figure.tight_layout()
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: figure.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))
    return path
