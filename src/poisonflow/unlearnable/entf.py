"""EntF: entangled features (Wen, Zhao, Liu, Backes, Wang and Zhang, "Is Adversarial Training
Really a Silver Bullet for Mitigating Data Poisoning?", ICLR 2023).

Poisons aimed at adversarially trained victims: the perturbations entangle the classes in the
feature space of an adversarially trained reference model, so the robust features a victim
could learn no longer separate the classes. With the reference model's penultimate features
g(·) and the class centroids μ_k = mean of g(x) over the clean training images of class k:

- ``pull`` (default): lower ‖g(t(x + δ)) − μ_c‖², where c is the centroid of another class
  nearest to the current features (chosen anew at every step);
- ``push``: raise ‖g(t(x + δ)) − μ_y‖², away from the sample's own centroid.

δ starts at ε·N(0, 1) clipped to [−ε, ε] and takes ``steps`` ℓ∞ sign-gradient steps, each through
a fresh random crop/flip t (differentiable augmentation).

The reference model is the entry's ``surrogate:`` (eval mode); the paper's is a ResNet-18
adversarially trained with PGD at ε = 4/255, so configure that surrogate's training with
``adversarial: {eps: 0.0157, step: 0.0039, steps: 10}``: a standard surrogate still runs (with a
warning), but is not the method. Faithful simplifications: the centroids are computed once from
the clean training set (``context.train_images``; the protected images when it is absent), and the
augmentation during crafting is this package's crop/flip.

Keys (defaults in ``entf.yaml`` beside this module, the paper's CIFAR-10 settings): ``variant`` pull | push,
``eps`` 8/255, ``step`` 0.4/255 (ε/20), ``steps`` 300, ``augment`` [crop, flip], ``crop_padding`` 4,
``batch_size`` 512. On a CPU, 30–50 ``steps`` with ``step`` ≈ ε/8.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ..kinds import settings_for
from .common import (add_perturbation, augmentation, batch_slices, class_count, images_to_float, model_device,
                     normal_start, require_surrogate, seeded_generator, sign_gradient_steps)
from ..errors import ConfigError


@torch.no_grad()
def class_centroids(model, images: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int,
                    device) -> torch.Tensor:
    """(K, D) mean penultimate features of each class's images (eval mode; a class without images: NaN)."""
    model.eval()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    sums, counts = None, torch.zeros(num_classes, device=device)
    for part in batch_slices(len(y), batch_size):
        features = model.features(images_to_float(images[part], device))
        sums = torch.zeros(num_classes, features.shape[1], device=device) if sums is None else sums
        sums.index_add_(0, y[part], features)
        counts += torch.bincount(y[part], minlength=num_classes).float()
    return sums / counts.unsqueeze(1)


def squared_distances(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, K) squared Euclidean distances from each feature vector to each centroid."""
    return (features.unsqueeze(1) - centroids.unsqueeze(0)).pow(2).sum(-1)


def nearest_other_centroid(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the closest centroid of a class other than the sample's own (classes without images skipped)."""
    distances = squared_distances(features.detach(), centroids)
    distances = torch.nan_to_num(distances, nan=float("inf"))
    distances.scatter_(1, labels.unsqueeze(1), float("inf"))
    return distances.argmin(1)


def pull_loss(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Σ ‖g − μ_c‖² to the nearest other class's centroid (lowered)."""
    targets = centroids[nearest_other_centroid(features, labels, centroids)]
    return (features - targets).pow(2).sum()


def push_loss(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """−Σ ‖g − μ_y‖² from the sample's own centroid (lowered, so the distance grows)."""
    return -(features - centroids[labels]).pow(2).sum()


VARIANTS = {"pull": pull_loss, "push": push_loss}


def feature_objective(model, labels: torch.Tensor, centroids: torch.Tensor, loss, transform):
    def objective(z: torch.Tensor) -> torch.Tensor:
        return loss(model.features(transform(z) if transform else z), labels, centroids)
    return objective


def entangling_noise(model, images: np.ndarray, labels: np.ndarray, centroids: torch.Tensor, settings: dict,
                     seed: int, device) -> torch.Tensor:
    """δ for every image: sign-gradient descent on the variant's feature loss."""
    if settings["variant"] not in VARIANTS:
        raise ConfigError(f"entf.variant: unknown variant '{settings['variant']}' (known: {', '.join(VARIANTS)})")
    model.eval()
    generator = seeded_generator(seed)
    transform = augmentation(settings["augment"], settings["crop_padding"], generator)
    x = images_to_float(images, device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    delta = torch.empty_like(x)
    for part in batch_slices(len(y), settings["batch_size"]):
        objective = feature_objective(model, y[part], centroids, VARIANTS[settings["variant"]], transform)
        delta[part] = sign_gradient_steps(x[part], normal_start(x[part], settings["eps"], generator), objective,
                                          settings["eps"], settings["step"], settings["steps"], ascend=False)
    return delta


def warn_if_standard_surrogate(spec: dict) -> None:
    training = (spec.get("surrogate_entry") or {}).get("training") or {}
    if "adversarial" in training and not training["adversarial"]:
        print(f"entf: surrogate '{spec.get('surrogate')}' is not adversarially trained; EntF is defined on an "
              f"adversarially trained reference model (set its training's `adversarial:`)", file=sys.stderr)


def protect(spec: dict, images: np.ndarray, labels: np.ndarray, context, seed: int) -> np.ndarray:
    settings = settings_for(__name__, spec)
    model = require_surrogate(context, "entf")
    warn_if_standard_surrogate(spec)
    device = model_device(model, context)
    num_classes = class_count(labels, context)
    clean_images = getattr(context, "train_images", None)
    clean_labels = getattr(context, "train_labels", None)
    if clean_images is None:
        clean_images, clean_labels = images, labels
    centroids = class_centroids(model, clean_images, clean_labels, num_classes, settings["batch_size"], device)
    return add_perturbation(images, entangling_noise(model, images, labels, centroids, settings, seed, device))
