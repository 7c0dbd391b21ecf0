"""GSSD's decisions on a generative classifier's densities: which classes are attack targets, and
which of their samples to keep, relabel or drop. Pure functions on arrays, no I/O.

Every function reads ``log_probs`` (N, C): log p(z_n | c) / D, the per-dimension log density of
sample n's feature vector under class c's normalizing flow (:func:`poisonflow.flows.class_log_probs`),
and ``labels`` (N,), the labels of the (possibly poisoned) training set. The official code
(ivansabolic/GSSD, ``extract_indices_from_nflows.py``) works on the same per-dimension values; it
calls the disruptive case "non-distribution" and the non-disruptive one "in-distribution".

Disruptive attacks (:func:`disruptive_classes`) make the poisoned samples unlike every class, so
their best density under the other classes' flows, m(z) = max_{k≠c} exp(log p(z|k)/D), is low:
a 30-bin histogram of m over the samples labelled c (bins spanning their min..max) is cut to the
bins that lie entirely below λ, its valley j is the first least-populated of those bins, and c is
flagged when j is not the first bin, the N samples in the bins before j are more than β_D·N_c and
N ≥ 2·count[j]. A class without two histogram edges below λ is not examined.

Non-disruptive attacks (:func:`non_disruptive_classes`) leave the poisoned samples looking like
their source classes, so the target class's flow, trained on them too, fits the other classes:
c is flagged when the mean per-dimension NLL of the samples not labelled c under c's flow,
−mean_{y≠c} log p(z|c)/D, is below β_ND. Classes already flagged as disruptive are not examined.

In a flagged class the samples are ranked by s(z) = log p(z|c)/D − max_{k≠c} log p(z|k)/D
(:func:`target_scores`; the official code's, per dimension, so only its order matters), ascending,
ties by sample index (stable sort; the official torch.argsort leaves their order unspecified). With
n samples in the class (:func:`class_plan`, rounding as in the official code):

- non-disruptive: the top n − int((1 − α_C)·n) are kept as clean (30 of 100), the bottom
  int(α_P·n) are relabeled to argmax_{k≠c} p(z|k) (15 of 100), the rest are dropped;
- disruptive: the bottom int(α_C·n) are kept, the rest dropped, none relabeled.

The official code uses one α_C for both; appendix E of the paper says "the defense against disruptive
attack uses α_C = 0.15", so that one is the separate ``alpha_c_disruptive`` here (set it equal to
``alpha_c`` for the official scripts' behaviour). Unflagged classes keep all their samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

# The settings of GSSD's detection and filtering, in one place (paper appendix E; the official code's
# argument names in brackets).
DEFAULTS: dict = {
    "beta_d": 0.05,  # disruptive: the low-density share a class must exceed [beta_d]
    "lambda": 0.75,  # disruptive: the histogram is read below this density [lambda_]
    "bins": 30,  # disruptive: histogram bins [fixed 30]
    "beta_nd": 0.6,  # non-disruptive: the other classes' NLL per dimension below which c is flagged [beta_nd]
    "alpha_c": 0.3,  # non-disruptive: top share of a flagged class kept as clean [clean_threshold]
    "alpha_p": 0.15,  # non-disruptive: bottom share relabeled [poisoned_threshold]
    "alpha_c_disruptive": 0.15,  # disruptive: bottom share kept as clean (paper; official: alpha_c)
}

DISRUPTIVE = "disruptive"
NON_DISRUPTIVE = "non-disruptive"


def resolved(settings: dict | None) -> dict:
    """``settings`` over :data:`DEFAULTS`; unknown keys and out-of-range values are refused."""
    settings = {**DEFAULTS, **(settings or {})}
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"gssd: unknown setting(s) {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    for key in ("beta_d", "alpha_c", "alpha_p", "alpha_c_disruptive"):
        if not 0.0 <= float(settings[key]) <= 1.0:
            raise ConfigError(f"gssd.{key}: a fraction in [0, 1], got {settings[key]}")
    if float(settings["alpha_c"]) + float(settings["alpha_p"]) > 1.0:
        raise ConfigError(f"gssd.alpha_c + gssd.alpha_p: the kept and relabeled shares overlap "
                          f"({settings['alpha_c']} + {settings['alpha_p']} > 1)")
    if int(settings["bins"]) < 2:
        raise ConfigError(f"gssd.bins: at least 2, got {settings['bins']}")
    return settings


def others_max(log_probs: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """max_{k≠label} log_probs[:, k] per row, and its argmax: the best other class."""
    others = np.array(log_probs, dtype=np.float64)
    others[:, label] = -np.inf
    best = others.argmax(1)
    return others[np.arange(len(others)), best], best


def valley_rule(densities: np.ndarray, beta_d: float, lam: float, bins: int) -> bool:
    """The disruptive-attack test on one class's m(z) values (see the module docstring)."""
    counts, edges = np.histogram(densities, bins=bins)
    below = np.flatnonzero(edges < lam)  # edges are ascending: 0..last
    if len(below) <= 1:
        return False
    last = below[-1]  # bins 0..last−1 end at or before edges[last] < λ
    valley = int(np.argmin(counts[:last]))  # the first least-populated bin
    before = int(counts[:valley].sum())
    return valley != 0 and before > beta_d * len(densities) and before >= 2 * int(counts[valley])


def disruptive_classes(log_probs: np.ndarray, labels: np.ndarray, settings: dict | None = None) -> list[int]:
    """Classes whose samples hold a low-density mode under every other class's flow."""
    settings = resolved(settings)
    log_probs, labels = np.asarray(log_probs, dtype=np.float64), np.asarray(labels)
    flagged = []
    for label in range(log_probs.shape[1]):
        rows = labels == label
        if not rows.any():
            continue
        best_other, _ = others_max(log_probs[rows], label)
        if valley_rule(np.exp(best_other), float(settings["beta_d"]), float(settings["lambda"]),
                       int(settings["bins"])):
            flagged.append(label)
    return flagged


