"""Normalizing flows on feature vectors, one per class: the generative classifier of GSSD.

A :class:`FeatureFlow` maps a D-dimensional feature vector z to u with a standard-normal base
distribution, so that log p(z) = log N(u; 0, I) + log |det ∂u/∂z|. It is ``steps`` repetitions of

- ActNorm: u = (z − shift) · exp(−log_scale) per dimension, log-det −Σ log_scale. Its parameters
  are set from the first batch it sees in training mode (data-dependent initialisation, Glow):
  shift = the batch mean, log_scale = log(the batch's unbiased std + 1e-6), so that batch leaves
  the layer standardized; afterwards they are trained like any parameter.
- an affine coupling: the first half z₁ (D/2 values) conditions the second, u₂ = z₂ · exp(s) + t
  with (s̃, t) = MLP(z₁), s = tanh(s̃), log-det Σ s. The MLP is Linear(D/2 → hidden) → ReLU →
  Linear(hidden → D), its output split into the log-scale (first D/2) and the shift (last D/2);
  the last layer starts at zero, so a new coupling is the identity.

and the two halves swap places between steps (not after the last). hidden = ``hidden_ratio`` · D/2;
the official code's ``inflate_coef``, 1 in its configuration and CIFAR-10 pipeline
(``config/nflow_config.yaml``, ``run_scripts/run_cifar10_experiments.sh``), i.e. D/2 → D/2 → D as
in the method notes. D must be even.

GSSD reads densities per dimension, log p(z) / D (:meth:`FeatureFlow.forward`), and trains each
class's flow on that class's samples by minimizing −log p(z)/D (batch 16, Adam 1e-3, 50 epochs,
constant learning rate, Adam betas (0.9, 0.99) as in the paper and the official code: appendix E)
through :func:`poisonflow.trainer.train_model`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import augment
from .trainer import Objective, StepContext, StepOutput, train_model

# The settings of :func:`train_class_flows`, in one place: the flow's shape and its training entry.
DEFAULTS: dict = {
    "steps": 2,  # ActNorm → coupling steps
    "hidden_ratio": 1.0,  # coupling MLP width as a multiple of D/2 (official inflate_coef)
    "epochs": 50,
    "batch_size": 16,
    "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99]},
    "schedule": {"name": "constant"},
    "augment": [],
    "adversarial": None,
    "amp": False,  # log-densities summed over hundreds of dimensions: full precision
    "compile": False,  # tiny MLPs: tracing one flow per class costs more than it saves
}
# Keys of :data:`DEFAULTS` that shape the flow; the rest form the training entry.
ARCHITECTURE_KEYS = ("steps", "hidden_ratio")
# ActNorm's floor under the batch std of its data-dependent initialisation (the official value).
ACTNORM_EPS = 1e-6
LOG_2PI = math.log(2.0 * math.pi)


class ActNorm(nn.Module):
    """Per-dimension affine normalization u = (z − shift)·exp(−log_scale), data-initialised."""

    def __init__(self, dim: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        # In the state dict, so a checkpointed or loaded flow is not initialised a second time.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self._initialized_host: bool | None = None  # the buffer's value, read once: no device wait per step

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_host = None  # loaded weights: read the buffer again

    def is_initialized(self) -> bool:
        if self._initialized_host is None:
            self._initialized_host = bool(self.initialized)
        return self._initialized_host

    @torch.no_grad()
    def initialize(self, z: torch.Tensor) -> None:
        """Standardize the batch ``z``: shift = its mean, log_scale = log(its std + eps); a single
        row has no spread, so its log_scale stays 0."""
        self.shift.copy_(z.mean(0))
        if len(z) > 1:
            self.log_scale.copy_(torch.log(z.std(0) + ACTNORM_EPS))
        self.initialized.fill_(1)
        self._initialized_host = True

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self.is_initialized():
            self.initialize(z)
        u = (z - self.shift) * torch.exp(-self.log_scale)
        return u, (-self.log_scale.sum()).expand(len(z))

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        return u * torch.exp(self.log_scale) + self.shift


class AffineCoupling(nn.Module):
    """u₁ = z₁, u₂ = z₂·exp(tanh(s̃)) + t with (s̃, t) = MLP(z₁); log-det Σ tanh(s̃)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        half = dim // 2
        self.net = nn.Sequential(nn.Linear(half, hidden), nn.ReLU(), nn.Linear(hidden, 2 * half))
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity map
        nn.init.zeros_(self.net[-1].bias)

    def scale_and_shift(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-scale after tanh, shift), each (B, D/2)."""
        raw_log_scale, shift = self.net(conditioning).chunk(2, dim=1)
        return torch.tanh(raw_log_scale), shift

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = z.chunk(2, dim=1)
        log_scale, shift = self.scale_and_shift(z1)
        return torch.cat([z1, z2 * torch.exp(log_scale) + shift], dim=1), log_scale.sum(1)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        # tanh applies here too (the official inverse omits it; its detection never inverts)
        u1, u2 = u.chunk(2, dim=1)
        log_scale, shift = self.scale_and_shift(u1)
        return torch.cat([u1, (u2 - shift) * torch.exp(-log_scale)], dim=1)


class SwapHalves(nn.Module):
    """(z₁, z₂) → (z₂, z₁): a permutation, log-det 0, its own inverse (D even)."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inverse(z), z.new_zeros(len(z))

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        first, second = u.chunk(2, dim=1)
        return torch.cat([second, first], dim=1)


