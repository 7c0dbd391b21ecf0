"""Predictions and the metrics of metrics.json (fractions in [0, 1])."""

from __future__ import annotations

import numpy as np
import torch

from .adversarial import pgd
from .trainer import images_to_tensor, to_float


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, device="cpu", batch_size: int = 512) -> np.ndarray:
    """Class predictions for uint8 NHWC ``images``."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images_to_tensor(images[start:start + batch_size], device))
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def pgd_accuracy(model, images: np.ndarray, labels: np.ndarray, eps: float, step: float, steps: int,
                 device="cpu", batch_size: int = 256, seed: int = 0) -> float:
    """Accuracy under an untargeted ℓ∞ PGD attack with a random start."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, len(images), batch_size):
        x = to_float(images_to_tensor(images[start:start + batch_size], device))
        y = torch.as_tensor(labels[start:start + batch_size], dtype=torch.long, device=device)
        x_adv = pgd(model, x, y, eps, step, steps, generator=generator)
        with torch.no_grad():
            hits += int((model(x_adv).argmax(1) == y).sum())
    return hits / max(1, len(images))


def backdoor_metrics(model, test_images, test_labels, asr_images=None, asr_labels=None, asr_true_labels=None,
                     device="cpu", pgd_spec: dict | None = None) -> dict:
    """``acc`` on the clean test set; ``asr``/``ra`` on the triggered set; ``pgd_acc`` if ``pgd_spec``."""
    metrics = {"acc": float(np.mean(predict(model, test_images, device) == test_labels))}
    if asr_images is not None and len(asr_images):
        predictions = predict(model, asr_images, device)
        metrics["asr"] = float(np.mean(predictions == asr_labels))
        metrics["ra"] = float(np.mean(predictions == asr_true_labels))
    if pgd_spec:
        metrics["pgd_acc"] = pgd_accuracy(model, test_images, test_labels, float(pgd_spec["eps"]),
                                          float(pgd_spec["step"]), int(pgd_spec["steps"]), device)
    return metrics


def evaluate_store_model(model, clean, poisoned, evaluation: dict, device) -> dict:
    """:func:`backdoor_metrics` of a model on stores: ``acc`` on the clean store's test split;
    ``asr``/``ra`` on the poisoned store's triggered test split if it has one (unlearnable
    examples have none); ``pgd_acc`` if the resolved ``evaluation`` section has ``pgd``."""
    asr_set = ("test/images" in poisoned) and len(poisoned["test/labels"]) > 0
    return backdoor_metrics(
        model, clean["test/images"], clean["test/labels"],
        poisoned["test/images"] if asr_set else None,
        poisoned["test/labels"] if asr_set else None,
        poisoned["test/true_labels"] if asr_set else None,
        device=device, pgd_spec=evaluation.get("pgd"))
