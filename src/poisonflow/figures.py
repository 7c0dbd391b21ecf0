"""Figures: one small drawing function per figure; each takes plain arrays or tables and writes
one PNG and, next to it, the same figure as a PDF (vector, for a paper), both atomically.

Axes of percentages span at least 0–100 % (:func:`percent_limits`), so a 0.3 % difference is not
drawn as a cliff; names shown are display names (:func:`display_name`: ``BadNets``, ``A-ABL``,
``ResNet-18``), not config entry names, where one is known; colours that encode something have
a legend or a colour bar.

- :func:`forgetting_histogram` — forgetting events of one class (hard-sample paper, Fig. 3);
- :func:`rate_curves` — a metric against the poisoning rate, one line per selection (Figs. 7–8);
- :func:`transfer_heatmap` — ASR of surrogate (row) × victim (column) models (Figs. 9–11);
- :func:`sweep_curves` — a metric against a swept value, one line per attack (A-ABL Figs. 3, 5, 6);
- :func:`distance_histograms` — overlaid histograms of embedding distances (GSSD Fig. F.1);
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

# How papers write the kinds, datasets, architectures and metrics (lower-case config names → shown).
DISPLAY_NAMES = {
    # backdoor attacks
    "badnets": "BadNets", "blended": "Blended", "wanet": "WaNet", "sig": "SIG", "lc": "LC", "tuap": "TUAP",
    "trojannn": "TrojanNN", "bpp": "BppAttack", "adap-patch": "Adap-Patch", "adap-blend": "Adap-Blend",
    "inputaware": "Input-Aware", "input-aware": "Input-Aware", "ssba": "SSBA",
    # unlearnable examples
    "triggerue": "TriggerUE", "em": "EM", "rem": "REM", "tap": "TAP", "entf": "EntF", "lsp": "LSP", "ops": "OPS",
    "ar": "AR", "clean": "Clean",
    # defenses
    "none": "No defense", "aabl": "A-ABL", "abl": "ABL", "fine-pruning": "Fine-pruning", "fp": "Fine-pruning",
    "nad": "NAD", "strip": "STRIP", "sentinet": "SentiNet", "shrinkpad": "ShrinkPad", "autoencoder": "Auto-Encoder",
    # datasets
    "digits": "Digits", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fashion-mnist": "Fashion-MNIST",
    "svhn": "SVHN", "gtsrb": "GTSRB", "tiny-imagenet": "Tiny-ImageNet", "synthetic": "Synthetic",
    # architectures
    "convnet": "ConvNet", "resnet18": "ResNet-18", "resnet34": "ResNet-34", "preact_resnet18": "PreAct-ResNet-18",
    "vgg16": "VGG-16", "vgg19": "VGG-19", "mobilenetv2": "MobileNetV2", "densenet121": "DenseNet-121",
    # metrics
    "acc": "BA", "asr": "ASR", "ra": "RA", "pgd_acc": "PGD acc.", "nder": "nDER", "auroc": "AUROC", "tpr": "TPR",
    "fpr": "FPR", "gamma": "γ", "rho_vul": "ρ_vul", "poison_removed": "poison removed",
    **SELECTION_NAMES,
}


def display_name(name) -> str:
    """How a paper writes a config name: ``badnets`` → ``BadNets``, ``resnet18`` → ``ResNet-18``;
    names it does not know are shown as they are (entry names are the user's own)."""
    text = str(name)
    return DISPLAY_NAMES.get(text, DISPLAY_NAMES.get(text.lower(), text))


def attack_label(name: str, entry: dict | None = None) -> str:
    """Display name of an attacks entry from its resolved settings: the kind's name, ``-C`` for a
    clean-label backdoor, the selection where it is not random (``BadNets-C (Loss Value)``); the
    entry name without settings."""
    if not entry or "kind" not in entry:
        return display_name(name)
    label = display_name(entry["kind"])
    if entry.get("label_mode") == "clean" and entry["kind"] in ("badnets", "blended", "wanet", "trojannn"):
        label += "-C"
    selection = entry.get("selection")
    if selection and selection != "random":
        label += f" ({selection_label(selection)})"
    return label


def display_setting(label: str) -> str:
    """A setting label such as ``c10, badnets, target 2`` with each known name displayed
    (``c10, BadNets, target 2``)."""
    return ", ".join(display_name(part) for part in str(label).split(", "))


def unique_labels(names: list[str], labels: list[str]) -> list[str]:
    """``labels``, with the entry name added to each label that two names share."""
    return [f"{label} [{name}]" if labels.count(label) > 1 else label for name, label in zip(names, labels)]


def percent_limits(low, high, floor=(0.0, 100.0), pad: float = 3.0) -> tuple[float, float]:
    """Axis limits (in %) spanning ``floor`` and the data (``low``/``high``: values or arrays, e.g.
    mean ∓ std), with ``pad`` % of room at both ends."""
    low = np.asarray(low, dtype=float).ravel()
    high = np.asarray(high, dtype=float).ravel()
    bottom = min(floor[0], float(np.nanmin(low))) if np.isfinite(low).any() else floor[0]
    top = max(floor[1], float(np.nanmax(high))) if np.isfinite(high).any() else floor[1]
    return bottom - pad, top + pad


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: figures are files
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` as ``path`` (PNG) and as the same name with ``.pdf``, each through a temporary
    sibling and a rename, then close it; returns the PNG's path."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for target, fmt in ((path.with_suffix(".pdf"), "pdf"), (path, "png")):  # the PNG (the rule's output) last
            tmp = target.with_name(f".{target.stem}.tmp.{fmt}")
            fig.savefig(tmp, dpi=dpi, format=fmt, bbox_inches="tight")
            os.replace(tmp, target)
    finally:
        plt.close(fig)
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


# GSSD Fig. F.1's colours: the clean/poisoned pairs brown, intra-class blue, inter-class green
DISTANCE_COLOURS = {"clean vs poisoned (same image)": "tab:brown", "intra-class": "tab:blue",
                    "inter-class": "tab:green"}


def distance_histograms(groups: dict, path: str | os.PathLike, title: str = "", bins: int = 50) -> Path:
    """Overlaid density histograms of distances, one per group (name → 1-D array), common bins."""
    plt = _pyplot()
    values = [np.asarray(v, dtype=np.float64) for v in groups.values() if len(v)]
    high = max(float(v.max()) for v in values) if values else 1.0
    edges = np.linspace(0.0, high if high > 0 else 1.0, bins + 1)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, distances in groups.items():
        if len(distances):
            ax.hist(distances, bins=edges, density=True, alpha=0.55, label=f"{name} ({len(distances)})",
                    color=DISTANCE_COLOURS.get(name))
    ax.set_xlabel("L2 distance between embeddings")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def rate_curves(curves, path: str | os.PathLike, ylabel: str) -> Path:
    """``curves``: a table with columns panel, selection, rate, mean, std (fractions).

    One panel per ``panel`` value; in each, one line per selection: mean ± std (in %) against the
    poisoning rate (in % of the target class for clean-label attacks). The y axis spans at least
    0–100 % (:func:`percent_limits`); a missing std (one seed) draws no error bar.
    """
    plt = _pyplot()
    panels = list(dict.fromkeys(curves["panel"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        part = curves[curves["panel"] == panel]
        for selection in _ordered_selections(part["selection"]):
            line = part[part["selection"] == selection].sort_values("rate")
            ax.errorbar(100 * line["rate"].to_numpy(float), 100 * line["mean"].to_numpy(float),
                        yerr=100 * np.nan_to_num(line["std"].to_numpy(float)), marker="o", capsize=3,
                        label=selection_label(selection))
        mean, std = 100 * part["mean"].to_numpy(float), 100 * np.nan_to_num(part["std"].to_numpy(float))
        ax.set_ylim(*percent_limits(mean - std, mean + std))
        ax.set_title(display_setting(panel), fontsize=9)
        ax.set_xlabel("poisoning rate (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


SWEEP_METRIC_LABELS = {"asr": "ASR (%)", "acc": "ACC (%)", "pgd_acc": "RA (%)"}


def sweep_curves(curves, path: str | os.PathLike, xlabel: str, labels: dict | None = None) -> Path:
    """``curves``: columns metric, line, value, mean, std (fractions). One panel per metric (ASR,
    ACC, RA; ``labels``: metric → axis label, default :data:`SWEEP_METRIC_LABELS`), one line per
    ``line`` (an attack, or a defense), mean ± std in % against the swept value (or a distortion level)."""
    plt = _pyplot()
    labels = labels or SWEEP_METRIC_LABELS
    metrics = [m for m in labels if m in set(curves["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        part = curves[curves["metric"] == metric]
        for line in dict.fromkeys(part["line"]):
            points = part[part["line"] == line].sort_values("value")
            ax.errorbar(points["value"].to_numpy(float), 100 * points["mean"].to_numpy(float),
                        yerr=100 * np.nan_to_num(points["std"].to_numpy(float)), marker="o", capsize=3,
                        label=display_name(line))
        mean, std = 100 * part["mean"].to_numpy(float), 100 * np.nan_to_num(part["std"].to_numpy(float))
        ax.set_ylim(*percent_limits(mean - std, mean + std))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(labels[metric])
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
        ax.set_xticks(range(matrix.shape[1]), [display_name(c) for c in matrix.columns], rotation=30, ha="right")
        ax.set_yticks(range(matrix.shape[0]), [display_name(r) for r in matrix.index])
        ax.set_xlabel("victim (target) model")
        ax.set_ylabel("source (surrogate) model")
        ax.set_title(" — ".join(part for part in (title, display_setting(panel)) if part), fontsize=9)
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


def tsne_panels(panels: dict, path: str | os.PathLike, class_names: list[str] | None = None) -> Path:
    """``panels``: title → (embedding (N, 2), class labels (N,), poisoned (N,) bool).

    Benign samples are coloured by class (a legend names each class: ``class_names`` in id order,
    else the ids); poisoned samples are drawn on top as black crosses.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    classes = sorted({int(c) for _, labels, _ in panels.values() for c in np.asarray(labels).ravel()})
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 1.6, 4), squeeze=False)
    any_poisoned = False
    for ax, (name, (embedding, labels, poisoned)) in zip(axes[0], panels.items()):
        embedding, poisoned = np.asarray(embedding), np.asarray(poisoned, dtype=bool)
        labels = np.asarray(labels).astype(int)
        benign = ~poisoned
        ax.scatter(embedding[benign, 0], embedding[benign, 1], c=[colour[c] for c in labels[benign]], s=4, alpha=0.6)
        ax.scatter(embedding[poisoned, 0], embedding[poisoned, 1], c="black", marker="x", s=14)
        any_poisoned |= bool(poisoned.any())
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], marker="o", linestyle="", color=colour[c], markersize=5,
                      label=str(class_names[c]) if class_names and c < len(class_names) else f"class {c}")
               for c in classes]
    if any_poisoned:
        handles.append(Line2D([], [], marker="x", linestyle="", color="black", markersize=6, label="poisoned"))
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False,
               title="class" if classes else None, title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (4 * len(panels) + 1.6), 1))
    return save_figure(fig, path)


def _score_panel(ax, name: str, values, poisoned: np.ndarray, threshold: float | None) -> None:
    """One score's histogram, clean and poisoned samples apart, on a log count axis."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.histogram_bin_edges(values, bins=40)
    ax.hist(values[~poisoned], bins=edges, color="tab:blue", alpha=0.65, label=f"clean ({int((~poisoned).sum())})")
    if poisoned.any():
        ax.hist(values[poisoned], bins=edges, color="tab:red", alpha=0.75, label=f"poisoned ({int(poisoned.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel(name)
    ax.set_ylabel("# training samples")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def score_distributions(scores: dict, poisoned: np.ndarray, path: str | os.PathLike,
                        thresholds: dict | None = None, title: str = "") -> Path:
    """One histogram panel per named per-sample score (e.g. SCE before and after a perturbation),
    clean and poisoned training samples in separate colours (counts on a log axis: the poisons are
    few), each threshold of ``thresholds`` drawn as a dashed line on its panel; two panels a row
    when there are more than two (before / after pairs)."""
    names = list(scores)
    width = len(names) if len(names) <= 2 else 2
    rows = {" " * i: ({name: scores[name] for name in names[start:start + width]}, poisoned, thresholds or {})
            for i, start in enumerate(range(0, len(names), width))}  # distinct blank labels: no row titles
    return score_grid(rows, path, title)


def score_grid(rows: dict, path: str | os.PathLike, title: str = "") -> Path:
    """``rows``: row label (an attack) → (scores: name → per-sample values, poisoned flags,
    thresholds: name → value). One row per label, one panel per score, clean and poisoned samples
    apart (A-ABL Figs. 4, 9 and 11: clean vs poisoned SCE before and after iFGSM, per attack)."""
    plt = _pyplot()
    columns = max(len(scores) for scores, _, _ in rows.values())
    fig, axes = plt.subplots(len(rows), columns, figsize=(4.2 * columns, 3.2 * len(rows)), squeeze=False)
    for axes_row, (label, (scores, poisoned, thresholds)) in zip(axes, rows.items()):
        poisoned = np.asarray(poisoned, dtype=bool)
        for ax in axes_row[len(scores):]:
            ax.set_visible(False)
        for ax, (name, values) in zip(axes_row, scores.items()):
            _score_panel(ax, name, values, poisoned, thresholds.get(name))
            if label.strip():
                ax.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def learning_curves(curves: dict, path: str | os.PathLike, title: str = "") -> Path:
    """``curves``: attack label → rows of :data:`poisonflow.curves.COLUMNS` (fractions). Two panels
    (the training samples as released; their iFGSM examples), accuracy in % against the epoch, one
    colour per attack, benign samples solid and poisoned ones dashed (A-ABL Fig. 8)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.5), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(curves.items()):
        epochs = [int(row["epoch"]) for row in rows]
        for ax, kind in zip(axes, ("nat", "adv")):
            for group, style in (("benign", "-"), ("poisoned", "--")):
                values = [100 * float(row[f"{group}_{kind}"]) for row in rows]
                ax.plot(epochs, values, style, color=colours[i % len(colours)], marker="o", markersize=3,
                        label=f"{label}, {group}")
    for ax, name in zip(axes, ("as released", "iFGSM examples")):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on the released labels (%)")
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
