"""scikit-learn's bundled handwritten digits (1,797 real 8×8 images; no download).

Upsampled with nearest-neighbour to ``image_size``: smooth (bilinear) upsampling changes how
patch triggers respond to small adversarial perturbations, which A-ABL relies on.
A fixed stratified split holds out ``test_fraction`` (default 0.2) as the test set.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .base import DatasetArrays, apply_subsets, to_rgb_size

CLASSES = [str(d) for d in range(10)]


# The side of the images when image_size is unset (the 8×8 digits upsampled 4×).
NATIVE_SIZE = 32


def _split(spec: dict):
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=float(spec.get("test_fraction", 0.2)),
                                   stratify=labels, random_state=int(spec.get("split_seed", 0)))
    return images, labels, np.sort(train), np.sort(test)


def load(spec: dict, key: str = "datasets") -> DatasetArrays:
    images, labels, train, test = _split(spec)
    size = int(spec.get("image_size", NATIVE_SIZE))
    mode = spec.get("resize", "nearest")
    arrays = DatasetArrays(to_rgb_size(images[train], size, mode), labels[train],
                           to_rgb_size(images[test], size, mode), labels[test], CLASSES)
    return apply_subsets(arrays, spec, key)


def describe(spec: dict, key: str = "datasets") -> dict:
    _, labels, train, test = _split(spec)
    arrays = DatasetArrays(np.zeros((len(train), 1, 1, 3), np.uint8), labels[train],
                           np.zeros((len(test), 1, 1, 3), np.uint8), labels[test], CLASSES)
    arrays = apply_subsets(arrays, spec, key)
    return {"classes": CLASSES, "train_counts": np.bincount(arrays.train_labels, minlength=10).tolist()}
