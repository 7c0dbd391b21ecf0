"""aggregate stage: every defense ``metrics.json`` → tidy ``metrics.csv``, summary tables, figures.

``results/metrics.csv`` has one row per (dataset, attack, training, defense, seed, metric).
``results/tables/summary.{csv,md,tex}`` report mean ± std over seeds (sample std, as the papers;
``–`` in place of the std where there is a single seed), the ``.tex`` a booktabs tabular for a
paper; ``results/figures/summary.png`` (and ``.pdf``) plots ACC and ASR per attack and defense.

``results/report/`` lays the same numbers out as the papers do, reading each entry's parameters
(rate, target, trigger pattern, selection, surrogate and victim architectures) from the resolved
config (``--experiment``); a view is written only where the config has its structure:

- ``selection.{csv,md}`` — rows: selection strategy × metric (BA, ASR, detection scores);
  columns: whatever else varies between the attacks (kind, trigger pattern, target, defense…)
  (hard-sample paper, Tables 1–7);
- ``rate_asr.png``, ``rate_acc.png``, ``rate.csv`` — a metric against the poisoning rate, one line per
  selection, where attacks differ only in rate and selection (Figs. 7–8);
- ``transfer_{selection}.{png,csv,md}`` — mean ASR, rows: surrogate model (``Vanilla``: random
  selection), columns: victim model (Figs. 9–11);
- ``unlearnable.{csv,md}`` — clean test accuracy of the attacks evaluated without an ASR set
  (unlearnable examples, clean baselines), columns: whatever varies among dataset, training
  and defense (TriggerUE, Tables 1, 3, 4, 5);
- ``defenses_{dataset}_{training}.{csv,md}`` — rows attacks, columns defense × (ACC, ASR, RA, PGD,
  nDER), with the Average and Worst Case rows (A-ABL Table 3's and VSSC Tables 3–4's layout);
- ``splits_{defense}.{csv,md}`` — a splitting defense's γ and ρ_vul, rows attacks, columns dataset
  (A-ABL Table 1);
- ``scores_{dataset}_{training}_{defense}.png`` — a splitting defense's per-sample scores, clean vs
  poisoned with its thresholds, one row per attack, the lowest seed (the ``scores.npz`` beside each
  defense model; A-ABL Figs. 4, 9, 11);
- ``sweeps.{csv,md}`` — every value of a swept key (``{sweep: [...]}``, :mod:`poisonflow.sweeps`)
  with ACC and ASR, and the value of lowest mean ASR marked (the papers' choice, made on test data);
- ``sweep_{entry}.png`` (and ``.csv``) — ASR, ACC and RA against a swept numeric key, one line per
  attack (A-ABL Figs. 3, 5, 6: ASR against ε, iFGSM steps, the adversarial-training budget);
- ``sweeps_chosen.{csv,md}`` — each swept entry at its lowest-ASR value only (the papers' tables);
- ``detections.{csv,md}`` — the classes a detecting defense (GSSD) flagged, per seed;
- ``runtime.{csv,md}`` — wall-clock time of each defense's jobs and of the features job it reads,
  and GSSD's stages (GSSD Tables G.1 and G.2), from the rules' benchmark files and the jobs' clocks;
- ``robustness.{csv,md}`` — ACC, ASR and RA of the victims under each robustness entry's
  distortion levels (or on its folder), mean ± std over seeds; ``robustness_{dataset}_{training}_{entry}.png``
  (and ``.csv``) — those metrics against the level, one line per attack (VSSC Fig. 4, Table 5);
- ``efficiency.{csv,md}`` — seconds spent generating each poisoned set: the generation time the
  poison stage records in its store (``timing.generation_seconds``: the attack's own computation,
  without process start-up, reading or writing), next to the whole job's wall-clock and CPU
  seconds from the poison rule's Snakemake benchmark files (``--benchmarks``; TriggerUE, Table 2).

Every table view is also written as ``.tex`` and every figure as ``.pdf``; ``report/index.md``
lists the views that were written.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from .common import parse_json, read_json
from ..figures import (SELECTION_NAMES, attack_label, display_name, rate_curves, save_figure, selection_label,
                       sweep_curves, transfer_heatmap, unique_labels)


class _OnUse:
    """A module imported on first attribute access: pandas costs half a second, and
    ``poisonflow aggregate --help`` should not pay it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self._name), attribute)


pd = _OnUse("pandas")

KEYS = ["dataset", "attack", "training", "defense"]
# fractions in [0, 1], shown in percent in the summary table, in this order; other metrics
# (counts, thresholds, timings) stay in metrics.csv only
TABLE_METRICS = ["acc", "asr", "ra", "pgd_acc", "gamma", "rho_vul", "poison_removed", "clean_lost",
                 "targets_detected", "relabel_accuracy", "nder", "auroc", "tpr", "fpr"]
SKIP = {"device", "train_seconds", "defense_seconds"}

# Paper names of metrics in the report tables.
METRIC_NAMES = {"acc": "BA", "asr": "ASR", "auroc": "AUROC", "tpr": "TPR", "fpr": "FPR", "nder": "nDER"}
SELECTION_METRICS = ["acc", "asr", "auroc", "tpr", "fpr"]
# Attack parameters that tell settings apart in the report views (selection and surrogate are
# the views' own axes). Each is shown, where it varies, as "name value" (or the bare value).
SETTING_FIELDS = ["dataset", "kind", "label_mode", "rate", "target", "pattern", "training", "defense"]
BARE_FIELDS = {"dataset", "kind", "label_mode", "pattern", "training", "defense"}


def add_arguments(parser) -> None:
    parser.add_argument("--results", default="results", metavar="DIR", help="results directory (default: results)")
    parser.add_argument("--metrics", nargs="*", default=[], metavar="JSON",
                        help="defense metrics.json files, at results/defenses/DATASET/ATTACK/TRAINING/seedN/DEFENSE/")
    parser.add_argument("--undefended", nargs="*", default=[], metavar="DEFENSE=JSON",
                        help="a defenses entry of kind none and a victim metrics.json it stands for "
                             "(results/victims/DATASET/ATTACK/TRAINING/seedN/metrics.json): no job copies it")
    parser.add_argument("--experiment", metavar="JSON",
                        help="resolved entries of the config's jobs and the config order of the names (JSON); "
                             "without it only metrics.csv, the summary tables and the summary figure are written")
    parser.add_argument("--benchmarks", nargs="*", default=[], metavar="TSV",
                        help="the poison rule's Snakemake benchmark files (job wall-clock and CPU seconds)")
    parser.add_argument("--defense-benchmarks", nargs="*", default=[], metavar="TSV",
                        help="the defense rule's benchmark files, results/benchmarks/defense/DATASET/ATTACK/"
                             "TRAINING/seedN/DEFENSE.tsv (the runtime view)")
    parser.add_argument("--robustness", nargs="*", default=[], metavar="JSON",
                        help="robustness jobs' results (results/robustness/.../{entry}.json)")
    parser.add_argument("--features-benchmarks", nargs="*", default=[], metavar="TSV",
                        help="the features rules' benchmark files, results/benchmarks/features/DATASET/ATTACK/"
                             "FEATURES/seedN.tsv (the runtime view)")


