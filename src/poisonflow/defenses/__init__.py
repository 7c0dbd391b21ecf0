"""Defenses: config ``kind:`` → a module with ``run(spec, ctx: DefenseContext) -> DefenseResult``.

A defense sees only what a defender has: the released (poisoned) training set, the reserve (clean
data held out of the training set before poisoning, never released; defenses that assume clean
data draw from it), the victim model, and the training recipe. It never sees which samples are
poisoned, nor the clean twin of any training image; the defense stage scores it against ground
truth afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..kinds import DEFENSES  # noqa: F401  (the registry, re-exported)

if TYPE_CHECKING:  # the registry is read when the workflow is parsed: keep numpy/torch out of it
    import numpy as np
    import torch


@dataclass
class DefenseContext:
    train_images: np.ndarray  # uint8 (N, H, W, 3): the released training set
    train_labels: np.ndarray  # int64 (N,): its labels as released
    reserve_images: np.ndarray  # uint8: the reserve, clean data never released (clean store's reserve/)
    reserve_labels: np.ndarray
    training: dict  # the victim's resolved training entry (``model`` resolved inside it)
    build_model: Callable[[], torch.nn.Module]  # a fresh, untrained model of the victim's architecture
    victim: torch.nn.Module | None  # the trained victim, weights loaded, eval mode
    seed: int
    device: torch.device
    workdir: Path  # a directory for checkpoints, kept across a killed and rerun job
    num_classes: int
    # test-time inputs to screen (input-detection defenses): the clean test images and the
    # triggered ASR images, mixed in a seeded order; which is which is not given
    screen_images: np.ndarray | None = None
    # features of the released training images from a label-free extractor (the features stage
    # named by the entry's ``features`` key), row i ↔ training sample i; None when none is named
    features: np.ndarray | None = None
    features_dir: Path | None = None  # that entry's folder (a SimCLR entry's backbone.pt is there)
    # the split of a splitting defense, computed by its own cached job (the split stage): a splitting
    # kind uses it instead of splitting again; a ``split-train`` entry trains on it
    split: SplitResult | None = None
    # an observer of the defense's final training (the trainer's ``on_epoch``): the defense stage
    # attaches one to record learning curves for an analysis figure when the evaluation asks for
    # them (A-ABL Fig. 10); a defense passes it to ``train_model`` as it is and never reads it
    observer: Callable | None = None

    def fresh_model(self, offset: int = 0) -> torch.nn.Module:
        """An untrained victim-architecture model whose initialization depends only on the seed
        (plus ``offset``, for a defense that needs several independent ones)."""
        import torch

        torch.manual_seed(self.seed + offset)
        return self.build_model()


@dataclass
class SplitResult:
    """A splitting defense's verdict on the released training set, without ground truth: which
    samples it keeps, per-sample scores and the thresholds drawn on them, and its own metrics."""
    kept: np.ndarray  # bool (N,)
    sample_scores: dict = field(default_factory=dict)  # name → (N,) float
    thresholds: dict = field(default_factory=dict)  # score name → threshold
    metrics: dict = field(default_factory=dict)
    groups: np.ndarray | None = None  # int (N,): a finer split than kept (D-ST: clean / uncertain / poisoned)

    def save(self, path: Path) -> None:
        """``split.npz``: ``kept``, each score as ``score:<name>``, thresholds and metrics as JSON,
        ``groups`` where there are any."""
        import json

        import numpy as np

        from ..checkpoint import atomic_write

        arrays = {"kept": np.asarray(self.kept, dtype=bool),
                  "thresholds": np.array(json.dumps(self.thresholds)), "metrics": np.array(json.dumps(self.metrics)),
                  **{f"score:{name}": np.asarray(values) for name, values in self.sample_scores.items()}}
        if self.groups is not None:
            arrays["groups"] = np.asarray(self.groups)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: Path) -> "SplitResult":
        import json

        import numpy as np

        with np.load(path, allow_pickle=False) as stored:
            return cls(kept=stored["kept"].astype(bool),
                       sample_scores={k[len("score:"):]: stored[k] for k in stored.files if k.startswith("score:")},
                       thresholds=json.loads(str(stored["thresholds"])), metrics=json.loads(str(stored["metrics"])),
                       groups=stored["groups"] if "groups" in stored.files else None)


@dataclass
class DefenseResult:
    model: torch.nn.Module
    metrics: dict = field(default_factory=dict)  # extras computed without ground truth (e.g. gamma)
    kept: np.ndarray | None = None  # bool (N,): training samples the final model was trained on
    # input-detection defenses: a suspicion score per screened input (higher = more likely
    # triggered) and the defense's own decision for each; scored as AUROC / TPR / FPR by the stage
    input_scores: np.ndarray | None = None
    input_flags: np.ndarray | None = None
    # splitting defenses: named per-training-sample scores (e.g. A-ABL's SCE before and after the
    # perturbation) and the thresholds drawn on them; the stage stores them next to the model and
    # plots them split by ground truth after the defense has returned
    sample_scores: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    # relabeling defenses: training-sample indices given a new label (and those labels); the stage
    # scores the new labels against the true ones after the defense has returned
    relabeled: np.ndarray | None = None
    new_labels: np.ndarray | None = None




def with_defaults(spec: dict, defaults: dict, name: str) -> dict:
    """A defense entry (``kind`` aside) merged over its module's ``defaults``; an unknown key is a
    ConfigError naming ``name.<key>``. Each module then checks its own ranges."""
    from ..errors import ConfigError

    overrides = {key: value for key, value in spec.items() if key != "kind"}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (known: {', '.join(sorted(defaults))})")
    return merge(defaults, overrides)


def merge(base: dict, override: dict | None) -> dict:
    """Deep-merge ``override`` into a copy of ``base`` (used to derive stage trainings)."""
    out = dict(base)
    for key, value in (override or {}).items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
