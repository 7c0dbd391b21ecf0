"""Learning curves of a victim's training (A-ABL Fig. 8), or of a defense's final training (Fig. 10:
adversarial training; the defenses that train a final model from the released set pass the stage's
observer to the trainer: ``adv-train``, ``split-train``, A-ABL's stage 3): after every epoch, the
accuracy on a fixed sample of benign and of poisoned training samples, on the images as released and
on their iFGSM adversarial examples.

Set ``evaluation.curves`` (null by default: nothing is recorded) to ``{eps, steps, samples}``; the
victim stage (and the defense stage) then writes ``curves.csv`` next to ``model.pt``: one row per epoch with
``benign_nat``, ``benign_adv``, ``poisoned_nat``, ``poisoned_adv`` (fractions). Accuracy is measured
against the released labels (a poisoned sample counts as correct when it is predicted as the
target: the backdoor being learned), with the model in eval mode; the adversarial examples come from
iFGSM of ``steps`` steps of ε/steps from the image (A-ABL: ε 2/255, 5 steps, the split's
perturbation). The samples are drawn once, seeded, from each group: ``samples`` benign ones and up
to ``samples`` poisoned ones. Which samples are poisoned is ground truth: this is an analysis of the
attack's training, not a defense. A killed and resumed training keeps the rows already written; a
row of an epoch whose checkpoint was written but whose row was not (a kill between the two) stays
missing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

COLUMNS = ("epoch", "benign_nat", "benign_adv", "poisoned_nat", "poisoned_adv")


def curve_samples(poisoned: np.ndarray, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Sorted indices of at most ``samples`` benign and ``samples`` poisoned training samples."""
    rng = np.random.default_rng([seed, 8])
    poisoned = np.asarray(poisoned, dtype=bool)
    groups = {}
    for name, pool in (("benign", np.flatnonzero(~poisoned)), ("poisoned", np.flatnonzero(poisoned))):
        groups[name] = np.sort(rng.choice(pool, size=min(samples, len(pool)), replace=False))
    return groups


def accuracies(model, images: np.ndarray, labels: np.ndarray, eps: float, steps: int, device) -> tuple[float, float]:
    """(accuracy on the images, accuracy on their iFGSM examples) against ``labels``; NaN without images."""
    from .evaluate import predictions_under

    if not len(labels):
        return float("nan"), float("nan")
    natural = predictions_under(model, images, labels, 0.0, 0, None, device)
    adversarial = predictions_under(model, images, labels, eps, steps, None, device)
    return float(np.mean(natural == labels)), float(np.mean(adversarial == labels))


class CurveRecorder:
    """An ``on_epoch`` callback of the trainer that appends the epoch's row to ``path``."""

    def __init__(self, path: Path, images: np.ndarray, labels: np.ndarray, poisoned: np.ndarray, settings: dict,
                 seed: int, device):
        self.path = Path(path)
        self.groups = curve_samples(poisoned, int(settings["samples"]), seed)
        self.images, self.labels = images, np.asarray(labels)
        self.eps, self.steps = float(settings["eps"]), int(settings["steps"])
        self.device = device
        self.rows = read_curves(self.path)

    def __call__(self, end) -> None:
        was_training = end.model.training
        row: dict = {"epoch": end.epoch}
        for name, index in self.groups.items():
            row[f"{name}_nat"], row[f"{name}_adv"] = accuracies(
                end.model, self.images[index], self.labels[index], self.eps, self.steps, self.device)
        end.model.train(was_training)
        self.rows = [r for r in self.rows if int(r["epoch"]) < end.epoch] + [row]
        write_curves(self.path, self.rows)


def read_curves(path: Path) -> list[dict]:
    """The rows of a curves.csv (none when it does not exist)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def write_curves(path: Path, rows: list[dict]) -> None:
    from .trainer import write_history

    write_history(Path(path), rows, COLUMNS)