# --------------------------------------------------------------------------------------------
# metrics.csv and the summary
# --------------------------------------------------------------------------------------------

def parse_path(path: Path, results: Path, defense: str | None = None) -> dict:
    """results/defenses/{dataset}/{attack}/{training}/seed{seed}/{defense}/metrics.json → keys;
    with ``defense`` (a `kind: none` entry), the victim's results/victims/.../seed{seed}/metrics.json."""
    if defense is not None:
        parts = path.resolve().relative_to((results / "victims").resolve()).parts
        if len(parts) != 5 or not parts[3].startswith("seed"):
            raise ValueError(f"{path}: not a victim metrics path")
        parts = (*parts[:4], defense)
    else:
        parts = path.resolve().relative_to((results / "defenses").resolve()).parts
        if len(parts) != 6 or not parts[3].startswith("seed"):
            raise ValueError(f"{path}: not a defense metrics path")
    return {"dataset": parts[0], "attack": parts[1], "training": parts[2], "seed": int(parts[3][4:]),
            "defense": parts[4]}


def undefended(pairs: list[str]) -> list[tuple[Path, str]]:
    """``DEFENSE=PATH`` arguments → (victim metrics path, defense name)."""
    return [(Path(path), name) for name, _, path in (pair.partition("=") for pair in pairs)]


def read_metrics(paths: list, results: Path) -> list[tuple[dict, dict]]:
    """(keys from the path, the metrics) of each metrics.json: a defense path, or a (victim path,
    defense) pair; each file read once for every view."""
    records = []
    for item in paths:
        path, defense = item if isinstance(item, tuple) else (item, None)
        records.append((parse_path(path, results, defense), read_json(path)))
    return records


def tidy(paths: list, results: Path, records: list | None = None) -> pd.DataFrame:
    """One row per metric of each metrics.json (``records``: :func:`read_metrics` of ``paths``, when
    already read)."""
    rows = []
    for keys, metrics in records if records is not None else read_metrics(paths, results):
        for metric, value in metrics.items():
            if metric in SKIP or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            rows.append({**keys, "metric": metric, "value": float(value)})
    columns = ["dataset", "attack", "training", "defense", "seed", "metric", "value"]
    return pd.DataFrame(rows, columns=columns).sort_values(columns[:6]).reset_index(drop=True)


def sample_std(values) -> float:
    """Sample standard deviation (ddof 1); NaN for a single value, where there is none."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """mean, std (NaN for a single seed) and n per (dataset, attack, training, defense, metric)."""
    grouped = table.groupby(KEYS + ["metric"], sort=False)["value"]
    stats = grouped.agg(mean="mean", std=sample_std, n="count")
    return stats.reset_index()


def cell(mean: float, std: float) -> str:
    """'mean ± std' of fractions, in percent; 'mean ± –' where there is no std (a single seed)."""
    if std is None or not math.isfinite(std):
        return f"{100 * mean:.2f} ± –"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def formatted(summary: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Wide table of 'mean ± std' in percent, one column per metric of ``metrics`` present."""
    shown = summary[summary["metric"].isin(metrics)]
    cells = shown.assign(cell=[cell(m, s) for m, s in zip(shown["mean"], shown["std"])])
    wide = cells.pivot_table(index=KEYS, columns="metric", values="cell", aggfunc="first", sort=False)
    wide = wide[[m for m in metrics if m in wide.columns]].reset_index().fillna("–")
    wide.columns.name = None
    n = summary.groupby(KEYS, sort=False)["n"].max().reset_index()
    return wide.merge(n.rename(columns={"n": "seeds"}), on=KEYS)


def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def row_labels(rows: pd.DataFrame, experiment: dict | None = None) -> tuple[list[str], str]:
    """Display labels of summary rows (the keys that vary between them) and a title naming the
    keys they all share: dataset, attack, training and defense shown as a paper would write them."""
    attacks = (experiment or {}).get("attacks", {})
    names = list(dict.fromkeys(rows["attack"]))
    attack_names = dict(zip(names, unique_labels(names, [attack_label(n, attacks.get(n)) for n in names])))
    shown = {"dataset": display_name, "attack": attack_names.get, "training": str, "defense": display_name}
    varying_keys = [k for k in KEYS if rows[k].nunique() > 1] or ["attack"]
    labels = [" / ".join(shown[k](row[k]) for k in varying_keys) for _, row in rows.iterrows()]
    title = ", ".join(shown[k](rows[k].iloc[0]) for k in KEYS if k not in varying_keys)
    return labels, title


def plot(summary: pd.DataFrame, path: Path, experiment: dict | None = None) -> Path:
    """ACC and ASR (%) per summary row as horizontal bars with the std over seeds (none for a
    single seed), on a fixed 0–100 % axis; PNG and PDF."""
    from ..figures import _pyplot

    plt = _pyplot()
    metrics = [m for m in ("acc", "asr") if m in set(summary["metric"])]
    groups = summary[summary["metric"].isin(metrics)]
    keys = groups[KEYS].drop_duplicates().reset_index(drop=True)
    labels, title = row_labels(keys, experiment)
    index = pd.MultiIndex.from_frame(keys)
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(5 * max(1, len(metrics)), 0.35 * len(labels) + 1.8),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        part = groups[groups["metric"] == metric].set_index(KEYS).reindex(index)
        y = np.arange(len(labels))
        ax.barh(y, 100 * part["mean"].to_numpy(float), xerr=100 * np.nan_to_num(part["std"].to_numpy(float)),
                color="tab:blue" if metric == "acc" else "tab:red")
        ax.set_yticks(y, labels if ax is axes[0][0] else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"{display_name(metric)} (%), mean ± std over seeds")
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _atomic_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
LATEX_SYMBOLS = {"±": r"$\pm$", "–": "--", "γ": r"$\gamma$", "ρ": r"$\rho$", "†": r"$^\dagger$", "×": r"$\times$"}


def latex_text(value) -> str:
    """A table cell as LaTeX text: special characters escaped, ± – γ ρ † × as LaTeX."""
    text = "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(value))
    for symbol, latex in LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


