"""Shared pieces of dataset sources: the arrays they return, resizing and stratified subsets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass
class DatasetArrays:
    train_images: np.ndarray  # uint8 (N, H, W, 3)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def to_rgb_size(images: np.ndarray, image_size: int, mode: str = "nearest") -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) → uint8 (N, S, S, 3); grey is repeated to three channels."""
    import torch  # imported here: describe() runs when the workflow is parsed and must stay light
    import torch.nn.functional as F

    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[1] == image_size and images.shape[2] == image_size:
        return np.ascontiguousarray(images, dtype=np.uint8)
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, len(images), 4096):
        x = torch.from_numpy(images[start:start + 4096]).permute(0, 3, 1, 2).float()
        kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
        y = F.interpolate(x, size=(image_size, image_size), mode=mode, **kwargs)
        out[start:start + 4096] = y.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def stratified_indices(labels: np.ndarray, size: int | None, seed: int, key: str) -> np.ndarray:
    """Indices of a stratified subset of ``size`` samples (all, in order, if ``size`` is None)."""
    n = len(labels)
    if size is None or size == n:
        return np.arange(n)
    if not 0 < size < n:
        raise ConfigError(f"{key}: {size} is outside 1..{n} (the source has {n} samples)")
    # imported here: a source's describe() runs when the workflow is parsed, and scikit-learn
    # takes a second to import
    from sklearn.model_selection import train_test_split

    try:
        chosen, _ = train_test_split(np.arange(n), train_size=size, stratify=labels, random_state=seed)
    except ValueError as error:  # e.g. a class too small to stratify
        raise ConfigError(f"{key}: cannot take a stratified subset of {size} ({error})") from None
    return np.sort(chosen)


def subset_counts(class_totals: np.ndarray, size: int | None, seed: int, key: str) -> np.ndarray:
    """Per-class counts of :func:`stratified_indices` on labels with these class totals."""
    labels = np.repeat(np.arange(len(class_totals)), class_totals)
    return np.bincount(labels[stratified_indices(labels, size, seed, key)], minlength=len(class_totals))


def apply_subsets(arrays: DatasetArrays, spec: dict, key: str) -> DatasetArrays:
    """Apply the optional ``train_size`` / ``test_size`` of a datasets entry."""
    seed = int(spec.get("split_seed", 0))
    train = stratified_indices(arrays.train_labels, spec.get("train_size"), seed, f"{key}.train_size")
    test = stratified_indices(arrays.test_labels, spec.get("test_size"), seed, f"{key}.test_size")
    return DatasetArrays(arrays.train_images[train], arrays.train_labels[train],
                         arrays.test_images[test], arrays.test_labels[test], arrays.classes)
