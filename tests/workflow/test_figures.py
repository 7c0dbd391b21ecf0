"""Figure functions on hand-made inputs, the report views of the aggregate stage, the efficiency
table from benchmark files, and the figures stage's two kinds on tiny stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from poisonflow import figures
from poisonflow.cli import main
from poisonflow.errors import ConfigError
from poisonflow.stages import aggregate
from poisonflow.stages import figures as figure_stage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# drawing functions
# --------------------------------------------------------------------------------------------

def test_forgetting_histogram_writes_png(tmp_path):
    out = figures.forgetting_histogram(np.array([0, 0, 1, 3, 3, 3, 12]), tmp_path / "f" / "hist.png", "class 0")
    assert is_png(out) and not list((tmp_path / "f").glob(".*"))  # no temporary file left behind


def test_rate_curves_writes_png(tmp_path):
    curves = pd.DataFrame({"panel": ["cifar10"] * 4 + ["imagenet50"] * 2,
                           "selection": ["random", "random", "loss", "loss", "random", "forgetting"],
                           "rate": [0.05, 0.1, 0.05, 0.1, 0.5, 0.5], "mean": [0.2, 0.3, 0.5, 0.7, 0.3, 0.5],
                           "std": [0.01, 0.02, 0.05, 0.03, 0.0, 0.0]})
    assert is_png(figures.rate_curves(curves, tmp_path / "rate.png", "ASR (%)"))


def test_transfer_heatmap_writes_png_with_missing_cells(tmp_path):
    matrix = pd.DataFrame([[0.3, 0.2], [0.7, np.nan]], index=["Vanilla", "resnet18"], columns=["resnet18", "vgg16"])
    assert is_png(figures.transfer_heatmap({"badnets": matrix}, tmp_path / "t.png", "Loss Value"))


def test_tsne_embedding_and_panels(tmp_path):
    rng = np.random.default_rng(0)
    # two well separated blobs stay separated in the embedding
    features = np.concatenate([rng.normal(0, 0.1, (15, 8)), rng.normal(5, 0.1, (15, 8))])
    embedding = figures.tsne_embedding(features, seed=0, perplexity=30)
    assert embedding.shape == (30, 2)
    a, b = embedding[:15].mean(axis=0), embedding[15:].mean(axis=0)
    spread = max(embedding[:15].std(axis=0).max(), embedding[15:].std(axis=0).max())
    assert np.linalg.norm(a - b) > 3 * spread
    poisoned = np.zeros(30, bool)
    poisoned[:5] = True
    labels = np.repeat([0, 1], 15)
    assert is_png(figures.tsne_panels({"random": (embedding, labels, poisoned), "loss": (embedding, labels, poisoned)},
                                      tmp_path / "tsne.png"))


def capture(monkeypatch):
    """Keep the figure a drawing function would save, to look at its axes."""
    drawn = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.setdefault("fig", fig) and Path(path))
    return drawn


def test_figures_are_written_as_png_and_pdf(tmp_path):
    out = figures.forgetting_histogram(np.array([0, 1, 1]), tmp_path / "h.png")
    assert is_png(out) and (tmp_path / "h.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.pdf", "h.png"]  # no temporaries


def test_percent_axes_do_not_magnify_noise(monkeypatch):
    assert figures.percent_limits([0.30], [0.62]) == (-3.0, 103.0)  # 0.30–0.62 %: the whole 0–100 % range
    assert figures.percent_limits([-5.0], [120.0]) == (-8.0, 123.0)  # data beyond it widen the range
    drawn = capture(monkeypatch)
    curves = pd.DataFrame({"panel": ["p"] * 4, "selection": ["random", "random", "loss", "loss"],
                           "rate": [0.1, 0.2, 0.1, 0.2], "mean": [0.003, 0.004, 0.005, 0.0062],
                           "std": [0.001, np.nan, 0.0, 0.0]})
    figures.rate_curves(curves, "unused.png", "ASR (%)")
    ax = drawn["fig"].axes[0]
    assert ax.get_ylim() == (-3.0, 103.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Vanilla", "Loss Value"]


def test_tsne_has_a_class_legend_with_class_names(monkeypatch):
    drawn = capture(monkeypatch)
    embedding = np.random.default_rng(0).normal(size=(12, 2))
    labels, poisoned = np.arange(12) % 3, np.arange(12) < 2
    figures.tsne_panels({"BadNets": (embedding, labels, poisoned)}, "unused.png", class_names=["cat", "dog", "car"])
    texts = [t.get_text() for t in drawn["fig"].legends[0].get_texts()]
    assert texts == ["cat", "dog", "car", "poisoned"]


def test_display_names():
    assert figures.display_name("badnets") == "BadNets" and figures.display_name("aabl") == "A-ABL"
    assert figures.display_name("resnet18") == "ResNet-18" and figures.display_name("my-entry") == "my-entry"
    assert figures.attack_label("x", {"kind": "blended", "label_mode": "dirty", "selection": "random"}) == "Blended"
    assert figures.attack_label("x", {"kind": "badnets", "label_mode": "clean", "selection": "forgetting"}) == \
        "BadNets-C (Forgetting Event)"
    assert figures.unique_labels(["a", "b", "c"], ["BadNets", "BadNets", "WaNet"]) == \
        ["BadNets [a]", "BadNets [b]", "WaNet"]


def test_class_forgetting_events_counts_per_class():
    # epochs × samples; sample 0: 1→0→1→0 (2 events), 1: never correct (max = 4 epochs), 2: always correct
    correct = np.array([[1, 0, 1, 1], [0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0]], dtype=bool)
    labels = np.array([0, 0, 1, 0])
    assert figure_stage.class_forgetting_events(correct, labels, 0).tolist() == [2, 4, 1]
    assert figure_stage.class_forgetting_events(correct, labels, 1).tolist() == [0]
    with pytest.raises(ValueError, match="dynamics cover 4 samples"):
        figure_stage.class_forgetting_events(correct, labels[:3], 0)


def test_panel_sample_keeps_every_poisoned_sample_and_a_seeded_benign_draw():
    poisoned = np.zeros(100, bool)
    poisoned[[3, 50, 97]] = True
    shown = figure_stage.panel_sample(poisoned, 10, seed=4)
    assert len(shown) == 13 and set(np.flatnonzero(poisoned)) <= set(shown) and np.all(np.diff(shown) > 0)
    assert np.array_equal(shown, figure_stage.panel_sample(poisoned, 10, seed=4))
    assert len(figure_stage.panel_sample(poisoned, 1000, seed=0)) == 100  # capped at what exists


# --------------------------------------------------------------------------------------------
# the figures: config section
# --------------------------------------------------------------------------------------------

def test_the_stage_has_one_job_per_schema_kind_and_no_defaults_of_its_own(config_schema):
    entry = config_schema["properties"]["figures"]["additionalProperties"]
    kinds = [branch["if"]["properties"]["kind"]["const"] for branch in entry["allOf"]]
    assert entry["properties"]["kind"]["enum"] == kinds == list(figure_stage.KINDS)
    # the kinds' defaults live in the schema only: the jobs read them from the validated entry
    assert not hasattr(figure_stage, "DEFAULTS") and not hasattr(figures, "DEFAULTS")


def test_schema_fills_figure_defaults_and_rejects_unknown_keys(tiny_config, validate_config):
    config = validate_config({**tiny_config, "figures": {
        "f": {"kind": "forgetting", "dataset": "digits", "surrogate": "s"},
        "t": {"kind": "tsne", "dataset": "digits", "training": "t", "attacks": ["a"]}}})
    assert config["figures"]["f"]["class"] == 0
    assert config["figures"]["t"]["samples"] == 1000 and config["figures"]["t"]["perplexity"] == 30.0
    with pytest.raises(ConfigError, match=r"^figures\.f\.bins: unknown key \(known: class, dataset, kind, surrogate\)"):
        validate_config({**tiny_config, "figures": {"f": {"kind": "forgetting", "dataset": "digits",
                                                          "surrogate": "s", "bins": 3}}})


def test_check_figures_names_the_key():
    config = {"datasets": {"d": {}}, "surrogates": {"s": {}}, "trainings": {"t": {}}, "attacks": {"a": {}},
              "figures": {"f": {"kind": "forgetting", "dataset": "d", "surrogate": "s", "class": 9}}}
    describe = lambda name: {"train_counts": [5, 5, 5]}  # noqa: E731
    with pytest.raises(ConfigError, match=r"figures\.f\.class: class 9 is outside dataset 'd' \(3 classes"):
        figure_stage.check_figures(config, describe)
    config["figures"] = {"g": {"kind": "tsne", "dataset": "d", "training": "t", "attacks": ["a", "b"]}}
    with pytest.raises(ConfigError, match=r"figures\.g\.attacks\[1\]: no attacks entry named 'b'"):
        figure_stage.check_figures(config, describe)
    config["figures"] = {"g": {"kind": "forgetting", "dataset": "d", "surrogate": "x", "class": 0}}
    with pytest.raises(ConfigError, match=r"figures\.g\.surrogate: no surrogates entry named 'x'"):
        figure_stage.check_figures(config, describe)


# --------------------------------------------------------------------------------------------
# figure jobs on tiny artifacts
# --------------------------------------------------------------------------------------------

def test_forgetting_job_draws_from_dynamics(tmp_path, tiny_store, capsys):
    labels = tiny_store(tmp_path / "clean.zarr")["train/labels"]
    correct = np.random.default_rng(1).random((5, len(labels))) > 0.3
    np.savez(tmp_path / "dynamics.npz", correct=correct, loss=np.zeros(correct.shape))
    spec = json.dumps({"kind": "forgetting", "dataset": "d", "surrogate": "s", "class": 1})
    code = main(["figures", "--spec", spec, "--clean", str(tmp_path / "clean.zarr"),
                 "--dynamics", str(tmp_path / "dynamics.npz"), "--out", str(tmp_path / "out" / "f.png")])
    assert code == 0 and is_png(tmp_path / "out" / "f.png")
    # the kind's inputs are required: one line naming what is missing
    capsys.readouterr()
    assert main(["figures", "--spec", spec, "--clean", str(tmp_path / "clean.zarr"), "--out", "x.png"]) == 2
    assert capsys.readouterr().err == "poisonflow figures: error: --spec: a forgetting figure needs --dynamics\n"


def test_tsne_job_draws_one_panel_per_victim(tmp_path, tiny_store):
    import torch

    from poisonflow.models import build_model
    from poisonflow.trainer import save_weights

    tiny_store(tmp_path / "p.zarr")
    model_spec = {"arch": "convnet", "width": 4}
    save_weights(build_model(model_spec, 2, 8, seed=0), tmp_path / "model.pt")
    torch.manual_seed(0)
    spec = {"kind": "tsne", "dataset": "d", "training": "t", "attacks": ["a", "b"], "seed": 0, "samples": 20,
            "perplexity": 5.0}
    code = main(["figures", "--spec", json.dumps(spec), "--training", json.dumps({"model": model_spec}),
                 "--names", "a", "b", "--poison", str(tmp_path / "p.zarr"), str(tmp_path / "p.zarr"),
                 "--victims", str(tmp_path / "model.pt"), str(tmp_path / "model.pt"),
                 "--out", str(tmp_path / "t.png")])
    assert code == 0 and is_png(tmp_path / "t.png") and (tmp_path / "t.pdf").is_file()
    assert main(["figures", "--spec", json.dumps(spec), "--training", json.dumps({"model": model_spec}),
                 "--names", "a", "b", "--poison", str(tmp_path / "p.zarr"), "--victims",
                 str(tmp_path / "model.pt"), "--out", str(tmp_path / "u.png")]) == 2


def write_scores(folder: Path, seed: int, names=("SCE before iFGSM", "SCE after iFGSM")) -> np.ndarray:
    """A defense folder with model.pt (empty: the figure reads only what lies beside it) and scores.npz."""
    from poisonflow.defenses import DefenseResult
    from poisonflow.stages.defense import write_sample_scores

    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"")
    rng = np.random.default_rng(seed)
    poisoned = rng.random(60) < 0.1
    scores = {name: rng.random(60) + i for i, name in enumerate(names)}
    write_sample_scores(folder, DefenseResult(model=None, sample_scores=scores, thresholds={names[-1]: 1.5}),
                        poisoned, "x")
    return poisoned


def test_sample_scores_job_draws_a_row_per_attack_with_its_thresholds(tmp_path, monkeypatch):
    from poisonflow.figures import score_grid

    names = ("SCE before iFGSM", "SCE after iFGSM", "final model: SCE before iFGSM", "final model: SCE after iFGSM")
    flags = [write_scores(tmp_path / attack, seed, names) for seed, attack in enumerate(("a", "b"))]
    drawn = {}
    monkeypatch.setattr("poisonflow.figures.score_grid",
                        lambda rows, out, title: drawn.update(rows) or score_grid(rows, out, title))
    spec = {"kind": "sample-scores", "dataset": "d", "training": "t", "attacks": ["a", "b"], "defense": "A",
            "seed": 0, "scores": ["final model: SCE before iFGSM", "SCE after iFGSM"]}
    args = ["figures", "--spec", json.dumps(spec), "--names", "a", "b",
            "--victims", str(tmp_path / "a" / "model.pt"), str(tmp_path / "b" / "model.pt")]
    assert main(args + ["--out", str(tmp_path / "s.png")]) == 0 and is_png(tmp_path / "s.png")
    assert list(drawn) == ["a", "b"]
    scores, poisoned, thresholds = drawn["b"]
    assert list(scores) == ["final model: SCE before iFGSM", "SCE after iFGSM"]  # in the entry's order
    np.testing.assert_array_equal(poisoned, flags[1])
    assert thresholds == {"final model: SCE after iFGSM": 1.5}
    # all scores when none are named; a name the defense did not store is a one-line error
    assert main(["figures", "--spec", json.dumps({**spec, "scores": None})] + args[3:] + ["--out", str(tmp_path / "t.png")]) == 0
    assert list(drawn["a"][0]) == list(names)
    assert main(["figures", "--spec", json.dumps({**spec, "scores": ["CE"]})] + args[3:] + ["--out", str(tmp_path / "u.png")]) == 2


def test_report_draws_each_splitting_defenses_scores_from_its_lowest_seed(tmp_path, monkeypatch):
    from poisonflow.figures import score_grid

    paths, records = [], []
    for attack in ("b", "a"):
        for seed in (1, 0):
            folder = tmp_path / f"defenses/d/{attack}/t/seed{seed}/A"
            write_scores(folder, seed)
            paths.append(folder / "metrics.json")
            records.append(({"dataset": "d", "attack": attack, "training": "t", "seed": seed, "defense": "A"}, {}))
    paths.append((tmp_path / "victims/d/a/t/seed0/metrics.json", "none"))  # a `kind: none` entry: no scores
    records.append(({"dataset": "d", "attack": "a", "training": "t", "seed": 0, "defense": "none"}, {}))
    (tmp_path / "defenses/d/a/t/seed0/FP").mkdir(parents=True)  # a defense without scores
    paths.append(tmp_path / "defenses/d/a/t/seed0/FP/metrics.json")
    records.append(({"dataset": "d", "attack": "a", "training": "t", "seed": 0, "defense": "FP"}, {}))
    files = aggregate.score_files(records, paths)
    assert files == {("d", "t", "A"): {"b": tmp_path / "defenses/d/b/t/seed0/A/scores.npz",
                                       "a": tmp_path / "defenses/d/a/t/seed0/A/scores.npz"}}
    drawn = {}
    monkeypatch.setattr("poisonflow.figures.score_grid",
                        lambda rows, out, title: drawn.update(rows) or score_grid(rows, out, title))
    written = aggregate.write_score_figures(files, {"attack": ["a", "b"]}, tmp_path / "report")
    assert written == ["scores_d_t_A.png", "scores_d_t_A.pdf"] and is_png(tmp_path / "report/scores_d_t_A.png")
    assert list(drawn) == ["a", "b"]  # config order


def test_score_grid_and_distributions_lay_panels_out(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    poisoned = rng.random(50) < 0.2
    two = {"before": rng.random(50), "after": rng.random(50)}
    four = {**two, "final before": rng.random(50), "final after": rng.random(50)}
    size = {n: Image.open(figures.score_distributions(s, poisoned, tmp_path / f"{n}.png", {"after": 0.5})).size
            for n, s in (("two", two), ("four", four))}
    assert size["four"][0] == size["two"][0] and size["four"][1] > 1.8 * size["two"][1]  # before/after pairs in rows
    grid = Image.open(figures.score_grid({"BadNets": (four, poisoned, {}), "Blend": (two, poisoned, {})},
                                         tmp_path / "grid.png")).size
    assert grid[0] > 1.8 * size["two"][0] and grid[1] > 1.5 * size["two"][1]


# --------------------------------------------------------------------------------------------
# report views of the aggregate stage
# --------------------------------------------------------------------------------------------

MODEL = {"arch": "resnet18", "width": 64}


def backdoor(kind="badnets", selection="random", rate=0.1, target=0, pattern="checkerboard", surrogate_arch=None,
             label_mode="clean"):
    entry = {"kind": kind, "target": target, "label_mode": label_mode, "rate": rate, "selection": selection,
             "trigger": {"pattern": pattern}}
    if surrogate_arch:
        entry["surrogate"] = f"s-{surrogate_arch}"
        entry["surrogate_entry"] = {"training": {"model": {"arch": surrogate_arch, "width": 64}}}
    return entry


def summary_rows(rows):
    """(dataset, attack, training, defense, metric, mean, std) tuples → a summary table."""
    table = pd.DataFrame(rows, columns=["dataset", "attack", "training", "defense", "metric", "mean", "std"])
    return table.assign(n=5)


def experiment(attacks, trainings=None, order=None):
    trainings = trainings or {"r18": {"model": MODEL}}
    return {"attacks": attacks, "trainings": trainings, "defenses": {}, "order": order or {}}


def test_selection_table_lays_out_selections_against_settings():
    attacks = {f"{k}-{s}": backdoor(k, s, surrogate_arch=None if s == "random" else "resnet18")
               for k in ("badnets", "blended") for s in ("random", "loss")}
    rows = [("c10", name, "r18", "none", metric, value, 0.01)
            for i, name in enumerate(attacks) for metric, value in (("acc", 0.94), ("asr", 0.1 * (i + 1)))]
    table = aggregate.selection_table(aggregate.annotate(summary_rows(rows), experiment(attacks)))
    assert list(table.columns) == ["method", "metric", "badnets", "blended"]
    assert table[["method", "metric"]].values.tolist() == [["Vanilla", "BA"], ["Vanilla", "ASR"],
                                                           ["Loss Value", "BA"], ["Loss Value", "ASR"]]
    # blended-loss is the 4th attack: ASR 0.4
    assert table.iloc[3]["blended"] == "40.00 ± 1.00" and table.iloc[1]["badnets"] == "10.00 ± 1.00"


def test_selection_table_labels_numeric_settings_and_skips_ambiguous_layouts():
    attacks = {f"t{t}-{s}": backdoor(selection=s, target=t, surrogate_arch=None if s == "random" else "resnet18")
               for t in (2, 4) for s in ("random", "forgetting")}
    rows = [("c10", name, "r18", "none", "asr", 0.5, 0.0) for name in attacks]
    table = aggregate.selection_table(aggregate.annotate(summary_rows(rows), experiment(attacks)))
    assert list(table.columns) == ["method", "metric", "target 2", "target 4"]
    assert table["method"].tolist() == ["Vanilla", "Forgetting Event"]
    # two surrogates for the same setting: no cell would be unique
    attacks = {"r": backdoor(), "a": backdoor(selection="loss", surrogate_arch="resnet18"),
               "b": backdoor(selection="loss", surrogate_arch="vgg16")}
    rows = [("c10", name, "r18", "none", "asr", 0.5, 0.0) for name in attacks]
    assert aggregate.selection_table(aggregate.annotate(summary_rows(rows), experiment(attacks))) is None


def test_rate_sweep_collects_rates_per_selection():
    attacks = {f"{s}-{r}": backdoor(selection=s, rate=r, surrogate_arch=None if s == "random" else "resnet18")
               for s in ("random", "loss") for r in (0.05, 0.1, 0.2)}
    rows = [("c10", name, "r18", "none", "asr", 0.1 + i / 10, 0.02) for i, name in enumerate(attacks)]
    rows.append(("c10", "other", "r18", "none", "asr", 0.9, 0.0))  # an attack outside the experiment
    curves = aggregate.rate_sweep(aggregate.annotate(summary_rows(rows), experiment(attacks)), "asr")
    assert len(curves) == 6 and set(curves["panel"]) == {"c10, badnets"}
    loss = curves[curves["selection"] == "loss"]
    assert loss["rate"].tolist() == [0.05, 0.1, 0.2] and loss["mean"].tolist() == pytest.approx([0.4, 0.5, 0.6])
    single = {"x": backdoor(), "y": backdoor(selection="loss", surrogate_arch="resnet18")}
    rows = [("c10", name, "r18", "none", "asr", 0.5, 0.0) for name in single]
    assert aggregate.rate_sweep(aggregate.annotate(summary_rows(rows), experiment(single)), "asr") is None


def test_transfer_matrices_rows_surrogates_columns_victims():
    archs = ["resnet18", "vgg16"]
    attacks = {"random": backdoor()}
    attacks.update({f"loss-{a}": backdoor(selection="loss", surrogate_arch=a) for a in archs})
    trainings = {f"v-{a}": {"model": {"arch": a, "width": 64}} for a in archs}
    asr = {("random", "v-resnet18"): 0.3, ("random", "v-vgg16"): 0.2, ("loss-resnet18", "v-resnet18"): 0.7,
           ("loss-resnet18", "v-vgg16"): 0.6, ("loss-vgg16", "v-resnet18"): 0.5, ("loss-vgg16", "v-vgg16"): 0.8}
    rows = [("c10", a, t, "none", "asr", v, 0.0) for (a, t), v in asr.items()]
    annotated = aggregate.annotate(summary_rows(rows), experiment(attacks, trainings))
    matrices = aggregate.transfer_matrices(annotated, {"training": ["v-resnet18", "v-vgg16"]})
    assert list(matrices) == ["loss"]
    (matrix,) = matrices["loss"].values()
    assert matrix.index.tolist() == ["Vanilla", "resnet18", "vgg16"] and matrix.columns.tolist() == archs
    assert matrix.to_numpy().tolist() == [[0.3, 0.2], [0.7, 0.6], [0.5, 0.8]]


def test_unlearnable_table_rows_methods_columns_what_varies():
    attacks = {"EM": {"kind": "em", "rate": 1.0}, "TriggerUE": {"kind": "triggerue", "rate": 1.0},
               "bd": backdoor()}
    rows = [(d, a, "r18", "none", "acc", v, 0.01) for d, a, v in
            [("svhn", "TriggerUE", 0.06), ("svhn", "EM", 0.10), ("c10", "EM", 0.12), ("c10", "TriggerUE", 0.09)]]
    rows += [("c10", "bd", "r18", "none", "acc", 0.9, 0.0), ("c10", "bd", "r18", "none", "asr", 0.9, 0.0)]
    annotated = aggregate.annotate(summary_rows(rows), experiment(attacks))
    table = aggregate.unlearnable_table(annotated, {"attack": ["EM", "TriggerUE"]})
    assert table.columns.tolist() == ["method", "svhn", "c10"]  # the backdoor (it has an ASR) is not a row
    assert table.values.tolist() == [["EM", "10.00 ± 1.00", "12.00 ± 1.00"], ["TriggerUE", "6.00 ± 1.00", "9.00 ± 1.00"]]


def write_benchmark(results: Path, dataset: str, attack: str, seed: int, seconds: list[float]) -> Path:
    path = results / "benchmarks" / "poison" / dataset / attack / f"seed{seed}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"]
    lines += [f"{s}\t0:00:00\t1.0\t1.0\t1.0\t1.0\t0.0\t0.0\t0.0\t0.1" for s in seconds]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_generation_time(results: Path, dataset: str, attack: str, seed: int, seconds: float) -> None:
    """The timing attribute the poison stage records in its store (only zarr.json is read)."""
    store = results / "poison" / dataset / attack / f"seed{seed}.zarr"
    store.mkdir(parents=True)
    (store / "zarr.json").write_text(json.dumps({"attributes": {"timing": {"generation_seconds": seconds}}}))


def test_efficiency_table_from_benchmark_files(results_dir):
    results = results_dir
    paths = [write_benchmark(results, "c10", "EM", 0, [1300.0]), write_benchmark(results, "c10", "EM", 1, [1500.0]),
             write_benchmark(results, "c10", "TriggerUE", 0, [700.0, 900.0]),  # repeats: their mean
             write_benchmark(results, "svhn", "TriggerUE", 0, [30.0])]
    write_generation_time(results, "c10", "EM", 0, 1000.0)
    write_generation_time(results, "c10", "EM", 1, 1200.0)
    write_generation_time(results, "svhn", "TriggerUE", 0, 4.5)
    bench = aggregate.read_benchmarks(paths, results)
    assert bench[["dataset", "attack", "seed", "seconds", "cpu_seconds"]].values.tolist() == [
        ["c10", "EM", 0, 1300.0, 0.1], ["c10", "EM", 1, 1500.0, 0.1],
        ["c10", "TriggerUE", 0, 800.0, 0.1], ["svhn", "TriggerUE", 0, 30.0, 0.1]]
    assert bench["generation_seconds"].tolist()[:2] == [1000.0, 1200.0] and np.isnan(bench["generation_seconds"][2])
    long, wide = aggregate.efficiency_table(bench, {"attack": ["TriggerUE", "EM"], "dataset": ["svhn", "c10"]})
    em = long[long["attack"] == "EM"].iloc[0]
    assert em["runs"] == 2 and em["seconds_mean"] == 1400.0 and em["seconds_std"] == pytest.approx(np.std([1300, 1500], ddof=1))
    assert em["generation_seconds_mean"] == 1100.0
    # the generation itself where the store records it; else the whole job, marked †
    assert wide.values.tolist() == [["TriggerUE", "4.5 s", "13.3 min †"], ["EM", "–", "18.3 min"]]
    assert aggregate.duration(9000) == "2.50 h"
    with pytest.raises(ValueError, match="not a poison benchmark path"):
        aggregate.parse_benchmark_path(results / "benchmarks" / "poison" / "c10" / "x.tsv", results)


def test_run_writes_the_report_views(results_dir, write_metrics):
    results = results_dir
    attacks = {f"{s}-{r}": backdoor(selection=s, rate=r, surrogate_arch=None if s == "random" else "resnet18")
               for s in ("random", "loss") for r in (0.1, 0.2)}
    attacks["EM"] = {"kind": "em", "rate": 1.0}
    paths, benches = [], []
    for name in attacks:
        for seed in (0, 1):
            metrics = {"acc": 0.9 + seed / 100}
            if name != "EM":
                metrics["asr"] = 0.5 + seed / 10
            paths.append(str(write_metrics(results, metrics, "c10", name, "r18", seed)))
            benches.append(str(write_benchmark(results, "c10", name, seed, [10.0 + seed])))
    stale = results / "report" / "transfer_loss.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")

    class Args:
        pass

    args = Args()
    args.results, args.metrics, args.benchmarks = str(results), paths, benches
    args.experiment = json.dumps(experiment(attacks, order={"attack": list(attacks), "dataset": ["c10"]}))
    aggregate.run(args)
    report = results / "report"
    assert sorted(p.name for p in report.iterdir()) == sorted(
        ["index.md", "selection.md", "selection.csv", "selection.tex", "rate_asr.png", "rate_asr.pdf",
         "rate_asr.csv", "rate_acc.png", "rate_acc.pdf", "rate_acc.csv", "unlearnable.md", "unlearnable.csv",
         "unlearnable.tex", "efficiency.md", "efficiency.csv", "efficiency.tex"])
    assert is_png(report / "rate_asr.png") and not stale.exists()
    assert (report / "rate_asr.pdf").read_bytes()[:5] == b"%PDF-"
    assert "whole job's wall clock" in (report / "efficiency.md").read_text()
    tex = (report / "unlearnable.tex").read_text()
    assert "\\begin{tabular}{lr}" in tex and "EM & 90.50 $\\pm$ 0.71 \\\\" in tex
    assert "| EM | 90.50 ± 0.71 |" in (report / "unlearnable.md").read_text()
    assert "[selection.md](selection.md)" in (report / "index.md").read_text()
    assert pd.read_csv(report / "rate_asr.csv")["mean"].tolist() == pytest.approx([0.55] * 4)
    # the outputs that existed before the report keep their meaning
    assert pd.read_csv(results / "metrics.csv").shape == (5 * 2 * 2 - 2, 7)
    assert (results / "tables" / "summary.md").exists() and is_png(results / "figures" / "summary.png")


def test_embedding_distances_pair_each_poisoned_image_with_its_clean_version():
    from poisonflow.stages.figures import embedding_distances

    clean = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0], [10.0, 0.0]])
    poisoned = clean.copy()
    poisoned[1] += [0.0, 2.0]  # sample 1 poisoned: moved by 2
    labels = np.array([0, 0, 1, 1])
    flags = np.array([False, True, False, False])
    groups = embedding_distances(clean, poisoned, labels, flags, pairs=50, seed=0)
    np.testing.assert_allclose(groups["clean vs poisoned (same image)"], [2.0])
    assert set(np.round(groups["intra-class"], 6)) <= {5.0, round(np.sqrt(101), 6)}
    assert set(np.round(groups["inter-class"], 6)) <= {1.0, 10.0, round(np.sqrt(18), 6), round(np.sqrt(65), 6)}
    assert len(groups["intra-class"]) > 0 and len(groups["inter-class"]) > 0


def test_embedding_figure_entry_names_a_simclr_features_entry(tiny_config, load_config):
    from poisonflow.errors import ConfigError
    from poisonflow.stages.figures import check_figures

    tiny_config["features"] = {"c": {"extractor": "clip", "weights": "w.pt"}}
    tiny_config["figures"] = {"f": {"kind": "embedding-distances", "dataset": "digits", "attack": "a", "features": "c"}}
    cfg = load_config({k: v for k, v in tiny_config.items() if k != "figures"})
    entry = {"kind": "embedding-distances", "dataset": "digits", "attack": "a", "features": "c", "seed": 0}
    with pytest.raises(ConfigError, match=r"^figures\.f\.features: 'c' is not a SimCLR entry"):
        check_figures({**cfg.data, "figures": {"f": entry}}, cfg.describe)
