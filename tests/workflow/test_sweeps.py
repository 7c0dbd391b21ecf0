"""Sweeps: a `{sweep: [...]}` value expands an entry into one entry per value; the experiments run
every variant; the aggregate reports each and marks the lowest-ASR one."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from poisonflow import sweeps
from poisonflow.errors import ConfigError
from poisonflow.stages.aggregate import chosen_table, detection_table, sweep_table
from workflow_utils import planned_jobs, write_config


def test_one_swept_key_gives_one_entry_per_value_and_the_experiments_name_them_all():
    raw = {"defenses": {"none": {"kind": "none"}, "NAD": {"kind": "nad", "beta": {"sweep": [500, 1000, 5000]}}},
           "attacks": {"b": {"kind": "badnets"}},
           "experiments": [{"attack": ["b"], "defense": ["none", "NAD"]}]}
    expanded, record = sweeps.expand(raw)
    assert list(expanded["defenses"]) == ["none", "NAD.beta-500", "NAD.beta-1000", "NAD.beta-5000"]
    assert expanded["defenses"]["NAD.beta-1000"] == {"kind": "nad", "beta": 1000}
    assert expanded["experiments"][0]["defense"] == ["none", "NAD.beta-500", "NAD.beta-1000", "NAD.beta-5000"]
    assert record == {"defenses": {"NAD": {"NAD.beta-500": {"beta": 500}, "NAD.beta-1000": {"beta": 1000},
                                           "NAD.beta-5000": {"beta": 5000}}}}
    assert raw["defenses"]["NAD"]["beta"] == {"sweep": [500, 1000, 5000]}  # the input is not changed


def test_two_swept_keys_cross_and_nested_keys_are_dotted():
    raw = {"defenses": {"g": {"kind": "gssd", "features": "f", "alpha_c": {"sweep": [0.15, 0.3]},
                              "flows": {"epochs": {"sweep": [10, 20]}}}}}
    expanded, record = sweeps.expand(raw)
    assert sorted(expanded["defenses"]) == sorted(["g.alpha_c-0.15.flows.epochs-10", "g.alpha_c-0.15.flows.epochs-20",
                                                  "g.alpha_c-0.3.flows.epochs-10", "g.alpha_c-0.3.flows.epochs-20"])
    assert expanded["defenses"]["g.alpha_c-0.3.flows.epochs-20"]["flows"] == {"epochs": 20}
    assert record["defenses"]["g"]["g.alpha_c-0.15.flows.epochs-10"] == {"alpha_c": 0.15, "flows.epochs": 10}


def test_a_config_without_sweeps_is_returned_as_is():
    raw = {"defenses": {"n": {"kind": "nad", "beta": 500}}}
    assert sweeps.expand(raw) == (raw, {})


def test_bad_sweeps_are_refused_naming_the_key(tiny_config, load_config):
    with pytest.raises(ConfigError, match=r"^defenses\.NAD\.beta\.sweep: a non-empty list"):
        sweeps.expand({"defenses": {"NAD": {"kind": "nad", "beta": {"sweep": []}}}})
    tiny_config["defenses"]["n"] = {"kind": "nad", "beta": {"sweep": [500, -1]}}
    with pytest.raises(ConfigError, match=r"defenses\.n\.beta-(-1|500)"):
        load_config(tiny_config)  # each variant is validated like any entry


def test_config_expands_and_records_the_sweep(tiny_config, load_config):
    tiny_config["defenses"]["n"] = {"kind": "nad", "beta": {"sweep": [500, 1000]}}
    tiny_config["experiments"][0]["defense"] = ["n"]
    cfg = load_config(tiny_config)
    assert cfg.defense("n.beta-1000")["beta"] == 1000
    assert {job.defense for job in cfg.jobs()} == {"n.beta-500", "n.beta-1000"}
    assert cfg.sweeps == {"defenses": {"n": {"n.beta-500": {"beta": 500}, "n.beta-1000": {"beta": 1000}}}}


WORKFLOW = {
    "datasets": {"digits": {"source": "digits", "image_size": 8, "train_size": 60, "test_size": 20}},
    "models": {"tiny": {"arch": "convnet", "width": 4}},
    "trainings": {"fast": {"model": "tiny", "epochs": 1, "batch_size": 32}},
    "attacks": {"badnets": {"kind": "badnets", "target": 0, "rate": 0.1}},
    "defenses": {"ABL": {"kind": "abl", "gamma": {"sweep": [0.0, 0.2, 0.4]}}},
    "evaluation": {"pgd": None},
    "experiments": [{"dataset": ["digits"], "attack": ["badnets"], "training": ["fast"], "defense": ["ABL"],
                     "seed": [0]}],
}


def test_a_sweep_plans_one_defense_job_per_value_on_one_shared_victim(tmp_path):
    write_config(tmp_path, WORKFLOW)
    jobs = planned_jobs(tmp_path)
    defenses = sorted(job for job in jobs if job[0] == "defense")
    assert [job[3] for job in defenses] == ["defense=ABL.gamma-0", "defense=ABL.gamma-0.2", "defense=ABL.gamma-0.4"]
    assert sum(job[0] == "victim" for job in jobs) == 1  # one victim shared by every value


def test_sweep_view_marks_the_lowest_asr_and_detection_view_lists_seeds():
    rows = []
    for variant, asr in (("ABL.gamma-0", 0.9), ("ABL.gamma-0.2", 0.1), ("ABL.gamma-0.4", 0.5)):
        for metric, value in (("acc", 0.8), ("asr", asr)):
            rows.append({"dataset": "d", "attack": "a", "training": "t", "defense": variant, "metric": metric,
                         "mean": value, "std": np.nan, "n": 1})
    record = {"defenses": {"ABL": {"ABL.gamma-0": {"gamma": 0.0}, "ABL.gamma-0.2": {"gamma": 0.2},
                                   "ABL.gamma-0.4": {"gamma": 0.4}}}}
    table = sweep_table(pd.DataFrame(rows), record)
    assert list(table["value"]) == ["gamma 0.0", "gamma 0.2", "gamma 0.4"]
    assert list(table["chosen"]) == ["", "✓", ""]
    assert list(table["asr"]) == ["90.00 ± –", "10.00 ± –", "50.00 ± –"]
    chosen = chosen_table(table)
    assert chosen.to_dict("records") == [{"dataset": "d", "attack": "a", "training": "t", "entry": "ABL",
                                          "chosen value": "gamma 0.2", "acc": "80.00 ± –", "asr": "10.00 ± –"}]
    detections = pd.DataFrame([
        {"dataset": "d", "attack": "a", "training": "t", "defense": "gssd", "seed": 1, "detected": "0 (D), 3 (D)"},
        {"dataset": "d", "attack": "a", "training": "t", "defense": "gssd", "seed": 0, "detected": "0 (ND)"}])
    assert detection_table(detections)["detected classes"].tolist() == ["seed 0: 0 (ND); seed 1: 0 (D), 3 (D)"]


def test_unswept_entries_keep_their_names_in_a_swept_config():
    raw = copy.deepcopy(WORKFLOW)
    raw["defenses"]["none"] = {"kind": "none"}
    expanded, _ = sweeps.expand(raw)
    assert "none" in expanded["defenses"] and "ABL" not in expanded["defenses"]


def test_runtime_view_adds_the_shared_features_job_to_each_defense_that_reads_it(tmp_path):
    from poisonflow.stages.aggregate import job_seconds, runtime_table

    results = tmp_path / "results"

    def bench(relative: str, seconds: float) -> str:
        path = results / "benchmarks" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"s\th:m:s\tcpu_time\n{seconds}\t0:00:00\t1.0\n")
        return str(path)

    defense_files = [bench(f"defense/d/a/t/seed{s}/gssd.tsv", 10.0 + s) for s in (0, 1)]
    defense_files.append(bench("defense/d/a/t/seed0/nad.tsv", 4.0))
    features_files = [bench(f"features/d/a/simclr/seed{s}.tsv", 100.0) for s in (0, 1)]
    metrics = pd.DataFrame([
        {"dataset": "d", "attack": "a", "training": "t", "defense": "gssd", "seed": s, "metric": m, "value": v}
        for s in (0, 1) for m, v in (("flows_seconds", 3.0), ("retrain_seconds", 6.0))])
    experiment = {"defenses": {"gssd": {"kind": "gssd", "features": "simclr"}, "nad": {"kind": "nad"}}}
    table = runtime_table(job_seconds(defense_files, results, "defense"),
                          job_seconds(features_files, results, "features"), experiment, metrics,
                          {"defense": ["nad", "gssd"]})
    assert table.to_dict("records") == [
        {"dataset": "d", "defense": "nad", "defense job": "4.0 s", "features job": "–", "total": "4.0 s",
         "flows": "–", "retraining": "–"},
        {"dataset": "d", "defense": "gssd", "defense job": "10.5 s", "features job": "100.0 s", "total": "110.5 s",
         "flows": "3.0 s", "retraining": "6.0 s"}]


def test_defense_layout_has_attack_rows_defense_columns_and_average_and_worst_rows():
    from poisonflow.stages.aggregate import defense_layouts

    rows = []
    values = {("clean", "none"): (0.9, None, 0.5), ("clean", "A"): (0.8, None, 0.4),
              ("b1", "none"): (0.9, 1.0, 0.1), ("b1", "A"): (0.8, 0.02, 0.4),
              ("b2", "none"): (0.9, 1.0, 0.0), ("b2", "A"): (0.7, 0.10, 0.3)}
    for (attack, defense), (acc, asr, ra) in values.items():
        for metric, value in (("acc", acc), ("asr", asr), ("pgd_acc", ra)):
            if value is not None:
                rows.append({"dataset": "d", "attack": attack, "training": "t", "defense": defense, "metric": metric,
                             "mean": value, "std": np.nan, "n": 1})
    layout = defense_layouts(pd.DataFrame(rows), {"defense": ["none", "A"], "attack": ["clean", "b1", "b2"]})[("d", "t")]
    assert list(layout.columns) == ["attack", "none ACC", "none ASR", "none PGD", "A ACC", "A ASR", "A PGD"]
    table = layout.set_index("attack")
    assert table.loc["clean", "none ASR"] == "–" and table.loc["b1", "A ASR"] == "2.00"
    assert table.loc["Average", "A ACC"] == "75.00" and table.loc["Average", "A ASR"] == "6.00"
    assert table.loc["Worst Case", "A ACC"] == "70.00" and table.loc["Worst Case", "A ASR"] == "10.00"
    assert table.loc["Worst Case", "A PGD"] == "30.00"
    # with the backdoor RA and nDER measured (the VSSC tables), both get columns; nDER's worst is its lowest
    rows += [{"dataset": "d", "attack": a, "training": "t", "defense": "A", "metric": m, "mean": v, "std": np.nan,
              "n": 1} for a, m, v in (("b1", "ra", 0.9), ("b2", "ra", 0.6), ("b1", "nder", 0.95), ("b2", "nder", 0.8))]
    table = defense_layouts(pd.DataFrame(rows), {"defense": ["none", "A"]})[("d", "t")].set_index("attack")
    assert list(table.columns)[-3:] == ["A RA", "A PGD", "A nDER"] and table.loc["b1", "none RA"] == "–"
    assert table.loc["Average", "A nDER"] == "87.50" and table.loc["Worst Case", "A nDER"] == "80.00"


def test_split_layout_is_table_1_attacks_by_dataset_gamma_and_rho():
    from poisonflow.stages.aggregate import split_layouts

    rows = [{"dataset": d, "attack": a, "training": t, "defense": "A", "metric": m, "mean": v, "std": s, "n": 2}
            for d, t in (("cifar", "r18"), ("tiny", "r34"))
            for a, m, v, s in (("b1", "gamma", 0.8234, 0.01), ("b1", "rho_vul", 0.0013, 0.0),
                               ("clean", "gamma", 0.9, np.nan), ("clean", "rho_vul", 0.0, np.nan))]
    rows += [{"dataset": "cifar", "attack": "b1", "training": "r18", "defense": d, "metric": "acc", "mean": 0.9,
              "std": np.nan, "n": 1} for d in ("none", "A")]
    rows += [{"dataset": "cifar", "attack": "b1", "training": "r18", "defense": "AT", "metric": m, "mean": v,
              "std": np.nan, "n": 1} for m, v in (("gamma", 1.0), ("rho_vul", 0.1))]  # trains on every sample
    layouts = split_layouts(pd.DataFrame(rows), {"attack": ["clean", "b1"]})
    assert list(layouts) == ["A"]  # only a defense that reports γ below 100%
    table = layouts["A"].set_index("attack")
    assert list(table.columns) == ["cifar γ", "cifar ρ_vul", "tiny γ", "tiny ρ_vul"]
    assert list(table.index) == ["clean", "b1"]
    assert table.loc["b1", "cifar γ"] == "82.34 ± 1.00" and table.loc["b1", "tiny ρ_vul"] == "0.13 ± 0.00"
    assert table.loc["clean", "tiny γ"] == "90.00 ± –"


def test_a_numeric_sweep_becomes_curves_per_attack_and_a_figure(tmp_path):
    from poisonflow.figures import sweep_curves
    from poisonflow.stages.aggregate import sweep_curve_frames

    rows = [{"dataset": "d", "attack": attack, "training": "t", "defense": f"AT.eps-{eps}", "metric": "asr",
             "mean": asr, "std": np.nan, "n": 1}
            for attack, points in (("b1", ((2, 0.9), (8, 0.1))), ("b2", ((2, 1.0), (8, 0.5))))
            for eps, asr in points]
    record = {"defenses": {"AT": {"AT.eps-2": {"training.adversarial.eps": 2}, "AT.eps-8": {"training.adversarial.eps": 8}}}}
    key, curves = sweep_curve_frames(pd.DataFrame(rows), record)[("defenses", "AT")]
    assert key == "training.adversarial.eps"
    b1 = curves[curves["line"] == "b1"].sort_values("value")
    assert b1["value"].tolist() == [2.0, 8.0] and b1["mean"].tolist() == [0.9, 0.1]
    assert sweep_curves(curves, tmp_path / "s.png", key).stat().st_size > 1000
