"""GSSD's adaptive attack (appendix I): a blend trigger made to fool a self-supervised model.

The attacker knows the defense looks at self-supervised embeddings, so it trains its own SimCLR
model f on the clean training set and optimises a full-size pattern τ ∈ [0, 1]^(H×W×3) so that
the triggered images t_τ(x) = (1 − b)·x + b·τ embed where the clean target class does (Eq. I.2):

    min_τ Σ_{x ∈ D_p} d(z̄_target, f(t_τ(x))),  z̄_target = mean of f(x) over clean target-class x,

with Adam (lr 0.1), b = 0.2, D_p 10% of the training set. Then it poisons like Blended with τ at
weight b (dirty label). The trigger stage does this once per dataset and generators entry:

1. SimCLR on the clean training set through the trainer (:mod:`poisonflow.simclr`, the features
   stage's objective and settings), checkpointed in the work folder;
2. z̄_target from the backbone's pooled features (eval mode) of the clean target-class images;
3. τ (initialised as uniform noise from the entry's seed) trained through the trainer as the one
   parameter of :class:`TriggerModel`, whose frozen encoder stays in eval mode; after each step τ
   is clipped to [0, 1] (projected Adam).

Not stated in the appendix, so settings here: the passes over D_p (20), the batch (256), d (the
Euclidean distance; ``distance: cosine`` for 1 − cosine similarity), and D_p drawn at random from
the non-target classes (the trigger is trained once per dataset; each poisoned set then draws its
own poisoned samples at the attack's rate).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import triggers
from ..errors import ConfigError
from ..kinds import settings_for
from ..trainer import Objective, StepContext, StepOutput, train_model
from . import PoisonContext
from .blended import BlendTrigger

DISTANCES = {
    "l2": lambda z, centre: (z - centre).norm(dim=1),
    "cosine": lambda z, centre: 1.0 - F.cosine_similarity(z, centre.expand_as(z), dim=1),
}


class TriggerModel(nn.Module):
    """τ as the one trainable parameter; ``forward(x)`` embeds the triggered images with the frozen
    encoder, which stays in eval mode whatever mode the module is put in."""

    def __init__(self, encoder: nn.Module, pattern: torch.Tensor, blend: float):
        super().__init__()
        self.encoder = encoder
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        self.pattern = nn.Parameter(pattern.clone())
        self.blend = float(blend)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def triggered(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.blend) * x + self.blend * self.pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(self.triggered(x))

    @torch.no_grad()
    def project(self) -> None:
        self.pattern.clamp_(0.0, 1.0)


def distance_objective(centre: torch.Tensor, distance: str) -> Objective:
    def loss(net: nn.Module, batch, ctx: StepContext) -> StepOutput:
        with ctx.autocast():
            z = net(batch.images).float()
        return StepOutput(DISTANCES[distance](z, centre.to(z.device)))

    return Objective(loss, {"ssl_adaptive": distance}, models=())


def simclr_backbone(spec: dict, context) -> nn.Module:
    """The attacker's SimCLR, trained on the clean training set; its backbone in eval mode."""
    from ..simclr import build_simclr, settings_of, simclr_objective, simclr_training

    settings = settings_of(spec["simclr"])
    if not isinstance(settings["model"], dict):
        raise ConfigError(f"{context.key}.simclr.model: give the model inline ({{arch: …, width: …}})")
    size = int(context.train_images.shape[1])
    net = build_simclr(settings["model"], len(context.classes), size, settings["projection_dim"], context.seed)
    result = train_model(net, context.train_images, np.zeros(len(context.train_images), dtype=np.int64),
                         simclr_training(settings), seed=context.seed, device=context.device,
                         checkpoint=context.workdir / "simclr.pt", history=context.workdir / "history-simclr.csv",
                         desc=f"{context.key}: simclr", objective=simclr_objective(settings))
    return result.model.backbone.eval()


@torch.no_grad()
def mean_embedding(backbone: nn.Module, images: np.ndarray, device) -> torch.Tensor:
    from ..embeddings import embed_images

    return torch.from_numpy(embed_images(backbone.features, images, device, desc="target embedding").mean(0))


def poisoned_subset(labels: np.ndarray, target: int, rate: float, seed: int) -> np.ndarray:
    """D_p: int(rate·N) indices drawn at random from the samples not of the target class."""
    candidates = np.flatnonzero(labels != target)
    count = min(len(candidates), max(1, int(rate * len(labels))))
    return np.sort(np.random.default_rng([seed, 11]).choice(candidates, count, replace=False))


def train_generator(spec: dict, context) -> dict[str, torch.Tensor]:
    """Optimise τ (trigger stage)."""
    target = int(spec["target"])
    labels = np.asarray(context.train_labels)
    if target >= len(context.classes):
        raise ConfigError(f"{context.key}.target: class {target} of {len(context.classes)}")
    backbone = simclr_backbone(spec, context)
    centre = mean_embedding(backbone, context.train_images[labels == target], context.device)
    subset = poisoned_subset(labels, target, float(spec["rate"]), context.seed)
    size = int(context.train_images.shape[1])
    start = triggers.noise_pattern(size, triggers.seeded_generator(context.seed))
    model = TriggerModel(backbone, start, float(spec["blend"]))
    training = {"epochs": int(spec["epochs"]), "batch_size": int(spec["batch_size"]),
                "optimizer": {"name": "adam", "lr": float(spec["lr"]), "weight_decay": 0.0},
                "schedule": {"name": "constant"}, "augment": [], "adversarial": None, "amp": False,
                "compile": False, "channels_last": False}
    result = train_model(model, context.train_images, labels, training, seed=context.seed, device=context.device,
                         subset=subset, objective=distance_objective(centre, spec["distance"]),
                         on_batch=lambda end: model.project(), checkpoint=context.workdir / "pattern.pt",
                         history=context.workdir / "history-pattern.csv", desc=f"{context.key}: pattern")
    pattern = result.model.pattern.detach().cpu().clamp(0.0, 1.0)
    return {"pattern": pattern, "blend": torch.tensor(float(spec["blend"])), "target": torch.tensor(target),
            "distance_first": torch.tensor(float(result.history[0]["loss"])),
            "distance_last": torch.tensor(float(result.history[-1]["loss"]))}


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> BlendTrigger:
    """Blended's trigger with the optimised pattern at weight b."""
    settings = settings_for(__name__, spec)
    generator = getattr(context, "generator", None)
    if not generator:
        raise ConfigError("generator: an ssl-adaptive attack blends a pattern optimised by the trigger stage; name a "
                          "generators entry of kind ssl-adaptive")
    if generator["pattern"].shape[-1] != image_size:
        raise ValueError(f"ssl-adaptive: the pattern was optimised on {generator['pattern'].shape[-1]}-px images, "
                         f"not {image_size}")
    target = settings.get("target")
    if isinstance(target, int) and target != int(generator["target"]):
        raise ConfigError(f"target: {target}, but the generator pulled the pattern to class {int(generator['target'])}")
    return BlendTrigger(generator["pattern"], float(generator["blend"]), image_size)
