"""Selection, poisoning budget and the poisoned store's arrays on hand-made data."""

from __future__ import annotations

import numpy as np
import pytest

from poisonflow.config import poison_budget
from poisonflow.errors import ConfigError
from poisonflow.selection import select
from poisonflow.stages.poison import poison

LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
SCORES = {"loss": np.array([0.1, 0.9, 0.5, 0.7, 5.0, 0.2, 0.3, 0.4, 3.0, 0.0]),
          "gradnorm": np.zeros(10), "forgetting": np.array([0, 3, 3, 1, 9, 0, 0, 0, 0, 0])}


def attack(**kw):
    base = {"kind": "badnets", "target": 0, "label_mode": "dirty", "rate": 0.1, "selection": "random",
            "trigger": {"pattern": "white", "size": 2, "position": "bottom-right", "margin": 0}}
    base.update(kw)
    return base


def test_budget_dirty_is_fraction_of_all_clean_is_fraction_of_target():
    counts = [4, 3, 3]
    assert poison_budget(attack(rate=0.2), counts) == (6, 2)
    assert poison_budget(attack(label_mode="clean", rate=0.5), counts) == (4, 2)


def test_poisons_from_all_classes_may_be_target_class_samples():
    counts = [4, 3, 3]
    assert poison_budget(attack(rate=0.2, poison_from="all"), counts) == (10, 2)
    assert select(LABELS, attack(selection="loss", poison_from="all"), 2, seed=0, scores=SCORES).tolist() == [4, 8]
    assert select(LABELS, attack(selection="loss", poison_from="all"), 3, seed=0, scores=SCORES).tolist() == [1, 4, 8]
    drawn = set()
    for seed in range(30):
        picks = select(LABELS, attack(poison_from="all"), 3, seed=seed)
        drawn |= set(picks.tolist())
        np.testing.assert_array_equal(picks, select(LABELS, attack(poison_from="all"), 3, seed=seed))
    assert drawn == set(range(10))  # every class, the target's included
    assert set(select(LABELS, attack(poison_from="others"), 6, seed=0)) == {4, 5, 6, 7, 8, 9}


def test_hardest_selection_takes_top_scores_in_the_candidate_pool():
    clean = attack(label_mode="clean", selection="loss")
    assert select(LABELS, clean, 2, seed=0, scores=SCORES).tolist() == [1, 3]
    dirty = attack(selection="loss")
    assert select(LABELS, dirty, 2, seed=0, scores=SCORES).tolist() == [4, 8]  # never target-class samples


def test_ties_are_broken_by_the_seed_not_by_index():
    clean = attack(label_mode="clean", selection="forgetting")
    picks = {tuple(select(LABELS, clean, 1, seed=s, scores=SCORES)) for s in range(20)}
    assert picks == {(1,), (2,)}  # both samples with 3 forgetting events are chosen by some seed


def test_random_selection_is_seeded_and_within_pool():
    a = select(LABELS, attack(), 3, seed=1)
    assert np.array_equal(a, select(LABELS, attack(), 3, seed=1))
    assert set(a) <= {4, 5, 6, 7, 8, 9} and len(set(a)) == 3


def test_selection_needs_scores_and_enough_candidates():
    with pytest.raises(ConfigError, match="selection: 'loss' needs the surrogate's scores"):
        select(LABELS, attack(selection="loss"), 1, seed=0)
    with pytest.raises(ConfigError, match="rate: asks for 5 samples but only 4 are eligible"):
        select(LABELS, attack(label_mode="clean"), 5, seed=0)


def images(n, value=100):
    return np.full((n, 6, 6, 3), value, dtype=np.uint8)


def test_poisoned_store_arrays_dirty_label():
    test_labels = np.array([0, 1, 2, 2])
    out = poison(attack(rate=0.2), 0, images(10), LABELS, images(4, 50), test_labels, 3)
    chosen = np.flatnonzero(out["train/poisoned"])
    assert len(chosen) == 2 and np.all(LABELS[chosen] != 0)
    assert np.all(out["train/labels"][chosen] == 0)
    np.testing.assert_array_equal(out["train/true_labels"], LABELS)
    assert np.all(out["train/images"][chosen][:, 4:, 4:] == 255)  # 2×2 white patch bottom-right
    untouched = np.setdiff1d(np.arange(10), chosen)
    assert np.all(out["train/images"][untouched] == 100) and np.all(out["train/labels"][untouched] == LABELS[untouched])
    # ASR set: non-target test images, triggered, labelled with the target
    np.testing.assert_array_equal(out["test/true_labels"], [1, 2, 2])
    np.testing.assert_array_equal(out["test/labels"], [0, 0, 0])
    assert np.all(out["test/images"][:, 4:, 4:] == 255) and np.all(out["test/images"][:, :4, :4] == 50)


