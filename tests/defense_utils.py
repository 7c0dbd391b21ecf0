"""Tiny synthetic inputs for defense tests: coloured-noise images a width-4 convnet learns in an
epoch or two, and a defender's context around them."""

from __future__ import annotations

import numpy as np
import torch

from poisonflow.defenses import DefenseContext
from poisonflow.models import build_model

TINY_TRAINING = {
    "model": {"arch": "convnet", "width": 4},
    "epochs": 1,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "constant"},
    "augment": ["flip"],
    "adversarial": None,
}


def synthetic_images(n: int, classes: int = 3, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each class a mean colour plus noise: learnable in one or two epochs by a tiny convnet."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    palette = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[:classes]
    images = palette[labels][:, None, None, :] + rng.normal(0, 30, (n, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def tiny_context(tmp_path, victim=None, n: int = 120, seed: int = 0) -> DefenseContext:
    """A defender's context on ``n`` synthetic training images and as many reserve images."""
    images, labels = synthetic_images(n, seed=seed)
    clean_images, clean_labels = synthetic_images(n, seed=seed + 1)
    return DefenseContext(
        train_images=images, train_labels=labels, reserve_images=clean_images, reserve_labels=clean_labels,
        training=TINY_TRAINING,
        build_model=lambda: build_model(TINY_TRAINING["model"], num_classes=3, image_size=8),
        victim=victim, seed=seed, device=torch.device("cpu"), workdir=tmp_path / "work", num_classes=3,
    )
