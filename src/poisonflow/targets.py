"""Whom a backdoor relabels to what: all-to-one (``target: <class>``) or all-to-all
(``target: all-to-all``: every class y to (y + 1) mod C). Pure numpy, no torch: the config check
uses it when the workflow is parsed.

- poisoned samples are drawn from :func:`candidates`: the target class (clean-label), the other
  classes (dirty-label, all-to-one; every class with ``poison_from: all``) or every class
  (all-to-all, dirty-label only);
- :func:`relabel` gives their released labels;
- the ASR set (:func:`asr_set`) is the test images that are not already of their backdoor label,
  each labelled with the class the backdoor should send it to: the target (all-to-one), or
  (y + 1) mod C (all-to-all); ASR is the fraction predicted as that label.
"""

from __future__ import annotations

import numpy as np

ALL_TO_ALL = "all-to-all"


def all_to_all(attack: dict) -> bool:
    return attack.get("target") == ALL_TO_ALL


def candidates(labels: np.ndarray, attack: dict) -> np.ndarray:
    """Indices of the training samples an attack may poison."""
    labels = np.asarray(labels)
    if all_to_all(attack):
        return np.arange(len(labels))
    target = int(attack["target"])
    if attack["label_mode"] == "clean":
        return np.flatnonzero(labels == target)
    if attack.get("poison_from", "others") == "all":
        return np.arange(len(labels))
    return np.flatnonzero(labels != target)


def relabel(labels: np.ndarray, attack: dict, num_classes: int) -> np.ndarray:
    """The backdoor label of each sample with these true labels."""
    labels = np.asarray(labels, dtype=np.int64)
    if all_to_all(attack):
        return (labels + 1) % num_classes
    return np.full(len(labels), int(attack["target"]), dtype=np.int64)


def asr_set(test_labels: np.ndarray, attack: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(bool mask of the test samples in the ASR set, their backdoor labels)."""
    test_labels = np.asarray(test_labels, dtype=np.int64)
    wanted = relabel(test_labels, attack, num_classes)
    keep = wanted != test_labels
    return keep, wanted[keep]


def poison_budget(attack: dict, class_counts: list[int]) -> tuple[int, int]:
    """(eligible samples, samples to poison) on a training set with these class counts.

    ``rate`` is a fraction of the whole training set for dirty-label attacks (all-to-one and
    all-to-all) and a fraction of the target class for clean-label ones.
    """
    total = int(sum(class_counts))
    if all_to_all(attack):
        return total, int(round(attack["rate"] * total))
    target = int(attack["target"])
    if attack["label_mode"] == "clean":
        eligible = int(class_counts[target])
        return eligible, int(round(attack["rate"] * eligible))
    if attack.get("poison_from", "others") == "all":
        return total, int(round(attack["rate"] * total))
    return total - int(class_counts[target]), int(round(attack["rate"] * total))
