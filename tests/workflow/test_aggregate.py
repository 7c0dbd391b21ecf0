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