def test_clean_label_keeps_labels():
    out = poison(attack(label_mode="clean", rate=0.5), 0, images(10), LABELS, images(4), np.array([0, 1, 2, 2]), 3)
    chosen = np.flatnonzero(out["train/poisoned"])
    assert len(chosen) == 2 and np.all(LABELS[chosen] == 0)
    np.testing.assert_array_equal(out["train/labels"], LABELS)


def test_wanet_adds_noise_mode_samples_with_labels_kept():
    spec = {"kind": "wanet", "target": 0, "label_mode": "dirty", "rate": 0.2, "selection": "random",
            "trigger": {"k": 2, "s": 1.0, "grid_rescale": 1, "noise_ratio": 2}}
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
    out = poison(spec, 0, imgs, LABELS, imgs[:4], np.array([0, 1, 2, 2]), 3)
    noise = out["train/noise_mode"]
    assert noise.sum() == 4 and not np.any(noise & out["train/poisoned"])
    np.testing.assert_array_equal(out["train/labels"][noise], LABELS[noise])
    assert np.any(out["train/images"][noise] != imgs[noise])


def test_target_outside_dataset_is_refused():
    with pytest.raises(ConfigError, match=r"attack\.target: class 3 is outside"):
        poison(attack(target=3), 0, images(10), LABELS, images(4), np.array([0, 1, 2, 2]), 3)


def test_no_poisoning_kind_releases_the_clean_set():
    from poisonflow.attacks import PoisonContext
    from poisonflow.stages.poison import protect

    imgs = images(10)
    out = protect({"kind": "none", "rate": 1.0}, 0, imgs, LABELS, PoisonContext(imgs, LABELS, ["a", "b", "c"]))
    np.testing.assert_array_equal(out["train/images"], imgs)
    np.testing.assert_array_equal(out["train/labels"], LABELS)
    assert not out["train/poisoned"].any() and "test/images" not in out


def test_all_to_all_relabels_each_class_to_the_next_and_scores_every_test_image():
    images = np.full((10, 8, 8, 3), 100, dtype=np.uint8)
    test_labels = np.array([0, 1, 2, 2])
    a2a = attack(target="all-to-all", rate=0.6)
    assert poison_budget(a2a, [4, 3, 3]) == (10, 6)
    arrays = poison(a2a, 0, images, LABELS, np.full((4, 8, 8, 3), 100, np.uint8), test_labels, num_classes=3)
    poisoned = arrays["train/poisoned"]
    assert poisoned.sum() == 6 and len(set(LABELS[poisoned])) > 1  # drawn from every class, the target's too
    np.testing.assert_array_equal(arrays["train/labels"][poisoned], (LABELS[poisoned] + 1) % 3)
    np.testing.assert_array_equal(arrays["train/labels"][~poisoned], LABELS[~poisoned])
    np.testing.assert_array_equal(arrays["test/labels"], [1, 2, 0, 0])  # every test image, sent to y + 1
    np.testing.assert_array_equal(arrays["test/true_labels"], test_labels)


def test_all_to_all_is_dirty_label_only():
    from poisonflow import config

    raw = {"datasets": {"d": {"source": "digits"}}, "models": {"m": {"arch": "convnet"}},
           "trainings": {"t": {"model": "m"}},
           "attacks": {"a": {"kind": "badnets", "target": "all-to-all", "label_mode": "clean"}},
           "defenses": {"n": {"kind": "none"}},
           "experiments": [{"dataset": ["d"], "attack": ["a"], "training": ["t"], "defense": ["n"], "seed": [0]}]}
    with pytest.raises(ConfigError, match=r"^attacks\.a\.target: all-to-all relabels every class"):
        config.load(raw)
    raw["attacks"]["a"]["label_mode"] = "dirty"
    assert config.load(raw).attack("a")["target"] == "all-to-all"
    raw["attacks"]["a"]["target"] = "some"
    with pytest.raises(ConfigError, match=r"^attacks\.a\.target"):
        config.load(raw)
