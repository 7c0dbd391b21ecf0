"""Which training samples an attack poisons.

Candidates are the target class (clean-label), the other classes (dirty-label) or every class
(all-to-all; see :mod:`poisonflow.targets`); ``random``
draws from them with the experiment's seed, a score name (``loss``, ``gradnorm``,
``forgetting``) takes the hardest first (highest score; ties broken by a seeded shuffle so no
index order leaks into the choice).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .targets import candidates


def select_random(pool: np.ndarray, count: int, rng: np.random.Generator, scores=None) -> np.ndarray:
    return np.sort(rng.choice(pool, size=count, replace=False))


def select_hardest(pool: np.ndarray, count: int, rng: np.random.Generator, scores: np.ndarray) -> np.ndarray:
    shuffled = rng.permutation(pool)
    order = np.argsort(-scores[shuffled], kind="stable")
    return np.sort(shuffled[order[:count]])


SELECTIONS = {"random": select_random, "loss": select_hardest, "gradnorm": select_hardest,
              "forgetting": select_hardest}


def select(labels: np.ndarray, attack: dict, count: int, seed: int, scores: dict[str, np.ndarray] | None = None,
           key: str = "attack") -> np.ndarray:
    """Indices of the ``count`` samples to poison for a resolved attack entry."""
    method = attack.get("selection", "random")
    if method not in SELECTIONS:
        raise ConfigError(f"{key}.selection: unknown selection '{method}' (known: {', '.join(sorted(SELECTIONS))})")
    pool = candidates(labels, attack)
    if count > len(pool):
        raise ConfigError(f"{key}.rate: asks for {count} samples but only {len(pool)} are eligible")
    metric = None
    if method != "random":
        if scores is None or method not in scores:
            raise ConfigError(f"{key}.selection: '{method}' needs the surrogate's scores")
        metric = np.asarray(scores[method], dtype=np.float64)
    return SELECTIONS[method](pool, count, np.random.default_rng(seed), metric)
