"""Procedural images of any size and count, for scale and speed tests (no files, no download).

Each class has a smooth colour prototype: a random combination of the lowest 2-D cosine
frequencies, drawn on a canvas a little larger than the image. A sample is a randomly shifted
window of its class prototype at a random gain, plus a smooth nuisance pattern of the same kind
(shared by no class), a brightness offset per channel, and pixel noise. The nuisance is stronger
than the prototype and the shifts reach a quarter of the image, so the class must be found under
comparable structure: nearest class means on raw pixels reach about 60% with 10 classes (chance
10%), and a small CNN, which can undo the shifts, has something left to learn.

Images are generated in chunks of about ``CHUNK_PIXELS`` pixels, each chunk from its own seeded
stream, so memory stays bounded for large counts and the output depends only on the config.
Only numpy is used: ``describe`` runs while the workflow is parsed and must import quickly.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..kinds import settings_for
from .base import DatasetArrays

FREQUENCIES = 4  # cosine frequencies 0..3 per axis: at most 1.5 cycles across the canvas
PROTOTYPE_SCALE = 0.12  # pixel std of a prototype at gain 1, on the [0, 1] scale
NUISANCE_SCALE = 0.2  # pixel std of the per-sample smooth nuisance
BRIGHTNESS_RANGE = 0.08  # per-channel offset drawn from ±this
NOISE_STD = 0.06  # independent pixel noise
GAIN_RANGE = (0.5, 1.5)
CHUNK_PIXELS = 1 << 20
SPLIT_STREAMS = {"train": 1, "test": 2}  # stream 0 draws the prototypes


# image_size always has a value: its default is in the fragment beside this module.
NATIVE_SIZE = None


def settings(spec: dict, key: str) -> dict:
    """The generator's parameters: the entry with ``synthetic.yaml``'s defaults filled, checked."""
    values = settings_for(__name__, spec, key)
    return {name: int(values[name]) for name in ("num_classes", "train_size", "test_size", "image_size", "seed")}


def max_shift(image_size: int) -> int:
    """Largest translation of the prototype window, in pixels: a quarter of the image."""
    return max(1, image_size // 4)


def cosine_basis(size: int) -> np.ndarray:
    """(size, FREQUENCIES) sampled cosines cos(pi k (s + 1/2) / size), the DCT-II basis."""
    positions = (np.arange(size) + 0.5) / size
    return np.cos(np.pi * positions[:, None] * np.arange(FREQUENCIES)[None, :]).astype(np.float32)


def smooth_patterns(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """``count`` smooth RGB patterns (count, 3, size, size), each with zero mean and unit pixel std.

    On the sampled grid the cosines are orthogonal with mean square 1 (k = 0) or 1/2, so dropping
    the constant term gives an exact zero mean and the coefficients alone give the pixel variance.
    """
    coefficients = rng.standard_normal((count, 3, FREQUENCIES, FREQUENCIES), dtype=np.float32)
    coefficients[..., 0, 0] = 0.0
    mean_square = np.where(np.arange(FREQUENCIES) == 0, 1.0, 0.5).astype(np.float32)
    variance = (coefficients**2 * np.outer(mean_square, mean_square)).sum(axis=(2, 3)).mean(axis=1)
    coefficients /= np.sqrt(np.maximum(variance, 1e-12))[:, None, None, None]
    basis = cosine_basis(size)
    return np.einsum("sk,nckl,tl->ncst", basis, coefficients, basis, optimize=True)


def class_prototypes(num_classes: int, image_size: int, seed: int) -> np.ndarray:
    """(C, 3, S + 2m, S + 2m) prototypes on a canvas with room for shifts of up to m pixels."""
    rng = np.random.default_rng([seed, 0])
    return smooth_patterns(rng, num_classes, image_size + 2 * max_shift(image_size))


def balanced_labels(count: int, num_classes: int, seed: int, split: str) -> np.ndarray:
    """Labels as equal per class as ``count`` allows (the first classes get one more), shuffled."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], 0])
    return rng.permutation(np.arange(count, dtype=np.int64) % num_classes)


def shifted_windows(prototypes: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                    image_size: int) -> np.ndarray:
    """Each sample's class prototype, cropped at a random offset: (n, 3, S, S)."""
    shift_span = prototypes.shape[-1] - image_size + 1
    rows = rng.integers(0, shift_span, len(labels))
    cols = rng.integers(0, shift_span, len(labels))
    windows = sliding_window_view(prototypes, (image_size, image_size), axis=(2, 3))  # (C, 3, span, span, S, S)
    channels = np.arange(3)[None, :]
    return windows[labels[:, None], channels, rows[:, None], cols[:, None]]


def render_chunk(prototypes: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 image_size: int) -> np.ndarray:
    """uint8 (n, S, S, 3) images of the given labels."""
    n = len(labels)
    gain = rng.uniform(*GAIN_RANGE, size=(n, 1, 1, 1)).astype(np.float32)
    brightness = rng.uniform(-BRIGHTNESS_RANGE, BRIGHTNESS_RANGE, (n, 3, 1, 1)).astype(np.float32)
    images = rng.standard_normal((n, 3, image_size, image_size), dtype=np.float32)
    # In place, one term at a time: large chunks are memory-bound, and temporaries cost passes.
    images *= NOISE_STD
    images += shifted_windows(prototypes, labels, rng, image_size) * (PROTOTYPE_SCALE * gain)
    nuisance = smooth_patterns(rng, n, image_size)
    nuisance *= NUISANCE_SCALE
    images += nuisance
    images += 0.5 + brightness
    images *= 255
    np.rint(images, out=images)
    np.clip(images, 0, 255, out=images)
    return images.astype(np.uint8).transpose(0, 2, 3, 1)


def chunk_size(image_size: int) -> int:
    return max(1, CHUNK_PIXELS // (image_size * image_size))


def generate_split(values: dict, split: str, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count, size, seed = values[f"{split}_size"], values["image_size"], values["seed"]
    labels = balanced_labels(count, values["num_classes"], seed, split)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    step = chunk_size(size)
    for index, start in enumerate(range(0, count, step)):
        rng = np.random.default_rng([seed, SPLIT_STREAMS[split], index + 1])
        images[start:start + step] = render_chunk(prototypes, labels[start:start + step], rng, size)
    return images, labels


def class_names(num_classes: int) -> list[str]:
    return [f"class{c}" for c in range(num_classes)]


def load(spec: dict, key: str = "datasets") -> DatasetArrays:
    values = settings(spec, key)
    prototypes = class_prototypes(values["num_classes"], values["image_size"], values["seed"])
    train_images, train_labels = generate_split(values, "train", prototypes)
    test_images, test_labels = generate_split(values, "test", prototypes)
    return DatasetArrays(train_images, train_labels, test_images, test_labels, class_names(values["num_classes"]))


def describe(spec: dict, key: str = "datasets") -> dict:
    values = settings(spec, key)
    counts = np.bincount(np.arange(values["train_size"]) % values["num_classes"], minlength=values["num_classes"])
    return {"classes": class_names(values["num_classes"]), "train_counts": counts.tolist()}