def other_classes_nll(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C,): −mean over the samples not labelled c of log p(z|c)/D (NaN where there are none)."""
    log_probs, labels = np.asarray(log_probs, dtype=np.float64), np.asarray(labels)
    nll = np.full(log_probs.shape[1], np.nan)
    for label in range(log_probs.shape[1]):
        rows = labels != label
        if rows.any():
            nll[label] = -log_probs[rows, label].mean()
    return nll


def non_disruptive_classes(log_probs: np.ndarray, labels: np.ndarray, settings: dict | None = None,
                           exclude=()) -> list[int]:
    """Classes whose flow fits the other classes' samples: their NLL per dimension under it < β_ND."""
    settings = resolved(settings)
    nll = other_classes_nll(log_probs, labels)
    excluded = {int(label) for label in exclude}
    return [label for label in range(len(nll))
            if label not in excluded and not np.isnan(nll[label]) and nll[label] < float(settings["beta_nd"])]


def target_scores(log_probs: np.ndarray, label: int) -> np.ndarray:
    """s(z) = log p(z|label)/D − max_{k≠label} log p(z|k)/D per row."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    best_other, _ = others_max(log_probs, label)
    return log_probs[:, label] - best_other


@dataclass(frozen=True)
class ClassPlan:
    """What happens to one flagged class: sample indices into the whole training set."""
    kept: np.ndarray  # int64, trained on under their label
    relabeled: np.ndarray  # int64, fine-tuned on under ``new_labels``
    new_labels: np.ndarray  # int64, argmax_{k≠c} p(z|k) of each relabeled sample


def class_plan(log_probs: np.ndarray, labels: np.ndarray, label: int, attack: str,
               settings: dict | None = None) -> ClassPlan:
    """The kept and relabeled samples of flagged class ``label`` (rounding as the official code's)."""
    settings = resolved(settings)
    log_probs, labels = np.asarray(log_probs, dtype=np.float64), np.asarray(labels)
    members = np.flatnonzero(labels == label)
    order = np.argsort(target_scores(log_probs[members], label), kind="stable")
    ranked = members[order]  # ascending score
    n = len(ranked)
    none = np.zeros(0, dtype=np.int64)
    if attack == NON_DISRUPTIVE:
        kept = ranked[int((1.0 - float(settings["alpha_c"])) * n):]
        relabeled = ranked[:int(float(settings["alpha_p"]) * n)]
        _, best = others_max(log_probs[relabeled], label)
        return ClassPlan(kept.astype(np.int64), relabeled.astype(np.int64), best.astype(np.int64))
    if attack == DISRUPTIVE:
        kept = ranked[:int(float(settings["alpha_c_disruptive"]) * n)]
        return ClassPlan(kept.astype(np.int64), none, none)
    raise ValueError(f"class_plan: attack must be '{DISRUPTIVE}' or '{NON_DISRUPTIVE}', got {attack!r}")


@dataclass(frozen=True)
class GssdPlan:
    """GSSD's verdict on a training set of N samples."""
    flagged: dict[int, str]  # class → DISRUPTIVE or NON_DISRUPTIVE
    kept: np.ndarray  # (N,) bool: trained on from scratch under its own label
    relabeled: np.ndarray  # int64 indices of the samples fine-tuned on under new labels
    new_labels: np.ndarray  # int64, one per relabeled index

    @property
    def dropped(self) -> np.ndarray:
        """(N,) bool: neither kept nor relabeled."""
        mask = ~self.kept
        mask[self.relabeled] = False
        return mask


def plan(log_probs: np.ndarray, labels: np.ndarray, settings: dict | None = None) -> GssdPlan:
    """Detect the target classes (disruptive first, then non-disruptive among the rest) and plan
    each flagged class; unflagged classes keep all their samples."""
    settings = resolved(settings)
    log_probs, labels = checked(log_probs, labels)
    disruptive = disruptive_classes(log_probs, labels, settings)
    non_disruptive = non_disruptive_classes(log_probs, labels, settings, exclude=disruptive)
    flagged = {**{c: DISRUPTIVE for c in disruptive}, **{c: NON_DISRUPTIVE for c in non_disruptive}}
    return plan_for(log_probs, labels, flagged, settings)


def checked(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    log_probs, labels = np.asarray(log_probs, dtype=np.float64), np.asarray(labels)
    if log_probs.ndim != 2 or len(log_probs) != len(labels):
        raise ValueError(f"gssd.plan: log_probs (N, C) and labels (N,), got {log_probs.shape} and {labels.shape}")
    return log_probs, labels


def plan_for(log_probs: np.ndarray, labels: np.ndarray, flagged: dict[int, str],
             settings: dict | None = None) -> GssdPlan:
    """Filter and relabel the classes of ``flagged`` (class → attack type), however they were found
    (detected, or given, as appendix J gives the target class to a discriminative classifier)."""
    settings = resolved(settings)
    log_probs, labels = checked(log_probs, labels)
    flagged = {int(label): attack for label, attack in flagged.items()}
    kept = ~np.isin(labels, list(flagged))
    relabeled, new_labels = [], []
    for label in sorted(flagged):
        part = class_plan(log_probs, labels, label, flagged[label], settings)
        kept[part.kept] = True
        relabeled.append(part.relabeled)
        new_labels.append(part.new_labels)
    empty = np.zeros(0, dtype=np.int64)
    return GssdPlan(dict(sorted(flagged.items())), kept,
                    np.concatenate(relabeled) if relabeled else empty,
                    np.concatenate(new_labels) if new_labels else empty)
