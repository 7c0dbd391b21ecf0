"""Grad-CAM on a hand-made classifier whose class-0 evidence is a red patch, and the figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from poisonflow.errors import ConfigError
from poisonflow.gradcam import grad_cam, heatmap_figure
from poisonflow.models import Classifier

torch.set_num_threads(1)


def red_detector() -> Classifier:
    """1×1 conv: channel 0 fires on red, channel 1 on green (inputs normalised by mean 0.5, std 0.25,
    so black is −2: bias 2 makes black give 0); ReLU; 2×2 max-pool. Class c reads channel c."""
    conv = nn.Conv2d(3, 2, 1)
    fc_weight = torch.eye(2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0
        conv.weight[1, 1, 0, 0] = 1.0
        conv.bias.fill_(2.0)
    model = Classifier(nn.Sequential(conv, nn.ReLU(inplace=True), nn.MaxPool2d(2)), 2, 2,
                       (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with torch.no_grad():
        model.fc.weight.copy_(fc_weight)
        model.fc.bias.zero_()
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # a frozen victim still gets its maps
    return model


def patched_images() -> tuple[np.ndarray, np.ndarray]:
    images = np.zeros((2, 8, 8, 3), np.uint8)
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 0:2, 0:2] = True  # top-left red patch
    masks[1, 6:8, 4:6] = True  # bottom, right of centre
    images[masks, 0] = 255
    return images, masks


def test_gradcam_peaks_on_the_patch_that_drives_the_class():
    model = red_detector()
    images, masks = patched_images()
    cams = grad_cam(model, images)  # the predicted class: 0, the only one with evidence
    assert cams.shape == (2, 8, 8) and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() == pytest.approx(1.0)
    assert np.array_equal(grad_cam(model, images, target=0), cams)
    for cam, mask in zip(cams, masks):
        assert mask.flat[cam.argmax()]
        assert cam[mask].mean() > 0.5
        near = np.zeros_like(mask)  # the pooled 4×4 cell and what bilinear upsampling spreads into
        rows, cols = np.nonzero(mask)
        near[max(rows.min() - 2, 0):rows.max() + 3, max(cols.min() - 2, 0):cols.max() + 3] = True
        assert np.all(cam[~near] == 0.0)
    # the ReLU before the pool (body child 1), at full resolution: exactly the patch
    fine = grad_cam(model, images, layer=1)
    assert np.array_equal(fine, masks.astype(np.float32))
    # class 1 (green) has no evidence anywhere: an all-zero map
    assert np.all(grad_cam(model, images, target=[1, 1]) == 0.0)
    assert model.body[1].inplace  # switched back on
    with pytest.raises(ConfigError, match=r"figures\.f\.layer"):
        grad_cam(model, images, layer=3, key="figures.f")


def test_heatmap_figure_is_written(tmp_path):
    images, masks = patched_images()
    path = tmp_path / "fig" / "cams.png"
    assert heatmap_figure([images, images[0]], [masks.astype(np.float32), masks[0] * 1.0], ["a", "b"], path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(ValueError, match="titles"):
        heatmap_figure([images], [masks], ["a", "b"], path)
