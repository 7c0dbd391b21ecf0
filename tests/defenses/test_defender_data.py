"""A defense gets a defender's data: the released training set, the reserve, the victim. Nothing
from which the ground truth (which training samples are poisoned) follows."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from poisonflow import config
from poisonflow.defenses import DefenseContext
from poisonflow.stages.data import reserve_mask, write_stream
from poisonflow.stages.defense import defender_context
from poisonflow.stages.poison import poison
from poisonflow.attacks import PoisonContext
from poisonflow.data import SOURCES
from poisonflow.data.streaming import from_arrays
from poisonflow.store import read_store, write_store

GROUND_TRUTH = ("train/poisoned", "train/true_labels", "train/noise_mode")


def image_keys(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(image.tobytes()).digest() for image in images}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A clean digits store with its reserve, and a BadNets store poisoned from it (dirty, 20%)."""
    root = tmp_path_factory.mktemp("stores")
    spec = {"source": "digits", "image_size": 16, "reserve": 0.1, "split_seed": 0}
    write_stream(root / "clean.zarr", from_arrays(SOURCES.get("digits").load(spec)), {"source": "digits"},
                 reserve=0.1, seed=0, progress=False)
    clean = read_store(root / "clean.zarr")
    attack = {"kind": "badnets", "target": 0, "label_mode": "dirty", "rate": 0.2, "selection": "random",
              "trigger": {"pattern": "checkerboard", "size": 3, "position": "bottom-right", "margin": 0}}
    images, labels = clean["train/images"], clean["train/labels"]
    arrays = poison(attack, 0, images, labels, clean["test/images"], clean["test/labels"], 10,
                    context=PoisonContext(images, labels, list(clean.attrs["classes"])))
    write_store(root / "poison.zarr", arrays, {"classes": list(clean.attrs["classes"])})
    return clean, read_store(root / "poison.zarr")


def test_reserve_is_stratified_seeded_and_disjoint_from_the_released_set(stores):
    clean, _ = stores
    labels = np.concatenate([clean["train/labels"], clean["reserve/labels"]])
    assert len(clean["reserve/labels"]) == sum(config.reserve_counts(np.bincount(labels).tolist(), 0.1))
    np.testing.assert_array_equal(np.bincount(clean["reserve/labels"], minlength=10),
                                  config.reserve_counts(np.bincount(labels).tolist(), 0.1))
    assert len(labels) == len(SOURCES.get("digits").load({"source": "digits", "image_size": 16}).train_labels)
    mask = reserve_mask(np.repeat(np.arange(3), 20), 0.25, seed=4)
    assert mask.sum() == 15 and np.array_equal(mask, reserve_mask(np.repeat(np.arange(3), 20), 0.25, seed=4))
    assert not np.array_equal(mask, reserve_mask(np.repeat(np.arange(3), 20), 0.25, seed=5))


def context_arrays(context: DefenseContext) -> dict[str, np.ndarray]:
    return {field.name: np.asarray(getattr(context, field.name)) for field in dataclasses.fields(context)
            if isinstance(getattr(context, field.name), np.ndarray)}


def test_ground_truth_cannot_be_reconstructed_from_what_a_defense_receives(stores):
    clean, poisoned = stores
    context = defender_context(clean, poisoned, training={}, build_model=None, victim=None, seed=0,
                               device="cpu", workdir=None)
    arrays = context_arrays(context)
    assert set(arrays) == {"train_images", "train_labels", "reserve_images", "reserve_labels"}
    truth = poisoned["train/poisoned"]
    # The attack that the old context allowed: a training image with no identical clean twin among
    # the other arrays handed over is a poisoned one. With the reserve instead of the clean
    # training set, no training image has a twin, and the guess is no better than chance.
    others = image_keys(arrays["reserve_images"])
    guess = np.array([hashlib.sha1(image.tobytes()).digest() not in others for image in arrays["train_images"]])
    balanced_accuracy = (guess[truth].mean() + (~guess[~truth]).mean()) / 2
    assert balanced_accuracy == pytest.approx(0.5, abs=0.02)
    # Against the clean training set (what defenses used to get) the same guess is exact.
    old = image_keys(clean["train/images"])
    old_guess = np.array([hashlib.sha1(image.tobytes()).digest() not in old for image in arrays["train_images"]])
    assert np.array_equal(old_guess, truth)
    for name in GROUND_TRUTH:
        assert not any(np.array_equal(value, poisoned[name]) for value in arrays.values() if value.shape == truth.shape)

