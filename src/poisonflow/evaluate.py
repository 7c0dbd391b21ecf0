"""Predictions and the metrics of metrics.json (fractions in [0, 1]).

On a GPU nothing here waits for the device per batch: the uint8 images go over a chunk of whole
batches at a time (:data:`CHUNK_IMAGES`, :data:`CHUNK_BYTES`), predictions and hit counts stay on
the device, and each function reads its result once. ``amp`` runs the forward passes (and PGD's)
under bf16 autocast: ``auto`` means on for CUDA with bf16 support, as the trainer's ``amp: auto``;
pass the training's ``amp`` setting to evaluate a model the way it was trained. On the CPU ``auto``
is off, and the results are those of a plain fp32 loop, bit for bit.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .adversarial import ifgsm, pgd
from .trainer import autocast, images_to_tensor, switch, to_float

# Host images sent to the device per copy: at most this many, and at most this many bytes
# (rounded down to whole batches, at least one batch).
CHUNK_IMAGES = 16384
CHUNK_BYTES = 256 * 2**20


def use_amp(amp, device: torch.device) -> bool:
    """``amp`` (true, false or auto) resolved for ``device``, as the trainer resolves it."""
    return switch(amp, "amp", device.type == "cuda" and torch.cuda.is_bf16_supported())


def device_batches(images, device: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, C, H, W) batches of uint8 NHWC ``images`` (an array or a zarr array) on ``device``,
    copied a chunk of whole batches at a time."""
    image_bytes = max(1, int(np.prod(images.shape[1:])) * np.dtype(images.dtype).itemsize)
    chunk = batch_size * max(1, min(CHUNK_IMAGES, CHUNK_BYTES // image_bytes) // batch_size)
    for chunk_start in range(0, images.shape[0], chunk):
        on_device = images_to_tensor(np.asarray(images[chunk_start:chunk_start + chunk]), device)
        for start in range(0, len(on_device), batch_size):
            yield on_device[start:start + batch_size]


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, device="cpu", batch_size: int = 512,
            amp="auto") -> np.ndarray:
    """Class predictions for uint8 NHWC ``images``."""
    device = torch.device(device)
    model.eval()
    out = []
    with autocast(device, use_amp(amp, device)):
        for batch in device_batches(images, device, batch_size):
            out.append(model(to_float(batch)).argmax(1))
    return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.int64)


def pgd_accuracy(model, images: np.ndarray, labels: np.ndarray, eps: float, step: float, steps: int,
                 device="cpu", batch_size: int = 256, seed: int = 0, amp="auto") -> float:
    """Accuracy under an untargeted ℓ∞ PGD attack with a random start (drawn on the device,
    :mod:`poisonflow.adversarial`)."""
    device = torch.device(device)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(device)
    hits = torch.zeros((), dtype=torch.long, device=device)
    with autocast(device, use_amp(amp, device)):
        for start, batch in zip(range(0, len(targets), batch_size), device_batches(images, device, batch_size)):
            y = targets[start:start + batch_size]
            x_adv = pgd(model, to_float(batch), y, eps, step, steps, generator=generator)
            with torch.no_grad():
                hits += (model(x_adv).argmax(1) == y).sum()
    return int(hits) / max(1, len(targets))


def backdoor_metrics(model, test_images, test_labels, asr_images=None, asr_labels=None, asr_true_labels=None,
                     device="cpu", pgd_spec: dict | None = None, amp="auto") -> dict:
    """``acc`` on the clean test set; ``asr``/``ra`` on the triggered set; ``pgd_acc`` if ``pgd_spec``.
    ``amp``: bf16 autocast (true, false, auto; see the module notes)."""
    metrics = {"acc": float(np.mean(predict(model, test_images, device, amp=amp) == test_labels))}
    if asr_images is not None and len(asr_images):
        predictions = predict(model, asr_images, device, amp=amp)
        metrics["asr"] = float(np.mean(predictions == asr_labels))
        metrics["ra"] = float(np.mean(predictions == asr_true_labels))
    if pgd_spec:
        metrics["pgd_acc"] = pgd_accuracy(model, test_images, test_labels, float(pgd_spec["eps"]),
                                          float(pgd_spec["step"]), int(pgd_spec["steps"]), device, amp=amp)
    return metrics


def evaluate_store_model(model, clean, poisoned, evaluation: dict, device, amp="auto") -> dict:
    """:func:`backdoor_metrics` of a model on stores: ``acc`` on the clean store's test split;
    ``asr``/``ra`` on the poisoned store's triggered test split if it has one (unlearnable
    examples have none); ``pgd_acc`` if the resolved ``evaluation`` section has ``pgd``.
    ``amp``: pass the training entry's ``amp`` (default ``auto``: bf16 on CUDA)."""
    asr_set = ("test/images" in poisoned) and len(poisoned["test/labels"]) > 0
    return backdoor_metrics(
        model, clean["test/images"], clean["test/labels"],
        poisoned["test/images"] if asr_set else None,
        poisoned["test/labels"] if asr_set else None,
        poisoned["test/true_labels"] if asr_set else None,
        device=device, pgd_spec=evaluation.get("pgd"), amp=amp)


def predictions_under(model, images: np.ndarray, labels: np.ndarray, eps: float, steps: int, step: float | None,
                      device, batch_size: int = 256) -> np.ndarray:
    """Predictions on iFGSM examples of uint8 NHWC ``images`` that raise the cross entropy of
    ``labels`` (ε and the step in [0, 1] units; no perturbation when ε or steps is 0)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images_to_tensor(images[start:start + batch_size], device))
        if eps > 0 and steps > 0:
            y = torch.as_tensor(np.asarray(labels[start:start + batch_size]), dtype=torch.long, device=device)
            x = ifgsm(model, x, y, eps, steps, step)
        with torch.no_grad():
            out.append(model(x).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