def standard_normal_log_density(u: torch.Tensor) -> torch.Tensor:
    """Σ_i log N(u_i; 0, 1) per row."""
    return -0.5 * (u.pow(2).sum(1) + u.shape[1] * LOG_2PI)


class FeatureFlow(nn.Module):
    """``steps`` × (ActNorm → affine coupling), halves swapped between steps, N(0, I) base.

    Calling the flow gives the per-dimension log density log p(z)/D of each row
    (:meth:`log_prob_per_dim`, what the trainer's objective and the generative classifier read);
    :meth:`log_prob` gives log p(z).
    """

    def __init__(self, dim: int, steps: int = DEFAULTS["steps"], hidden_ratio: float = DEFAULTS["hidden_ratio"]):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"FeatureFlow: the feature dimension must be even and at least 2, got {dim}")
        if steps < 1:
            raise ValueError(f"FeatureFlow: steps must be at least 1, got {steps}")
        self.dim = dim
        hidden = max(1, int(dim // 2 * hidden_ratio))
        layers: list[nn.Module] = []
        for step in range(steps):
            layers += [ActNorm(dim), AffineCoupling(dim, hidden)]
            if step < steps - 1:
                layers.append(SwapHalves())
        self.layers = nn.ModuleList(layers)

    def transform(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, D) → (u, log |det ∂u/∂z|) with u (B, D) and the log-determinant (B,)."""
        log_det = z.new_zeros(len(z))
        for layer in self.layers:
            z, layer_log_det = layer(z)
            log_det = log_det + layer_log_det
        return z, log_det

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            u = layer.inverse(u)
        return u

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) = log N(u; 0, I) + log |det ∂u/∂z| per row."""
        u, log_det = self.transform(z)
        return standard_normal_log_density(u) + log_det

    def log_prob_per_dim(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) / D per row."""
        return self.log_prob(z) / self.dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) / D per row (:meth:`log_prob_per_dim`)."""
        return self.log_prob_per_dim(z)


def build_flow(dim: int, settings: dict | None = None, seed: int = 0) -> FeatureFlow:
    """A seeded :class:`FeatureFlow` shaped by ``settings`` (``steps``, ``hidden_ratio``)."""
    settings = {**DEFAULTS, **(settings or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FeatureFlow(dim, int(settings["steps"]), float(settings["hidden_ratio"]))


def flow_nll_loss(net: nn.Module, batch: augment.MixedBatch, ctx: StepContext) -> StepOutput:
    """Per row: −log p(z)/D, in full precision (outside the run's autocast)."""
    return StepOutput(-net(batch.images.float()))


FLOW_NLL = Objective(flow_nll_loss, "flow_nll_per_dim")


def flow_training(settings: dict) -> dict:
    """The training entry of ``settings`` (flow-shape keys removed), missing keys from :data:`DEFAULTS`."""
    merged = {**DEFAULTS, **settings}
    return {key: value for key, value in merged.items() if key not in ARCHITECTURE_KEYS}


def class_seed(seed: int, label: int) -> int:
    """The seed of class ``label``'s flow: an independent stream per (seed, class)."""
    return int(np.random.SeedSequence([int(seed), int(label)]).generate_state(1)[0])


def train_class_flows(features: np.ndarray, labels: np.ndarray, num_classes: int, settings: dict | None = None,
                      seed: int = 0, device: torch.device | str = "cpu",
                      checkpoint_dir: str | Path | None = None) -> list[FeatureFlow]:
    """One :class:`FeatureFlow` per class, each trained on the rows of ``features`` (N, D) labelled
    with that class, minimizing −log p(z)/D through the package's trainer.

    ``settings``: :data:`DEFAULTS` keys (flow shape and a trainings-like entry). With
    ``checkpoint_dir``, class c checkpoints to ``flow-class{c}.pt`` and writes its history to
    ``history-flow-class{c}.csv`` there, so an interrupted run resumes. Returns the flows in eval mode,
    indexed by class.
    """
    settings = {**DEFAULTS, **(settings or {})}
    features = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"train_class_flows: features (N, D) and labels (N,), got {features.shape} and {labels.shape}")
    training = flow_training(settings)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    flows = []
    for label in range(num_classes):
        rows = features[labels == label]
        if len(rows) == 0:
            raise ValueError(f"train_class_flows: class {label} has no samples to fit a flow to")
        flow = build_flow(features.shape[1], settings, class_seed(seed, label))
        result = train_model(
            flow, rows, np.zeros(len(rows), dtype=np.int64), training, seed=class_seed(seed, label),
            device=device, objective=FLOW_NLL, desc=f"flow class {label}",
            checkpoint=None if directory is None else directory / f"flow-class{label}.pt",
            history=None if directory is None else directory / f"history-flow-class{label}.csv")
        flows.append(result.model)
    return flows


@torch.no_grad()
def class_log_probs(flows: list[nn.Module], features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """(N, C) float64: log p(z_n | c)/D of every row under every class's flow (flows in eval mode)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    columns = []
    for flow in flows:
        flow.eval()
        device = next(flow.parameters()).device
        parts = [flow(torch.from_numpy(features[start:start + batch_size]).to(device)).double().cpu()
                 for start in range(0, len(features), batch_size)]
        columns.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    return torch.stack(columns, dim=1).numpy()
