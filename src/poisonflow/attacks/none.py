"""No poisoning: the released training set is the clean one.

The reference rows of the papers' tables ("Clean": a model trained on unmodified data) run
through the same stages as every attack: this kind writes a store identical to the clean
training set, with no ASR set.
"""

from __future__ import annotations

import numpy as np

def protect(spec: dict, images: np.ndarray, labels: np.ndarray, context, seed: int) -> np.ndarray:
    return images.copy()
