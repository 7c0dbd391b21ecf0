"""SimCLR (Chen et al., 2020) as GSSD trains its feature extractor, run by the one trainer.

Every step augments each image of the batch twice (:func:`simclr_view`: random resized crop,
left-right flip, colour jitter applied with a probability, random grayscale — the official GSSD
pipeline, which leaves out SimCLR's Gaussian blur), passes both views through the backbone and a
projection head (:class:`SimCLRNet`) and minimizes NT-Xent (:func:`nt_xent`) over the 2B views:
each view must pick its partner out of the other 2B − 1 by cosine similarity / temperature. Each
view goes through the network on its own, so BatchNorm normalizes each view's batch separately,
as in the official code. Every random draw comes from the trainer's seeded generator, so a killed
job resumes to the same weights.

The features GSSD and DBD use are the backbone's pooled output (512-d for ResNet-18), computed
without augmentation with the network in eval mode (:func:`backbone_encoder`,
:func:`poisonflow.embeddings.embed_images`). Settings: the ``simclrFeatures`` block of the
config schema (:data:`DEFAULTS`).

Official code: ivansabolic/GSSD (``train_simclr.py``, ``simclr/``; after Spijkervet/SimCLR):
Adam, lr 3e-4 and no weight decay, no learning-rate schedule; a projection MLP
Linear(d, d) → ReLU → Linear(d, 128), without biases; NT-Xent at temperature 0.5 summed over the
2B views and divided by 2B; batch 256, 100 epochs; inputs normalized (here by the backbone's own
mean/std, :mod:`poisonflow.models`). With ``compile`` the trainer pads a short last batch with
samples from elsewhere in the epoch (:func:`poisonflow.trainer.padded_order`): their views join
that batch's negatives, their own terms are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import augment
from .kinds import definition_defaults
from .models import Classifier, build_model
from .trainer import Objective, StepContext, StepOutput

# A features entry's SimCLR keys with their defaults: the schema's ``$defs/simclrFeatures``.
DEFAULTS: dict = definition_defaults("simclrFeatures")

# The colour jitter's maximum change per adjustment at strength 1 (brightness, contrast,
# saturation, hue): SimCLR's ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s).
JITTER_AT_STRENGTH_ONE = (0.8, 0.8, 0.8, 0.2)


def settings_of(spec: dict) -> dict:
    """A features entry with :data:`DEFAULTS` filled in for its missing keys."""
    return {**DEFAULTS, **spec}


# -- the views -------------------------------------------------------------------------------

def view_settings(spec: dict) -> dict:
    """The keys of a features entry that shape its views (they join the checkpoint digest)."""
    settings = settings_of(spec)
    return {key: settings[key] for key in ("crop_scale", "crop_ratio", "flip_prob", "jitter_strength",
                                           "jitter_prob", "grayscale_prob")}


def simclr_view(x: torch.Tensor, views: dict, generator: torch.Generator) -> torch.Tensor:
    """One augmented view of every image of the batch (B, 3, H, W), parameters drawn per image from
    ``generator``, in the official order: crop, flip, colour jitter, grayscale."""
    strength = float(views["jitter_strength"])
    brightness, contrast, saturation, hue = (strength * m for m in JITTER_AT_STRENGTH_ONE)
    x = augment.random_resized_crop(x, views["crop_scale"], views["crop_ratio"], generator)
    x = augment.random_flip(x, generator, float(views["flip_prob"]))
    x = augment.color_jitter(x, brightness, contrast, saturation, hue, float(views["jitter_prob"]), generator)
    return augment.random_grayscale(x, float(views["grayscale_prob"]), generator)


def two_views(x: torch.Tensor, views: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent views of the batch (the first drawn first)."""
    first = simclr_view(x, views, generator)
    return first, simclr_view(x, views, generator)


# -- the loss --------------------------------------------------------------------------------

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent per image (B,) for projections ``z1``, ``z2`` (B, P) of two views of the same B images.

    With z the 2B unit-normalized projections and s(a, b) = z_a·z_b / temperature, view a with
    partner p(a) has ℓ_a = −log(exp s(a, p(a)) / Σ_{k≠a} exp s(a, k)); image i's term is the mean of
    its two views' (ℓ_i + ℓ_{B+i}) / 2, so the batch mean is SimCLR's loss (Σ_a ℓ_a / 2B).
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    similarity = z @ z.T / float(temperature)
    self_pairs = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_pairs, float("-inf"))  # a view is not its own candidate
    partners = (torch.arange(2 * b, device=z.device) + b) % (2 * b)  # view a's partner: a ± B
    per_view = F.cross_entropy(similarity, partners, reduction="none")
    return (per_view[:b] + per_view[b:]) / 2


# -- the network -----------------------------------------------------------------------------

class SimCLRNet(nn.Module):
    """A backbone (:class:`poisonflow.models.Classifier`, its ``fc`` unused) and the projection head:
    images in [0, 1] → (B, projection_dim) projections of the pooled features."""

    def __init__(self, backbone: Classifier, projection_dim: int):
        super().__init__()
        channels = backbone.fc.in_features
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(channels, channels, bias=False), nn.ReLU(inplace=True),
                                       nn.Linear(channels, projection_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone.features(x))


def build_simclr(model: dict, num_classes: int, image_size: int, projection_dim: int, seed: int) -> SimCLRNet:
    """A fresh :class:`SimCLRNet` whose initial weights depend on ``seed`` alone. The backbone is the
    ``models:`` entry ``model`` with a ``num_classes`` head, left as initialized (DBD trains its own)."""
    backbone = build_model(model, num_classes, image_size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SimCLRNet(backbone, int(projection_dim))


def backbone_encoder(backbone: Classifier):
    """The feature encoder of a trained backbone: eval mode (BatchNorm's running statistics), no
    augmentation, pooled features."""
    backbone.eval()
    return backbone.features


# -- the objective and the trainings entry ---------------------------------------------------

def simclr_objective(spec: dict) -> Objective:
    """NT-Xent over two views of each batch image, the views drawn from the trainer's generator."""
    views = view_settings(spec)
    temperature = float(settings_of(spec)["temperature"])

    def loss(net: nn.Module, batch: augment.MixedBatch, ctx: StepContext) -> StepOutput:
        first, second = two_views(batch.images, views, ctx.generator)
        with ctx.autocast():
            z1, z2 = net(first), net(second)
        return StepOutput(nt_xent(z1, z2, temperature))

    return Objective(loss, ["nt_xent", temperature, views])


def simclr_training(spec: dict) -> dict:
    """The ``trainings:``-style entry :func:`poisonflow.trainer.train_model` runs for a features entry:
    its epochs, batch size and optimizer, a constant learning rate, and no trainer augmentation
    (the objective makes the views)."""
    settings = settings_of(spec)
    return {"epochs": int(settings["epochs"]), "batch_size": int(settings["batch_size"]),
            "optimizer": dict(settings["optimizer"]), "schedule": {"name": "constant"}, "augment": [],
            "label_smoothing": 0.0, "adversarial": None}
