"""Figures: one small drawing function per figure; each takes plain arrays or tables and writes
one PNG atomically.

- :func:`forgetting_histogram` — forgetting events of one class (hard-sample paper, Fig. 3);
- :func:`rate_curves` — a metric against the poisoning rate, one line per selection (Figs. 7–8);
- :func:`transfer_heatmap` — ASR of surrogate (row) × victim (column) models (Figs. 9–11);
- :func:`tsne_panels` — a 2-D embedding (:func:`tsne_embedding`) of victim features, one panel
  per attack (Fig. 13).

Nothing here reads artifacts or the config: the aggregate stage draws the figures that come from
metrics, and the figures stage (:mod:`poisonflow.stages.figures`) the configured ``figures:``
entries that come from stored artifacts. matplotlib and scikit-learn are imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Paper names of the selection strategies (hard-sample paper), in the papers' row order.
SELECTION_NAMES = {"random": "Vanilla", "loss": "Loss Value", "gradnorm": "Gradient Norm",
                   "forgetting": "Forgetting Event"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: figures are files
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG through a temporary sibling and a rename, then close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def selection_label(selection: str) -> str:
    return SELECTION_NAMES.get(selection, selection)


def forgetting_histogram(events: np.ndarray, path: str | os.PathLike, title: str = "") -> Path:
    """Bar chart of how many samples have each number of forgetting events (one bar per count)."""
    plt = _pyplot()
    events = np.asarray(events, dtype=np.int64)
    counts = np.bincount(events, minlength=1)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(np.arange(len(counts)), counts, width=0.85, color="tab:blue")
    ax.set_xticks(np.arange(0, len(counts), max(1, len(counts) // 10)))  # whole event counts only
    ax.set_xlim(-0.6, len(counts) - 0.4)
    ax.set_xlabel("# forgetting events")
    ax.set_ylabel("# samples")
    ax.set_title(title or f"{len(events)} samples")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def rate_curves(curves, path: str | os.PathLike, ylabel: str) -> Path:
    """``curves``: a table with columns panel, selection, rate, mean, std (fractions).

    One panel per ``panel`` value; in each, one line per selection: mean ± std (in %) against the
    poisoning rate (in % of the target class for clean-label attacks).
    """
    plt = _pyplot()
    panels = list(dict.fromkeys(curves["panel"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        part = curves[curves["panel"] == panel]
        for selection in _ordered_selections(part["selection"]):
            line = part[part["selection"] == selection].sort_values("rate")
            ax.errorbar(100 * line["rate"].to_numpy(float), 100 * line["mean"].to_numpy(float),
                        yerr=100 * line["std"].to_numpy(float), marker="o", capsize=3,
                        label=selection_label(selection))
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("poisoning rate (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _ordered_selections(values) -> list[str]:
    """Selections in the papers' order (Vanilla first), unknown ones after, in order of appearance."""
    present = list(dict.fromkeys(values))
    return [s for s in SELECTION_NAMES if s in present] + [s for s in present if s not in SELECTION_NAMES]


def transfer_heatmap(matrices: dict, path: str | os.PathLike, title: str = "") -> Path:
    """``matrices``: panel name → a table (rows: source model, columns: victim model) of fractions.

    Each cell is coloured and annotated with its value in %; missing cells stay blank.
    """
    plt = _pyplot()
    width = len(matrices) * (1.2 * _widest(matrices) + 2.5)
    fig, axes = plt.subplots(1, len(matrices), figsize=(width, 0.55 * _tallest(matrices) + 1.8), squeeze=False)
    for ax, (panel, matrix) in zip(axes[0], matrices.items()):
        values = 100 * matrix.to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (row, col), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(col, row, f"{value:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 60 else "black")
        ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], rotation=30, ha="right")
        ax.set_yticks(range(matrix.shape[0]), [str(r) for r in matrix.index])
        ax.set_xlabel("victim (target) model")
        ax.set_ylabel("source (surrogate) model")
        ax.set_title(" — ".join(part for part in (title, panel) if part), fontsize=9)
        fig.colorbar(image, ax=ax, label="ASR (%)")
    fig.tight_layout()
    return save_figure(fig, path)


def _widest(matrices: dict) -> int:
    return max(m.shape[1] for m in matrices.values())


def _tallest(matrices: dict) -> int:
    return max(m.shape[0] for m in matrices.values())


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(N, 2) t-SNE embedding of (N, D) features; perplexity is capped below N as t-SNE requires."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    perplexity = float(min(perplexity, max(1.0, (len(features) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def tsne_panels(panels: dict, path: str | os.PathLike) -> Path:
    """``panels``: name → (embedding (N, 2), class labels (N,), poisoned (N,) bool).

    Benign samples are coloured by class; poisoned samples are drawn on top as black crosses.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (name, (embedding, labels, poisoned)) in zip(axes[0], panels.items()):
        embedding, poisoned = np.asarray(embedding), np.asarray(poisoned, dtype=bool)
        benign = ~poisoned
        ax.scatter(embedding[benign, 0], embedding[benign, 1], c=np.asarray(labels)[benign], cmap="tab10", s=4,
                   alpha=0.6)
        ax.scatter(embedding[poisoned, 0], embedding[poisoned, 1], c="black", marker="x", s=14, label="poisoned")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if poisoned.any():
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)
