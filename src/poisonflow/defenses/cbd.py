"""CBD: causality-inspired backdoor defense (Zhang et al., CVPR 2023, "Backdoor Defense via
Deconfounded Representation Learning").

The backdoor acts as a confounder between the input and the label. CBD trains two models of the
victim's architecture on the released training set:

1. **Backdoored model f_B.** A fresh model trained with plain cross entropy for only a few
   epochs (5; SGD lr 0.1, Nesterov momentum 0.9, weight decay 1e-4). Backdoor shortcuts are
   learned first, so this early-stopped model mostly captures the confounding (trigger → target)
   path. It is frozen afterwards.
2. **Clean model f_C.** A second fresh model (100 epochs; SGD lr 0.1, ×0.1 at epochs 20 and 70,
   Nesterov, momentum 0.9, weight decay 1e-4) minimizing, per batch,

       mean_i w_i·ℓ_C,i  +  λ·[ mean_i T(r_i, z_i) − mean_i T(r_i, z_{i+1}) ]

   - the **re-weighting**: w_i = ℓ_B,i / (ℓ_B,i + ℓ_C,i + 1e-8), ℓ_B and ℓ_C the cross entropies
     of f_B and of f_C (detached) on the same batch, rescaled so the batch mean of w is 1. A sample
     f_B fits easily (ℓ_B ≪ ℓ_C: a likely poison) weighs little;
   - the **mutual-information penalty** between f_C's penultimate features z and f_B's r: the
     difference between a critic T's mean score on joint pairs (r_i, z_i) and on pairs from the
     product of marginals, made by pairing r_i with the next sample's z (z rolled by one in the
     batch); λ = 0.01, the factor the official estimator multiplies its output by. T is a
     two-layer MLP on [r, z] (hidden width = feature width, leaky ReLU, dropout 0.2 before each
     layer) trained to *maximize* the same difference on detached features; after each of its steps
     every weight (and bias) tensor is divided by the official "spectral norm" — the square root of
     a 5-step power-iteration estimate (from a ones vector) of its largest singular value, as the
     official helper computes it — a WGAN-style Lipschitz constraint.

``mi_weight: 0`` drops the penalty and the critic: that is the official repository's
out-of-the-box configuration (its ``--disentangle`` flag defaults to 0), re-weighting alone.

Simplifications against the official ``train.py``:

- the critic is trained by the same optimizer as the clean model (the trainer's one optimizer over
  the joint module: SGD lr 0.1 with its schedule, weight decay included), descending on
  −c·difference (``critic.loss_weight`` c = 1) with gradients reaching the critic only, instead of
  its own Adam (lr 0.2, ×0.1 every 20 epochs) on −0.01·difference. Adam ignores the loss scale, SGD
  does not, hence c = 1 rather than 0.01. Critic and clean model take the same step on every batch
  (simultaneous descent–ascent, one forward) instead of a whole epoch of critic steps before each
  clean epoch;
- the MI estimate is the critic difference above (a Wasserstein-style dependence score, not a
  calibrated MI bound), exactly the official form but not a tighter estimator;
- both losses see the same augmented batch (crop/flip per the experiment's recipe); f_B is in eval
  mode. The batch size is the experiment's (official: 64);
- the history's per-epoch loss of the clean stage also carries the critic's own term
  (−c·difference on detached features), so it is not the clean objective alone.

The defense never reads which samples are poisoned. Both stages are checkpointed in the defense's
work directory; a rerun resumes them (a finished stage is not retrained).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import augment
from ..kinds import settings_for
from ..trainer import Objective, StepContext, StepOutput, train_model
from . import DefenseContext, DefenseResult, merge

WEIGHT_EPSILON = 1e-8  # official: loss_bias / (loss_d + loss_bias + 1e-8)
POWER_ITERATIONS = 5  # official spectral_norm(W, n_iteration=5)


# --- the two terms ---------------------------------------------------------------------------------


def sample_weights(loss_backdoor: torch.Tensor, loss_clean: torch.Tensor,
                   epsilon: float = WEIGHT_EPSILON) -> torch.Tensor:
    """w_i = ℓ_B,i / (ℓ_B,i + ℓ_C,i + ε), rescaled to batch mean 1 (both losses taken as constants)."""
    loss_backdoor, loss_clean = loss_backdoor.detach(), loss_clean.detach()
    weights = loss_backdoor / (loss_clean + loss_backdoor + epsilon)
    return weights * weights.shape[0] / weights.sum()


def marginal_pairs(z: torch.Tensor) -> torch.Tensor:
    """z shifted by one sample within the batch (row i gets row i+1, the last the first): paired with
    r it samples the product of the marginals."""
    return torch.roll(z, shifts=-1, dims=0)


class Critic(nn.Module):
    """T(r, z): a two-layer MLP on the concatenated features, dropout before each linear layer."""

    def __init__(self, backdoor_dim: int, clean_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.hidden = nn.Linear(backdoor_dim + clean_dim, clean_dim)
        self.out = nn.Linear(clean_dim, 1)

    def forward(self, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.hidden(self.dropout(torch.cat([r, z], dim=-1))))
        return self.out(self.dropout(h)).squeeze(-1)


def dependence(critic: nn.Module, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per sample: T(r_i, z_i) − T(r_i, z_{i+1}); its batch mean is the official MI estimate (before λ)."""
    return critic(r, z) - critic(r, marginal_pairs(z))