def to_latex(table: pd.DataFrame, note: str = "", header: dict | None = None) -> str:
    """A booktabs ``tabular`` of ``table`` (``\\usepackage{booktabs}``); ``note`` as a comment
    above it; ``header`` renames columns (e.g. metric names to the papers' BA, ASR)."""
    header = header or {}
    numeric = [_numeric_column(table[c]) for c in table.columns]
    spec = "".join("r" if n else "l" for n in numeric)
    lines = [f"% {line}" for line in note.splitlines() if line.strip()]
    lines += ["% requires \\usepackage{booktabs}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
              " & ".join(latex_text(header.get(c, c)) for c in table.columns) + r" \\", "\\midrule"]
    lines += [" & ".join(latex_text(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _looks_numeric(value) -> bool | None:
    """True for numbers, 'mean ± std' cells and durations; None for a dash (no value); else False."""
    parts = [part for part in str(value).replace("±", " ").replace("%", " ").replace("†", " ").split()
             if part not in ("s", "min", "h", "–")]
    if not parts:
        return None
    try:
        [float(part) for part in parts]
    except ValueError:
        return False
    return True


def _numeric_column(values) -> bool:
    kinds = [_looks_numeric(v) for v in values]
    return False not in kinds and True in kinds


# --------------------------------------------------------------------------------------------
# Entry parameters: which rate, target, pattern, selection and models each summary row has
# --------------------------------------------------------------------------------------------

def _arch(training: dict | None) -> str | None:
    return training["model"]["arch"] if training else None


def attack_parameters(name: str, entry: dict) -> dict:
    """The parameters of a resolved attacks entry that the report views group and sort by.

    ``selection`` is None for kinds without one (unlearnable examples); ``surrogate_arch`` is the
    architecture of the model whose scores pick the samples, for hard-sample selection only.
    """
    trigger = entry.get("trigger") or {}
    selection = entry.get("selection", "random" if "label_mode" in entry else None)
    surrogate = entry.get("surrogate_entry")
    chooses = selection not in (None, "random") and surrogate is not None
    return {"attack": name, "kind": entry["kind"], "label_mode": entry.get("label_mode"), "rate": entry.get("rate"),
            "target": entry.get("target"), "pattern": trigger.get("pattern"), "selection": selection,
            "surrogate": entry.get("surrogate") if chooses else None,
            "surrogate_arch": _arch(surrogate["training"]) if chooses else None}


def experiment_parameters(experiment: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(attack parameters, training parameters, config order of each key) from ``--experiment``.

    ``experiment`` = {"attacks": {name: resolved entry}, "trainings": {name: resolved entry},
    "defenses": {name: entry}, "order": {"dataset"|"attack"|"training"|"defense": [names]}}.
    """
    # object columns: integer targets stay integers next to the None of unlearnable kinds
    attacks = pd.DataFrame([attack_parameters(n, e) for n, e in experiment.get("attacks", {}).items()],
                           columns=["attack", "kind", "label_mode", "rate", "target", "pattern", "selection",
                                    "surrogate", "surrogate_arch"], dtype=object)
    trainings = pd.DataFrame([{"training": n, "victim_arch": _arch(e)} for n, e in experiment.get("trainings", {}).items()],
                             columns=["training", "victim_arch"])
    return attacks, trainings, experiment.get("order", {})


def annotate(summary: pd.DataFrame, experiment: dict) -> pd.DataFrame:
    """The summary with each row's attack and training parameters as extra columns."""
    attacks, trainings, _ = experiment_parameters(experiment)
    return summary.merge(attacks, on="attack", how="left").merge(trainings, on="training", how="left")


def setting_label(row: pd.Series, fields: list[str]) -> str:
    """'blended, target 2' from the fields that vary: bare values for names, 'field value' for numbers."""
    parts = [str(row[f]) if f in BARE_FIELDS else f"{f} {row[f]}" for f in fields]
    return ", ".join(parts) if parts else "all"


def varying(table: pd.DataFrame, fields: list[str]) -> list[str]:
    return [f for f in fields if table[f].astype(str).nunique() > 1]


def _ordered(values, order: list[str]) -> list:
    """Distinct ``values`` in config order (names not in ``order`` after, in order of appearance)."""
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


# --------------------------------------------------------------------------------------------
# Report views
# --------------------------------------------------------------------------------------------

def selection_table(annotated: pd.DataFrame, metrics: list[str] = SELECTION_METRICS) -> pd.DataFrame | None:
    """Rows: selection × metric; columns: the settings (attack kind, pattern, target, defense…).

    None when the backdoor attacks use fewer than two selections, or when two attacks would
    share a cell (they differ only in something this layout has no axis for, e.g. the surrogate).
    """
    part = annotated[annotated["selection"].notna() & annotated["metric"].isin(metrics)].copy()
    if part.empty or part["selection"].nunique() < 2:
        return None
    fields = varying(part, SETTING_FIELDS)
    part["setting"] = [setting_label(row, fields) for _, row in part.iterrows()]
    if part.duplicated(["selection", "setting", "metric"]).any():
        return None
    settings = list(dict.fromkeys(part["setting"]))
    rows = []
    for selection in [s for s in SELECTION_NAMES if s in set(part["selection"])] + \
            sorted(set(part["selection"]) - set(SELECTION_NAMES)):
        for metric in [m for m in metrics if m in set(part["metric"])]:
            cells = part[(part["selection"] == selection) & (part["metric"] == metric)].set_index("setting")
            row = {"method": selection_label(selection), "metric": METRIC_NAMES.get(metric, metric)}
            for setting in settings:
                row[setting] = cell(cells.at[setting, "mean"], cells.at[setting, "std"]) if setting in cells.index else "–"
            rows.append(row)
    return pd.DataFrame(rows, columns=["method", "metric", *settings])


def rate_sweep(annotated: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """panel, selection, rate, mean, std of ``metric`` for settings swept over ≥ 2 poisoning rates.

    A panel is a setting (everything but rate and selection); a panel where two attacks share a
    (selection, rate) point — e.g. differing only in surrogate — is left out.
    """
    part = annotated[annotated["selection"].notna() & (annotated["metric"] == metric)].copy()
    if part.empty:
        return None
    group_fields = [f for f in SETTING_FIELDS if f != "rate"]
    fields = varying(part, group_fields)
    part["panel"] = [setting_label(row, fields) if fields else f"{row['dataset']}, {row['kind']}"
                     for _, row in part.iterrows()]
    keep = [panel for panel, rows in part.groupby("panel", sort=False)
            if rows["rate"].nunique() >= 2 and not rows.duplicated(["selection", "rate"]).any()]
    if not keep:
        return None
    curves = part[part["panel"].isin(keep)][["panel", "selection", "rate", "mean", "std"]]
    return curves.astype({"rate": float}).sort_values(["panel", "selection", "rate"], kind="stable").reset_index(drop=True)


def _model_labels(names_to_arch: dict) -> dict:
    """Label models by architecture, or by entry name where two entries share an architecture."""
    archs = list(names_to_arch.values())
    return {n: a if archs.count(a) == 1 else n for n, a in names_to_arch.items()}


def transfer_matrices(annotated: pd.DataFrame, order: dict, metric: str = "asr") -> dict:
    """selection → {panel → table}: mean ``metric`` of hard-selection attacks, rows: the surrogate
    model that chose the samples, columns: the victim model; the first row, ``Vanilla``, is random
    selection on each victim. Empty unless the surrogate or the victim architecture varies.
    """
    part = annotated[annotated["selection"].notna() & (annotated["metric"] == metric)].copy()
    hard = part[part["selection"] != "random"]
    if hard.empty or (hard["surrogate"].nunique() < 2 and part["training"].nunique() < 2):
        return {}
    victims = _model_labels(dict(zip(part["training"], part["victim_arch"])))
    sources = _model_labels(dict(zip(hard["surrogate"], hard["surrogate_arch"])))
    group_fields = [f for f in SETTING_FIELDS if f != "training"]
    fields = varying(part, group_fields)
    part["panel"] = [setting_label(row, fields) if fields else f"{row['dataset']}, {row['kind']}"
                     for _, row in part.iterrows()]
    columns = [victims[t] for t in _ordered(part["training"], order.get("training", []))]
    out: dict = {}
    for selection in [s for s in SELECTION_NAMES if s in set(hard["selection"])]:
        for panel, rows in part.groupby("panel", sort=False):
            chosen = rows[rows["selection"] == selection]
            if chosen.empty:
                continue
            vanilla = rows[rows["selection"] == "random"]
            matrix = pd.DataFrame(np.nan, index=["Vanilla"] + [sources[s] for s in dict.fromkeys(chosen["surrogate"])],
                                  columns=columns)
            for _, row in vanilla.iterrows():
                matrix.at["Vanilla", victims[row["training"]]] = row["mean"]
            for _, row in chosen.iterrows():
                matrix.at[sources[row["surrogate"]], victims[row["training"]]] = row["mean"]
            if vanilla.empty:
                matrix = matrix.drop(index="Vanilla")
            out.setdefault(selection, {})[panel] = matrix
    return out


def unlearnable_table(annotated: pd.DataFrame, order: dict) -> pd.DataFrame | None:
    """Clean test accuracy (mean ± std, %) of the attacks that have no ASR set — unlearnable
    examples and clean baselines — rows: attack (config order), columns: what varies among
    dataset, training and defense."""
    with_asr = set(annotated.loc[annotated["metric"] == "asr", "attack"])
    part = annotated[~annotated["attack"].isin(with_asr) & (annotated["metric"] == "acc")].copy()
    if part.empty:
        return None
    fields = varying(part, ["dataset", "training", "defense"])
    part["setting"] = [setting_label(row, fields) if fields else "acc" for _, row in part.iterrows()]
    settings = list(dict.fromkeys(part["setting"]))
    rows = []
    for attack in _ordered(part["attack"], order.get("attack", [])):
        cells = part[part["attack"] == attack].set_index("setting")
        rows.append({"method": attack, **{s: cell(cells.at[s, "mean"], cells.at[s, "std"]) if s in cells.index
                                          else "–" for s in settings}})
    return pd.DataFrame(rows, columns=["method", *settings])


LAYOUT_METRICS = (("acc", "ACC"), ("asr", "ASR"), ("ra", "RA"), ("pgd_acc", "PGD"), ("nder", "nDER"))
LAYOUT_NOTE = ("Values in %, mean over seeds. Rows: attacks (a row without ASR is an attack-free baseline: "
               "\"----\" in the A-ABL paper); columns: defense × metric. RA: triggered test images classified as "
               "their true class (BackdoorBench's and the VSSC paper's RA); PGD: clean accuracy under the "
               "evaluation's PGD (what the A-ABL paper calls RA); nDER: the VSSC paper's normalized defense "
               "effectiveness rating. Average and Worst Case over the attacks with an ASR: mean, and the lowest "
               "ACC, RA, PGD and nDER and the highest ASR.")


def defense_layouts(annotated: pd.DataFrame, order: dict) -> dict:
    """The papers' defense tables (A-ABL Table 3, VSSC Tables 3–4): one per (dataset, training) with at
    least two defenses and an attack with an ASR; rows attacks, columns defense × (ACC, ASR, RA, PGD,
    nDER, those measured), then the Average and Worst Case rows."""
    layouts = {}
    for (dataset, training), part in annotated.groupby(["dataset", "training"], sort=False):
        defenses = _ordered(part["defense"], order.get("defense", []))
        with_asr = _ordered(part.loc[part["metric"] == "asr", "attack"], order.get("attack", []))
        if len(defenses) < 2 or not with_asr:
            continue
        present = set(part["metric"])
        metrics = [(m, label) for m, label in LAYOUT_METRICS if m in present]
        means = part.set_index(["attack", "defense", "metric"])["mean"]
        columns = [f"{d} {label}" for d in defenses for _, label in metrics]
        rows, values = [], {}
        for attack in _ordered(part["attack"], order.get("attack", [])):
            row = {"attack": attack}
            for d in defenses:
                for m, label in metrics:
                    value = means.get((attack, d, m), float("nan"))
                    row[f"{d} {label}"] = f"{100 * value:.2f}" if np.isfinite(value) else "–"
                    if attack in with_asr:
                        values.setdefault(f"{d} {label}", []).append(value)
            rows.append(row)
        worst = {"ACC": np.nanmin, "ASR": np.nanmax, "RA": np.nanmin, "PGD": np.nanmin, "nDER": np.nanmin}
        for name, reduce in (("Average", lambda label: np.nanmean), ("Worst Case", lambda label: worst[label])):
            row = {"attack": name}
            for column in columns:
                column_values = np.asarray(values.get(column, []), dtype=float)
                label = column.rsplit(" ", 1)[1]
                row[column] = (f"{100 * reduce(label)(column_values):.2f}" if np.isfinite(column_values).any() else "–")
            rows.append(row)
        layouts[(dataset, training)] = pd.DataFrame(rows, columns=["attack", *columns])
    return layouts


SPLITS_NOTE = ("Values in %, mean ± std over seeds (– : one seed). γ: the share of the released training set the "
               "defense's split keeps; ρ_vul: the poison share among the kept samples (A-ABL Table 1). Rows: attacks; "
               "columns: dataset (and training, where a dataset has several) × metric.")


def split_layouts(annotated: pd.DataFrame, order: dict) -> dict:
    """A splitting defense's split quality as A-ABL's Table 1: one table per defense that reports
    ``gamma`` below 1 somewhere; rows attacks, columns (dataset[, training]) × (γ, ρ_vul), mean ± std."""
    layouts = {}
    part = annotated[annotated["metric"].isin(["gamma", "rho_vul"])]
    for defense in _ordered(part["defense"], order.get("defense", [])):
        rows = part[part["defense"] == defense]
        gamma = rows.loc[rows["metric"] == "gamma", "mean"]
        if gamma.empty or (gamma >= 1.0).all():  # keeps every sample (trains on all of them): no split
            continue
        settings = list(dict.fromkeys(zip(rows["dataset"], rows["training"])))
        several = {d for d, _ in settings if sum(1 for other, _ in settings if other == d) > 1}
        label = {(d, t): f"{d} {t}" if d in several else d for d, t in settings}
        cells = rows.set_index(["attack", "dataset", "training", "metric"])
        table = []
        for attack in _ordered(rows["attack"], order.get("attack", [])):
            row = {"attack": attack}
            for setting in settings:
                for metric, name in (("gamma", "γ"), ("rho_vul", "ρ_vul")):
                    key = (attack, *setting, metric)
                    row[f"{label[setting]} {name}"] = (cell(cells.loc[key, "mean"], cells.loc[key, "std"])
                                                       if key in cells.index else "–")
            table.append(row)
        layouts[defense] = pd.DataFrame(table)
    return layouts


# --------------------------------------------------------------------------------------------
# Generation time (Snakemake benchmark files of the poison rule)
# --------------------------------------------------------------------------------------------

def parse_benchmark_path(path: Path, results: Path) -> dict:
    """results/benchmarks/poison/{dataset}/{attack}/seed{seed}.tsv → keys."""
    parts = path.resolve().relative_to((results / "benchmarks" / "poison").resolve()).parts
    if len(parts) != 3 or not (parts[2].startswith("seed") and parts[2].endswith(".tsv")):
        raise ValueError(f"{path}: not a poison benchmark path")
    return {"dataset": parts[0], "attack": parts[1], "seed": int(parts[2][4:-4])}


def recorded_generation_seconds(results: Path, dataset: str, attack: str, seed: int) -> float:
    """The generation time the poison stage recorded in the store's attributes (``timing``), read
    from its ``zarr.json``; NaN when the store or the record is missing."""
    path = results / "poison" / dataset / attack / f"seed{seed}.zarr" / "zarr.json"
    try:
        timing = (json.loads(path.read_text()).get("attributes") or {}).get("timing") or {}
        return float(timing["generation_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("nan")


def read_benchmarks(paths: list[Path], results: Path) -> pd.DataFrame:
    """dataset, attack, seed, seconds, cpu_seconds, generation_seconds of each poison job:

    - ``seconds``: wall clock of the whole job (``s`` of the Snakemake benchmark file: process
      start-up, imports, reading, generation and writing);
    - ``cpu_seconds``: its CPU time (``cpu_time``; NaN where the file has none);
    - ``generation_seconds``: the generation alone, as recorded in the poisoned store (NaN for a
      store written before it was recorded).

    A benchmark file with several rows (``--benchmark-repeats``) contributes their mean.
    """
    rows = []
    for path in paths:
        bench = pd.read_csv(path, sep="\t")
        keys = parse_benchmark_path(Path(path), results)
        cpu = pd.to_numeric(bench["cpu_time"], errors="coerce").mean() if "cpu_time" in bench else float("nan")
        rows.append({**keys, "seconds": float(bench["s"].astype(float).mean()), "cpu_seconds": float(cpu),
                     "generation_seconds": recorded_generation_seconds(results, **keys)})
    return pd.DataFrame(rows, columns=["dataset", "attack", "seed", "seconds", "cpu_seconds", "generation_seconds"])


def job_seconds(paths: list, results: Path, kind: str) -> pd.DataFrame:
    """Wall-clock seconds of the defense or features jobs from their benchmark files: dataset,
    attack, seed, name (the training/defense pair, or the features entry) and seconds."""
    rows = []
    for path in paths:
        parts = Path(path).resolve().relative_to((results / "benchmarks" / kind).resolve()).parts
        bench = pd.read_csv(path, sep="\t")
        seconds = float(bench["s"].astype(float).mean())
        if kind == "defense":  # dataset/attack/training/seedN/defense.tsv
            rows.append({"dataset": parts[0], "attack": parts[1], "training": parts[2], "seed": int(parts[3][4:]),
                         "name": parts[4][:-4], "seconds": seconds})
        else:  # dataset/attack/features/seedN.tsv
            rows.append({"dataset": parts[0], "attack": parts[1], "training": None, "seed": int(parts[3][4:-4]),
                         "name": parts[2], "seconds": seconds})
    return pd.DataFrame(rows, columns=["dataset", "attack", "training", "seed", "name", "seconds"])


RUNTIME_NOTE = ("Wall-clock time per defense job, mean over attacks and seeds (Snakemake benchmark files: the "
                "whole job, start-up included). features: the features job the defense reads (one per poisoned "
                "set, shared by every defense naming it); total: both (GSSD Table G.1). For GSSD its stages "
                "(Table G.2): SimCLR (the features job), flows (fitting, detection, filtering), retraining "
                "(from scratch and the fine-tuning), from the job's own clock.")


def runtime_table(defenses: pd.DataFrame, features: pd.DataFrame, experiment: dict, metrics: pd.DataFrame,
                  order: dict) -> pd.DataFrame | None:
    """Rows: (dataset, defense); columns: defense job, features job, total, and GSSD's stages."""
    if defenses.empty:
        return None
    entries = experiment.get("defenses", {})
    rows = []
    for (dataset, defense), part in defenses.groupby(["dataset", "name"], sort=False):
        row = {"dataset": dataset, "defense": defense, "defense job": duration(part["seconds"].mean())}
        total = part["seconds"].to_numpy(dtype=float)
        name = (entries.get(defense) or {}).get("features")
        if name is not None and not features.empty:
            shared = features[(features["name"] == name) & (features["dataset"] == dataset)].set_index(["attack", "seed"])
            matched = [shared.at[(a, s), "seconds"] if (a, s) in shared.index else float("nan")
                       for a, s in zip(part["attack"], part["seed"])]
            row["features job"] = duration(float(np.nanmean(matched))) if np.isfinite(matched).any() else "–"
            total = total + np.nan_to_num(np.asarray(matched, dtype=float))
        else:
            row["features job"] = "–"
        row["total"] = duration(float(total.mean()))
        stages = metrics[(metrics["dataset"] == dataset) & (metrics["defense"] == defense)]
        for metric, label in (("flows_seconds", "flows"), ("retrain_seconds", "retraining")):
            values = stages[stages["metric"] == metric]["value"]
            row[label] = duration(float(values.mean())) if len(values) else "–"
        rows.append(row)
    table = pd.DataFrame(rows)
    defense_order = order.get("defense", [])
    table["_order"] = [defense_order.index(d) if d in defense_order else len(defense_order) for d in table["defense"]]
    return table.sort_values(["dataset", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def duration(seconds: float) -> str:
    """Seconds as the papers write times: s below two minutes, min below two hours, else h."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


EFFICIENCY_NOTE = (
    "Time to generate each poisoned training set, mean over seeds: the attack's own computation in the "
    "poison job (trigger building, surrogate-based optimisation, sample selection and image generation), "
    "recorded by the job in the store's `timing` attribute. Not included: process start-up (importing "
    "torch), reading the clean store and the surrogate, and writing the store. A value marked † is the "
    "whole job's wall clock (the store records no generation time). efficiency.csv also has each job's "
    "wall-clock and CPU seconds from Snakemake's benchmark files.")


def efficiency_table(benchmarks: pd.DataFrame, order: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(long table: dataset, attack, runs, generation_seconds_mean/_std, seconds_mean/_std (job
    wall clock), cpu_seconds_mean; wide table: attack × dataset of the mean generation time, or of
    the job's wall clock marked † where no generation time is recorded, in config order)."""
    frame = benchmarks.copy()
    for column in ("cpu_seconds", "generation_seconds"):
        if column not in frame:
            frame[column] = float("nan")
    grouped = frame.groupby(["dataset", "attack"], sort=False)
    long = grouped.agg(runs=("seconds", "count"),
                       generation_seconds_mean=("generation_seconds", "mean"),
                       generation_seconds_std=("generation_seconds", lambda v: sample_std(v.dropna())),
                       seconds_mean=("seconds", "mean"), seconds_std=("seconds", sample_std),
                       cpu_seconds_mean=("cpu_seconds", "mean")).reset_index()
    datasets = _ordered(long["dataset"], order.get("dataset", []))
    rows = []
    for attack in _ordered(long["attack"], order.get("attack", [])):
        cells = long[long["attack"] == attack].set_index("dataset")
        row = {"method": attack}
        for d in datasets:
            if d not in cells.index:
                row[d] = "–"
            elif math.isfinite(cells.at[d, "generation_seconds_mean"]):
                row[d] = duration(cells.at[d, "generation_seconds_mean"])
            else:
                row[d] = duration(cells.at[d, "seconds_mean"]) + " †"
        rows.append(row)
    return long, pd.DataFrame(rows, columns=["method", *datasets])


# --------------------------------------------------------------------------------------------
# Writing the report
# --------------------------------------------------------------------------------------------

def _write_table(table: pd.DataFrame, stem: Path, note: str, header: dict | None = None) -> list[str]:
    """``stem``.csv, .md (with ``note``) and .tex (booktabs, ``note`` as a comment)."""
    _atomic_text(table.to_csv(index=False), stem.with_suffix(".csv"))
    _atomic_text(f"{note}\n\n" + to_markdown(table), stem.with_suffix(".md"))
    _atomic_text(to_latex(table, note, header), stem.with_suffix(".tex"))
    return [stem.with_suffix(".md").name, stem.with_suffix(".csv").name, stem.with_suffix(".tex").name]


def _figure_files(png: Path) -> list[str]:
    return [png.name, png.with_suffix(".pdf").name]


SWEEP_NOTE = ("ACC and ASR in %, mean ± std over seeds (– : one seed), one row per swept value. "
              "chosen: the value with the lowest mean ASR, as the GSSD appendix picks NAD's β and ABL's γ; "
              "that choice reads the test set, which a defender does not have.")


def sweep_table(summary: pd.DataFrame, sweeps: dict) -> pd.DataFrame | None:
    """Rows: (dataset, attack, training, swept entry, value) of every swept defense or attack, with
    ACC and ASR and the value of lowest mean ASR per (dataset, attack, training, swept entry)."""
    rows = []
    for section, field in (("defenses", "defense"), ("attacks", "attack")):
        for base, variants in sweeps.get(section, {}).items():
            part = summary[summary[field].isin(list(variants))]
            others = [k for k in ("dataset", "attack", "training", "defense") if k != field]
            for keys, group in part.groupby(others, sort=False):
                means = group[group["metric"] == "asr"].set_index(field)["mean"]
                chosen = means.idxmin() if len(means) and means.notna().any() else None
                for variant, values in variants.items():
                    cells = group[group[field] == variant].set_index("metric")
                    if cells.empty:
                        continue
                    row = dict(zip(others, keys))
                    row.update({"swept": f"{section}.{base}", "value": ", ".join(f"{k} {v}" for k, v in values.items())})
                    for metric in ("acc", "asr"):
                        row[metric] = cell(cells.at[metric, "mean"], cells.at[metric, "std"]) if metric in cells.index else "–"
                    row["chosen"] = "✓" if variant == chosen else ""
                    rows.append(row)
    if not rows:
        return None
    return pd.DataFrame(rows)


def sweep_curve_frames(summary: pd.DataFrame, sweeps: dict) -> dict:
    """For each swept entry with one numeric swept key: (its key, the curves: metric, line, value,
    mean, std), a line per attack (a swept defense) or per defense (a swept attack)."""
    frames = {}
    for section, field, other in (("defenses", "defense", "attack"), ("attacks", "attack", "defense")):
        for base, variants in sweeps.get(section, {}).items():
            keys = {key for values in variants.values() for key in values}
            if len(keys) != 1:
                continue
            key = keys.pop()
            numbers = {name: values[key] for name, values in variants.items()}
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values()):
                continue
            part = summary[summary[field].isin(list(numbers)) & summary["metric"].isin(["asr", "acc", "pgd_acc"])]
            if part.empty:
                continue
            lines = part[other] if part[["dataset", "training"]].drop_duplicates().shape[0] == 1 else (
                part[other] + " (" + part["dataset"] + ", " + part["training"] + ")")
            frames[(section, base)] = (key, pd.DataFrame({
                "metric": part["metric"].to_numpy(), "line": lines.to_numpy(),
                "value": [float(numbers[v]) for v in part[field]], "mean": part["mean"].to_numpy(),
                "std": part["std"].to_numpy()}))
    return frames


CHOSEN_NOTE = ("The paper's choice for each swept entry: the value of lowest mean ASR (ACC and ASR in %, mean ± std "
               "over seeds). This choice reads the test set, as the GSSD paper's searches of NAD's β and ABL's γ "
               "did; a defender could not make it. Every value: sweeps.md.")


def chosen_table(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`sweep_table` marked chosen, the swept entry named by its base name."""
    chosen = table[table["chosen"] == "✓"].drop(columns="chosen").copy()
    chosen["swept"] = [name.split(".", 1)[1] for name in chosen["swept"]]
    return chosen.rename(columns={"swept": "entry", "value": "chosen value"}).reset_index(drop=True)


def detection_rows(records: list[tuple[dict, dict]]) -> pd.DataFrame:
    """Per defense job that names attacked classes (``detected_classes`` in its metrics.json): the
    classes and the attack type of each, per seed (``records``: :func:`read_metrics`)."""
    rows = []
    for keys, metrics in records:
        if "detected_classes" not in metrics:
            continue
        types = metrics.get("attack_types") or [""] * len(metrics["detected_classes"])
        shown = ", ".join(f"{c} ({'D' if t == 'disruptive' else 'ND' if t else '?'})"
                          for c, t in zip(metrics["detected_classes"], types)) or "none"
        rows.append({**keys, "detected": shown})
    return pd.DataFrame(rows, columns=["dataset", "attack", "training", "seed", "defense", "detected"])


def detection_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    """One row per (dataset, attack, training, defense): the classes detected in each seed."""
    if rows.empty:
        return None
    rows = rows.sort_values("seed", kind="stable")
    grouped = rows.groupby(KEYS, sort=False).apply(
        lambda g: "; ".join(f"seed {s}: {d}" for s, d in zip(g["seed"], g["detected"])), include_groups=False)
    return grouped.rename("detected classes").reset_index()


ROBUSTNESS_NOTE = ("Victims under test-time distortions (robustness entries): ACC on the distorted clean test set, "
                   "ASR and RA on the distorted ASR set, in %, mean ± std over seeds (– : one seed); clean → target: "
                   "the distorted clean images of the other classes predicted as the target, the ASR a distortion "
                   "gives without a trigger (a trigger survives where ASR stays above it). "
                   "level: blur kernel size, JPEG quality, noise σ (0–255), recapture strength, iFGSM ε (0–255) "
                   "or steps; – for a folder.")
ROBUSTNESS_COLUMNS = {"acc": "ACC", "asr": "ASR", "ra": "RA", "target_rate": "clean → target"}
ROBUSTNESS_METRICS = {"acc": "ACC (%)", "asr": "ASR (%)", "ra": "RA (%)", "target_rate": "clean → target (%)"}
LEVEL_LABELS = {"blur": "Gaussian blur kernel size", "jpeg": "JPEG quality", "noise": "Gaussian noise σ (0–255)",
                "recapture": "recapture strength", "ifgsm": "iFGSM ε (0–255)", "ifgsm-steps": "iFGSM steps"}


def robustness_rows(paths: list, results: Path) -> pd.DataFrame:
    """One row per (dataset, attack, training, seed, entry, level, metric) of the robustness jobs'
    JSON files (``results/robustness/{dataset}/{attack}/{training}/seed{seed}/{entry}.json``)."""
    rows = []
    for path in map(Path, paths):
        dataset, attack, training, seed = path.relative_to(results / "robustness").parts[:4]
        stored = read_json(path)
        for row in stored["rows"]:
            for metric in ROBUSTNESS_METRICS:
                if metric in row and row[metric] is not None:
                    rows.append({"dataset": dataset, "attack": attack, "training": training,
                                 "seed": int(seed.removeprefix("seed")), "entry": path.stem, "kind": stored["kind"],
                                 "level": row["level"], "metric": metric, "value": float(row[metric])})
    return pd.DataFrame(rows, columns=["dataset", "attack", "training", "seed", "entry", "kind", "level", "metric",
                                       "value"])


def robustness_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds of each (dataset, training, entry, attack, level, metric), in the
    order the rows came (config order)."""
    keys = ["dataset", "training", "entry", "kind", "attack", "level", "metric"]
    filled = rows.assign(level=rows["level"].astype(object).where(rows["level"].notna(), "–"))
    summary = filled.groupby(keys, sort=False, dropna=False)["value"].agg(mean="mean", std=sample_std).reset_index()
    # config order of the groups, each group's levels ascending (groupby may order equal levels of
    # different entries, 1 and 1.0, by where they first appeared)
    group = summary[keys[:5]].astype(str).agg("/".join, axis=1)
    first = {name: i for i, name in reversed(list(enumerate(group)))}
    level = pd.to_numeric(summary["level"], errors="coerce")
    order = np.lexsort((level.fillna(-np.inf).to_numpy(), group.map(first).to_numpy()))
    return summary.iloc[order].reset_index(drop=True)


def robustness_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows: (dataset, training, entry, attack, level); columns ACC, ASR, RA as mean ± std in %."""
    index = ["dataset", "training", "entry", "attack", "level"]
    cells = summary.assign(cell=[cell(m, s) for m, s in zip(summary["mean"], summary["std"])])
    wide = cells.pivot_table(index=index, columns="metric", values="cell", aggfunc="first", sort=False)
    columns = [m for m in ROBUSTNESS_METRICS if m in wide.columns]
    table = wide[columns].reset_index().rename(columns={m: ROBUSTNESS_COLUMNS[m] for m in columns})
    return table.fillna("")


def write_robustness(rows: pd.DataFrame, folder: Path) -> list[str]:
    """robustness.{csv,md,tex} and one curve figure per (dataset, training, distortion entry)."""
    if rows.empty:
        return []
    summary = robustness_summary(rows)
    written = _write_table(robustness_table(summary), folder / "robustness", ROBUSTNESS_NOTE)
    curves = summary[summary["kind"] != "folder"]
    for (dataset, training, entry, kind), part in curves.groupby(["dataset", "training", "entry", "kind"], sort=False):
        frame = part.rename(columns={"attack": "line", "level": "value"})[["metric", "line", "value", "mean", "std"]]
        png = folder / f"robustness_{dataset}_{training}_{entry}.png"
        sweep_curves(frame, png, LEVEL_LABELS.get(kind, "level"), labels=ROBUSTNESS_METRICS)
        _atomic_text(frame.to_csv(index=False), png.with_suffix(".csv"))
        written += _figure_files(png) + [png.with_suffix(".csv").name]
    return written


DETECTION_NOTE = ("Classes the defense flagged as attack targets, per seed (D: disruptive, ND: non-disruptive); "
                  "the attacks' target classes are in the config.")


def score_files(records: list, paths: list) -> dict:
    """(dataset, training, defense) → {attack: scores.npz} of the defenses that wrote per-sample
    scores beside their metrics.json, the lowest seed of each attack."""
    found = {}
    for (keys, _), item in sorted(zip(records, paths), key=lambda pair: pair[0][0]["seed"]):
        if isinstance(item, tuple):  # a victim's metrics (a `kind: none` entry): no scores
            continue
        scores = Path(item).with_name("scores.npz")
        if scores.exists():
            found.setdefault((keys["dataset"], keys["training"], keys["defense"]), {}).setdefault(keys["attack"], scores)
    return found


def write_score_figures(files: dict, order: dict, folder: Path) -> list[str]:
    """One figure per (dataset, training, defense) of :func:`score_files`, a row per attack."""
    from ..figures import score_grid
    from .figures import read_sample_scores

    written = []
    for (dataset, training, defense), by_attack in files.items():
        attacks = _ordered(list(by_attack), order.get("attack", []))
        labels = unique_labels(attacks, [attack_label(a) for a in attacks])
        rows = {label: read_sample_scores(by_attack[a], None, str(by_attack[a])) for label, a in zip(labels, attacks)}
        png = folder / f"scores_{dataset}_{training}_{defense}.png"
        score_grid(rows, png, f"{dataset}, {training}, {defense}: per-sample scores (lowest seed)")
        written += _figure_files(png)
    return written


def write_report(annotated: pd.DataFrame, order: dict, benchmarks: pd.DataFrame, folder: Path,
                 sweeps: dict | None = None, detections: pd.DataFrame | None = None,
                 runtime: pd.DataFrame | None = None, robustness: pd.DataFrame | None = None,
                 scores: dict | None = None) -> list[str]:
    """Write every view the config has the structure for into ``folder``; return the file names."""
    written: list[str] = []
    if scores:
        written += write_score_figures(scores, order, folder)
    if robustness is not None:
        written += write_robustness(robustness, folder)
    if runtime is not None:
        written += _write_table(runtime, folder / "runtime", RUNTIME_NOTE)
    table = sweep_table(annotated, sweeps or {})
    if table is not None:
        written += _write_table(table, folder / "sweeps", SWEEP_NOTE)
        written += _write_table(chosen_table(table), folder / "sweeps_chosen", CHOSEN_NOTE)
    for (section, base), (key, curves) in sweep_curve_frames(annotated, sweeps or {}).items():
        png = folder / f"sweep_{base}.png"
        sweep_curves(curves, png, f"{base}: {key}")
        _atomic_text(curves.to_csv(index=False), png.with_suffix(".csv"))
        written += _figure_files(png) + [png.with_suffix(".csv").name]
    table = detection_table(detections) if detections is not None else None
    if table is not None:
        written += _write_table(table, folder / "detections", DETECTION_NOTE)
    table = selection_table(annotated)
    if table is not None:
        written += _write_table(table, folder / "selection", "Values in %, mean ± std over seeds (– : one seed). "
                                "Rows: sample selection × metric; columns: the settings that differ.")
    for metric, ylabel in (("asr", "ASR (%)"), ("acc", "BA (%)")):
        curves = rate_sweep(annotated, metric)
        if curves is not None:
            rate_curves(curves, folder / f"rate_{metric}.png", ylabel)
            _atomic_text(curves.to_csv(index=False), folder / f"rate_{metric}.csv")
            written += _figure_files(folder / f"rate_{metric}.png") + [f"rate_{metric}.csv"]
    for selection, matrices in transfer_matrices(annotated, order).items():
        transfer_heatmap(matrices, folder / f"transfer_{selection}.png", selection_label(selection))
        stacked = pd.concat({panel: m for panel, m in matrices.items()}, names=["setting", "source"]).reset_index()
        shown = stacked.assign(**{c: [f"{100 * v:.2f}" if np.isfinite(v) else "–" for v in stacked[c]]
                                  for c in stacked.columns[2:]})
        written += _figure_files(folder / f"transfer_{selection}.png") + _write_table(
            shown, folder / f"transfer_{selection}",
            f"Mean ASR (%) of {selection_label(selection)} selection; rows: source (surrogate) model, "
            "columns: victim model; Vanilla = random selection.",
            header={c: display_name(c) for c in shown.columns})
    for (dataset, training), layout in defense_layouts(annotated, order).items():
        written += _write_table(layout, folder / f"defenses_{dataset}_{training}", LAYOUT_NOTE)
    for defense, layout in split_layouts(annotated, order).items():
        written += _write_table(layout, folder / f"splits_{defense}", SPLITS_NOTE)
    table = unlearnable_table(annotated, order)
    if table is not None:
        written += _write_table(table, folder / "unlearnable",
                                "Clean test accuracy (%), mean ± std over seeds (– : one seed).")
    if not benchmarks.empty:
        long, wide = efficiency_table(benchmarks, order)
        _atomic_text(long.to_csv(index=False), folder / "efficiency.csv")
        _atomic_text(f"{EFFICIENCY_NOTE}\n\n" + to_markdown(wide), folder / "efficiency.md")
        _atomic_text(to_latex(wide, EFFICIENCY_NOTE), folder / "efficiency.tex")
        written += ["efficiency.md", "efficiency.csv", "efficiency.tex"]
    index = "\n".join(f"- [{name}]({name})" for name in written) or "No view applies to this config."
    _atomic_text(f"# Report views\n\n{index}\n", folder / "index.md")
    return written


SUMMARY_NOTE = "Values in %, mean ± std over seeds (sample std; – where there is a single seed)."


def run(args) -> None:
    results = Path(args.results)
    experiment = parse_json(args.experiment, "--experiment") if getattr(args, "experiment", None) is not None else None
    paths = [Path(p) for p in args.metrics] + undefended(getattr(args, "undefended", None) or [])
    records = read_metrics(paths, results)
    table = tidy(paths, results, records)
    _atomic_text(table.to_csv(index=False), results / "metrics.csv")
    summary = summarize(table)
    wide = formatted(summary, TABLE_METRICS)
    _atomic_text(wide.to_csv(index=False), results / "tables" / "summary.csv")
    _atomic_text(f"{SUMMARY_NOTE}\n\n" + to_markdown(wide), results / "tables" / "summary.md")
    _atomic_text(to_latex(wide, SUMMARY_NOTE, header={m: display_name(m) for m in TABLE_METRICS}),
                 results / "tables" / "summary.tex")
    plot(summary, results / "figures" / "summary.png", experiment)
    print(to_markdown(wide))
    if experiment is not None:
        report = results / "report"
        shutil.rmtree(report, ignore_errors=True)  # views the config no longer has must not linger
        benchmarks = read_benchmarks([Path(p) for p in getattr(args, "benchmarks", [])], results)
        runtime = runtime_table(job_seconds(getattr(args, "defense_benchmarks", None) or [], results, "defense"),
                                job_seconds(getattr(args, "features_benchmarks", None) or [], results, "features"),
                                experiment, table, experiment.get("order", {}))
        written = write_report(annotate(summary, experiment), experiment.get("order", {}), benchmarks, report,
                               experiment.get("sweeps", {}), detection_rows(records), runtime,
                               robustness_rows(getattr(args, "robustness", None) or [], results),
                               score_files(records, paths))
        print(f"{report}: " + (", ".join(written) or "no view applies"))
