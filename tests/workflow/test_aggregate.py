import json

import numpy as np
import pandas as pd
import pytest

from poisonflow.stages import aggregate
from poisonflow.stages.defense import nder


def test_nder_formula():
    # ASR 1.0 → 0.1 (ΔASR/ASR = 0.9), ACC 0.9 → 0.81 (ΔACC/ACC = 0.1): (0.9 − 0.1 + 1) / 2
    assert nder({"asr": 1.0, "acc": 0.9}, {"asr": 0.1, "acc": 0.81}) == pytest.approx(0.9)
    # a defense that raises ASR and ACC: both terms clip at 0
    assert nder({"asr": 0.5, "acc": 0.8}, {"asr": 0.6, "acc": 0.9}) == pytest.approx(0.5)
    assert nder({"asr": 0.0, "acc": 0.8}, {"asr": 0.0, "acc": 0.8}) is None


def test_tidy_table_summary_and_outputs(results_dir, write_metrics):
    results = results_dir
    paths = [write_metrics(results, {"acc": a, "asr": r, "device": "cpu", "train_seconds": 3.0}, seed=s)
             for s, a, r in [(0, 0.9, 1.0), (1, 0.8, 0.96), (2, 0.85, 0.98)]]
    paths.append(write_metrics(results, {"acc": 0.7, "asr": 0.1, "gamma": 0.8}, defense="aabl"))
    table = aggregate.tidy(paths, results)
    assert list(table.columns) == ["dataset", "attack", "training", "defense", "seed", "metric", "value"]
    assert len(table) == 2 * 3 + 3 and set(table["metric"]) == {"acc", "asr", "gamma"}
    summary = aggregate.summarize(table)
    acc = summary[(summary.defense == "none") & (summary.metric == "acc")].iloc[0]
    assert acc["mean"] == pytest.approx(0.85) and acc["std"] == pytest.approx(np.std([0.9, 0.8, 0.85], ddof=1))
    assert acc["n"] == 3
    wide = aggregate.formatted(summary, aggregate.TABLE_METRICS)
    row = wide[wide.defense == "none"].iloc[0]
    assert row["acc"] == "85.00 ± 5.00" and row["seeds"] == 3 and row["gamma"] == "–"
    assert list(wide.columns) == ["dataset", "attack", "training", "defense", "acc", "asr", "gamma", "seeds"]

    class Args:
        pass

    args = Args()
    args.results, args.metrics = str(results), [str(p) for p in paths]
    aggregate.run(args)
    assert pd.read_csv(results / "metrics.csv").shape == (9, 7)
    assert "85.00 ± 5.00" in (results / "tables" / "summary.md").read_text()
    assert (results / "figures" / "summary.png").stat().st_size > 1000


def test_detection_metrics_against_truth():
    from poisonflow.stages.defense import detection_metrics

    truth = np.array([False, False, True, True])
    out = detection_metrics(truth, np.array([0.1, 0.6, 0.5, 0.9]), np.array([False, True, True, True]))
    assert out["auroc"] == pytest.approx(0.75) and out["tpr"] == 1.0 and out["fpr"] == 0.5
    assert detection_metrics(np.zeros(3, bool), np.ones(3), None) == {}


def test_screening_set_mixes_clean_and_triggered_in_seeded_order():
    from poisonflow.stages.defense import screening_set

    clean = {"test/images": np.zeros((5, 2, 2, 3), np.uint8)}

    class Poisoned(dict):
        pass

    poisoned = Poisoned({"test/images": np.full((3, 2, 2, 3), 255, np.uint8)})
    images, truth = screening_set(clean, poisoned, seed=0)
    assert truth.sum() == 3 and np.all(images[truth] == 255) and np.all(images[~truth] == 0)
    assert not np.array_equal(truth, np.array([0, 0, 0, 0, 0, 1, 1, 1], bool))


class Args:
    experiment = None
    benchmarks = ()


def run_aggregate(results, paths, experiment=None):
    args = Args()
    args.results, args.metrics = str(results), [str(p) for p in paths]
    args.experiment = json.dumps(experiment) if experiment is not None else None
    aggregate.run(args)


def test_single_seed_has_a_dash_for_its_std_and_every_table_has_latex(results_dir, write_metrics):
    results = results_dir
    paths = [write_metrics(results, {"acc": 0.9, "asr": 0.5}, seed=0),
             write_metrics(results, {"acc": 0.8, "asr": 0.25}, defense="aabl", seed=0),
             write_metrics(results, {"acc": 0.7, "asr": 0.75}, defense="aabl", seed=1)]
    run_aggregate(results, paths)
    summary = pd.read_csv(results / "tables" / "summary.csv")
    single = summary[summary.defense == "none"].iloc[0]
    assert single["acc"] == "90.00 ± –" and single["seeds"] == 1  # not "± 0.00": there is no std
    assert summary[summary.defense == "aabl"].iloc[0]["acc"] == "75.00 ± 7.07"
    assert "| 90.00 ± – |" in (results / "tables" / "summary.md").read_text()
    tex = (results / "tables" / "summary.tex").read_text()
    assert "\\begin{tabular}{llllrrr}" in tex and "\\toprule" in tex and "\\bottomrule" in tex
    assert "dataset & attack & training & defense & BA & ASR & seeds \\\\" in tex
    assert "digits & badnets & quick & none & 90.00 $\\pm$ -- & 50.00 $\\pm$ -- & 1 \\\\" in tex
    assert (results / "figures" / "summary.pdf").read_bytes()[:5] == b"%PDF-"


def test_latex_cells_are_escaped():
    table = pd.DataFrame({"method": ["a_b & 50%", "x"], "v": ["1.00 ± 0.10", "–"]})
    tex = aggregate.to_latex(table, note="two\nlines")
    assert tex.startswith("% two\n% lines\n% requires \\usepackage{booktabs}\n\\begin{tabular}{lr}\n")
    assert "a\\_b \\& 50\\% & 1.00 $\\pm$ 0.10 \\\\" in tex and "x & -- \\\\" in tex


def test_damaged_metrics_file_is_one_line(results_dir, write_metrics, capsys):
    from poisonflow.cli import main

    path = write_metrics(results_dir, {"acc": 0.9})
    path.write_text('{"acc": 0.9')  # cut short
    assert main(["aggregate", "--results", str(results_dir), "--metrics", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"poisonflow aggregate: error: {path}: damaged JSON (")


def test_summary_figure_uses_display_names(results_dir, write_metrics, monkeypatch):
    drawn = {}
    monkeypatch.setattr(aggregate, "save_figure", lambda fig, path: drawn.setdefault("fig", fig))
    paths = [write_metrics(results_dir, {"acc": 0.9, "asr": 0.5}, attack=a, defense=d)
             for a in ("badnets", "hard") for d in ("none", "aabl")]
    experiment = {"attacks": {"badnets": {"kind": "badnets", "label_mode": "dirty"},
                              "hard": {"kind": "badnets", "label_mode": "clean", "selection": "loss"}}}
    run_aggregate(results_dir, paths, experiment)
    ax = drawn["fig"].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["BadNets / A-ABL", "BadNets / No defense", "BadNets-C (Loss Value) / A-ABL",
                      "BadNets-C (Loss Value) / No defense"]
    assert drawn["fig"]._suptitle.get_text() == "Digits, quick"
    assert ax.get_xlim() == (0.0, 100.0)