def frozen_dependence(critic: nn.Module, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """:func:`dependence` with the critic's parameters as constants: gradients reach z only."""
    params = {name: p.detach() for name, p in critic.named_parameters()}
    return functional_call(critic, params, (r, z)) - functional_call(critic, params, (r, marginal_pairs(z)))


@torch.no_grad()
def official_spectral_scale(weight: torch.Tensor, iterations: int = POWER_ITERATIONS) -> torch.Tensor:
    """What the official helper divides a critic tensor by: the square root of a power-iteration
    estimate (from a ones vector) of its largest singular value; a bias (o,) counts as (o, 1)."""
    w = weight.unsqueeze(-1) if weight.dim() == 1 else weight
    u = torch.ones(1, w.shape[1], dtype=w.dtype, device=w.device)
    for _ in range(iterations):
        v = u @ w.t()
        v = v / v.norm()
        u = v @ w
        u = u / u.norm()
    return ((u @ w.t()) @ v.t()).sum().sqrt()


class CBDModule(nn.Module):
    """The clean classifier and the MI critic as one module for the trainer.

    ``forward`` gives (logits, penultimate features). The trainer's one optimizer covers both: the
    critic's parameters receive gradient from its own (ascent) term only, the classifier's from the
    weighted cross entropy and the penalty. :meth:`constrain_critic` (after each trainer step)
    applies the official spectral rescaling.
    """

    def __init__(self, classifier: nn.Module, critic: Critic | None):
        super().__init__()
        self.classifier = classifier
        self.critic = critic

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.classifier.features(x)
        return self.classifier.fc(features), features

    @torch.no_grad()
    def constrain_critic(self) -> None:
        if self.critic is None:
            return
        for parameter in self.critic.parameters():
            parameter.div_(official_spectral_scale(parameter))


def clean_objective(backdoored: nn.Module, mi_weight: float, critic_weight: float) -> Objective:
    """Per sample: w_i·ℓ_C,i + λ·d_i(frozen critic) − c·d_i(critic, detached features).

    The last term only trains the critic (its gradient reaches nothing else, and the critic gets
    none from the penalty); the trainer descends on the batch mean: the official clean loss, plus
    the critic's ascent on the dependence score.
    """
    backdoored.eval()
    for parameter in backdoored.parameters():
        parameter.requires_grad_(False)

    def loss(net: nn.Module, batch: augment.MixedBatch, ctx: StepContext) -> StepOutput:
        smoothing = float(ctx.settings["label_smoothing"])
        with ctx.autocast():
            logits, z = net(batch.images)
            with torch.no_grad():
                r = backdoored.features(batch.images)
                loss_backdoor = augment.mixed_cross_entropy(backdoored.fc(r).float(), batch, smoothing)
        logits = logits.float()
        ce = augment.mixed_cross_entropy(logits, batch, smoothing)
        total = sample_weights(loss_backdoor, ce) * ce
        critic = net.critic
        if critic is not None and mi_weight > 0:
            z, r = z.float(), r.float()
            total = total + mi_weight * frozen_dependence(critic, r, z) - critic_weight * dependence(critic, r, z.detach())
        return StepOutput(total, logits)

    key = {"cbd_clean": {"mi_weight": mi_weight, "critic_weight": critic_weight, "epsilon": WEIGHT_EPSILON}}
    return Objective(loss, key, models=(backdoored,))


# --- the two stages --------------------------------------------------------------------------------


def backdoored_training(ctx: DefenseContext, resolved: dict) -> nn.Module:
    """Stage 1: a fresh model, early-stopped cross-entropy training on the released set."""
    workdir = Path(ctx.workdir)
    return train_model(ctx.fresh_model(0), ctx.train_images, ctx.train_labels, merge(ctx.training, resolved["backdoor"]),
                       seed=ctx.seed, device=ctx.device, checkpoint=workdir / "backdoor.pt",
                       history=workdir / "history-backdoor.csv", desc="cbd backdoored").model


def clean_module(ctx: DefenseContext, resolved: dict) -> CBDModule:
    classifier = ctx.fresh_model(1)
    critic = None
    if float(resolved["mi_weight"]) > 0:
        dim = classifier.fc.in_features
        critic = Critic(dim, dim, float(resolved["critic"]["dropout"]))
    return CBDModule(classifier, critic)


def clean_training(ctx: DefenseContext, backdoored: nn.Module, resolved: dict) -> nn.Module:
    """Stage 2: a second fresh model with the re-weighted loss and the MI penalty against ``backdoored``."""
    workdir = Path(ctx.workdir)
    module = clean_module(ctx, resolved)
    objective = clean_objective(backdoored.to(ctx.device), float(resolved["mi_weight"]),
                                float(resolved["critic"]["loss_weight"]))
    trained = train_model(module, ctx.train_images, ctx.train_labels, merge(ctx.training, resolved["clean"]),
                          seed=ctx.seed, device=ctx.device, objective=objective,
                          on_batch=lambda end: module.constrain_critic(),
                          checkpoint=workdir / "clean.pt", history=workdir / "history-clean.csv",
                          desc="cbd clean").model
    return trained.classifier.eval()


def run(spec: dict, ctx: DefenseContext) -> DefenseResult:
    resolved = settings_for(__name__, spec)
    backdoored = backdoored_training(ctx, resolved)
    model = clean_training(ctx, backdoored, resolved)
    metrics = {"mi_weight": float(resolved["mi_weight"]),
               "backdoor_epochs": int(merge(ctx.training, resolved["backdoor"])["epochs"])}
    return DefenseResult(model=model, metrics=metrics, kept=np.ones(len(ctx.train_labels), dtype=bool))
