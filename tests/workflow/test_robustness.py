"""Robustness entries: a cached victim scored under test-time distortions (ACC/ASR/RA per level), on a
user folder, one job per victim × entry; the aggregate's table and curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from poisonflow.errors import ConfigError
from poisonflow.stages.aggregate import robustness_rows, robustness_summary, robustness_table, write_robustness
from poisonflow.stages.robustness import Evaluation, draw, scorer
from workflow_utils import planned_jobs, write_config


class BrightestPixel(nn.Module):
    """Class 1 when the brightest value of the image exceeds 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.amax(dim=(1, 2, 3))
        return torch.stack([0.5 - peak, peak - 0.5], dim=1)


def dark(n: int, size: int = 16) -> np.ndarray:
    return np.full((n, size, size, 3), 25, dtype=np.uint8)  # 0.1 in [0, 1]


def evaluation(clean, asr, target=1, seed=0, classes=("zero", "one", "two")) -> Evaluation:
    """Clean images of class 0 and triggered images of true class 0 with target ``target``."""
    return Evaluation(clean, np.zeros(len(clean), int), asr, np.full(len(asr), target), np.zeros(len(asr), int),
                      list(classes), clean.shape[1], target, seed)


def score(entry, data, model=None):
    return scorer(entry["kind"])(model or BrightestPixel(), entry, "robustness.r", data)


def test_blur_spreads_a_one_pixel_trigger_below_the_detectors_threshold():
    clean, asr = dark(4), dark(4)
    asr[:, 8, 8] = 255  # the trigger: one white pixel
    rows = score({"kind": "blur", "levels": [1, 3, 9], "settings": {}}, evaluation(clean, asr))
    assert [row["level"] for row in rows] == [1, 3, 9]
    # k=3 (σ 0.8): the centre keeps 0.272 of the pixel, 0.1 + 0.9·0.272 = 0.345 < 0.5
    assert [(row["acc"], row["asr"], row["ra"]) for row in rows] == [(1.0, 1.0, 0.0), (1.0, 0.0, 1.0), (1.0, 0.0, 1.0)]
    assert [row["target_rate"] for row in rows] == [0.0, 0.0, 0.0]  # class-0 images are not sent to class 1


def test_the_target_rate_is_the_asr_a_distortion_gives_without_a_trigger():
    # a model that calls every image brighter than 0.3 class 1: noise pushes dark clean images there too
    clean, asr = dark(40), dark(40)
    asr[:, 8, 8] = 255
    rows = score({"kind": "noise", "levels": [0, 28], "settings": {}}, evaluation(clean, asr, seed=1))
    assert rows[0]["target_rate"] == 0.0 and rows[0]["asr"] == 1.0
    assert rows[1]["target_rate"] == pytest.approx(1 - rows[1]["acc"])  # every clean image is class 0, target 1


def test_noise_levels_draw_the_same_noise_for_every_victim():
    clean, asr = dark(50), dark(50)
    entry = {"kind": "noise", "levels": [0, 28], "settings": {}}
    first = score(entry, evaluation(clean, asr, seed=3))
    assert first == score(entry, evaluation(clean, asr, seed=3))
    assert first[0]["acc"] == 1.0 and first[0]["asr"] == 0.0  # σ 0: untouched
    # σ 28 grey levels: a pixel passes 0.5 (+102.5 levels, 3.66 σ) with p 1.3e-4; some of the 768
    # values of an image does with p ≈ 0.09, so a few of the 50 images flip in each set
    assert 0 < first[1]["asr"] < 0.3 and first[1]["asr"] + first[1]["ra"] == 1.0
    assert 0.7 < first[1]["acc"] < 1.0


def test_a_level_out_of_range_names_the_entry():
    with pytest.raises(ConfigError, match=r"robustness\.r\.levels"):
        score({"kind": "blur", "levels": [4], "settings": {}}, evaluation(dark(1), dark(1)))


def test_folder_scores_triggered_images_against_the_target(tmp_path):
    from PIL import Image

    for name, value in (("zero", 255), ("one", 255), ("two", 10)):
        (tmp_path / name).mkdir()
        image = np.full((20, 20, 3), 25, dtype=np.uint8)
        image[10, 10] = value
        Image.fromarray(image).save(tmp_path / name / "a.png")
    entry = {"kind": "folder", "path": str(tmp_path), "triggered": True}
    # target 1: class "one" is not scored; "zero" flips (white pixel), "two" does not
    [row] = score(entry, evaluation(dark(1), dark(1)))
    assert (row["images"], row["asr_images"], row["asr"], row["ra"]) == (3, 2, 0.5, 0.0)
    [row] = score({**entry, "triggered": False}, evaluation(dark(1), dark(1)))
    assert row["acc"] == pytest.approx(1 / 3)  # "one" (predicted 1); "zero" → 1, "two" → 0 ≠ 2


class Linear(nn.Module):
    """Two classes from the mean brightness: logit of class 1 = 40·(mean − 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = 40 * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_ifgsm_moves_images_by_its_budget_against_the_scored_label():
    # images at 0.52 are class 1 (the target); every pixel can move by ε, so the mean falls by ε:
    # ε 4/255 (0.0157) leaves them above 0.5, ε 8/255 (0.031) flips them back to class 0 (RA)
    asr = np.full((3, 8, 8, 3), 133, dtype=np.uint8)  # 0.5216
    clean = np.full((3, 8, 8, 3), 100, dtype=np.uint8)  # class 0, far from the boundary
    rows = score({"kind": "ifgsm", "levels": [0, 4, 8], "settings": {"steps": 5}}, evaluation(clean, asr), Linear())
    assert [(r["level"], r["acc"], r["asr"], r["ra"]) for r in rows] == [
        (0, 1.0, 1.0, 0.0), (4, 1.0, 1.0, 0.0), (8, 1.0, 0.0, 1.0)]
    # by steps at ε 8: 0 steps is no attack; one step of 8/255 is the whole budget
    rows = score({"kind": "ifgsm-steps", "levels": [0, 1], "settings": {"eps": 8}}, evaluation(clean, asr), Linear())
    assert [r["asr"] for r in rows] == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"robustness\.r\.levels\[1\]"):
        score({"kind": "ifgsm-steps", "levels": [1, 2.5]}, evaluation(clean, asr), Linear())


def test_draw_caps_the_sample_and_keeps_order():
    chosen = draw(100, 10, np.random.default_rng(0))
    assert len(chosen) == 10 and np.all(np.diff(chosen) > 0)
    assert np.array_equal(draw(5, None, np.random.default_rng(0)), np.arange(5))


def write_job(results, attack, seed, rows, name="blur", kind="blur"):
    path = results / "robustness" / "digits" / attack / "quick" / f"seed{seed}" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "kind": kind, "rows": rows}))
    return path


def test_aggregate_averages_seeds_per_level_and_draws_one_curve_per_entry(tmp_path):
    results = tmp_path / "results"
    paths = [write_job(results, "badnets", 0, [{"level": 1, "acc": 0.9, "asr": 1.0, "ra": 0.0},
                                               {"level": 9, "acc": 0.5, "asr": 0.2, "ra": 0.5}]),
             write_job(results, "badnets", 1, [{"level": 1, "acc": 0.7, "asr": 0.5, "ra": 0.0},
                                               {"level": 9, "acc": 0.5, "asr": 0.0, "ra": 0.7}]),
             write_job(results, "vssc", 0, [{"level": None, "images": 3, "asr": 1.0, "ra": 0.0}], "photos", "folder")]
    rows = robustness_rows(paths, results)
    summary = robustness_summary(rows)
    badnets = summary[(summary.attack == "badnets") & (summary.metric == "asr")]
    assert badnets["mean"].tolist() == pytest.approx([0.75, 0.1])
    assert badnets["std"].tolist() == pytest.approx([0.353553, 0.141421], abs=1e-6)
    table = robustness_table(summary)
    first = table[(table.attack == "badnets") & (table.level == 1)].iloc[0]
    assert (first["ACC"], first["ASR"]) == ("80.00 ± 14.14", "75.00 ± 35.36")
    folder = table[table.entry == "photos"].iloc[0]
    assert folder["ASR"] == "100.00 ± –" and folder["level"] == "–"
    # levels ascending in each group even where another entry has an equal level first (1 and 1.0)
    recapture = [write_job(results, "badnets", 0, [{"level": 0, "acc": 1.0}, {"level": 0.5, "acc": 0.9},
                                                   {"level": 1.0, "acc": 0.8}], "recapture", "recapture")]
    mixed = robustness_summary(robustness_rows(paths + recapture, results))
    assert mixed[mixed.entry == "recapture"]["level"].tolist() == [0, 0.5, 1.0]
    written = write_robustness(rows, tmp_path / "report")
    assert "robustness.md" in written and "robustness_digits_quick_blur.png" in written
    assert "robustness_digits_quick_photos.png" not in written  # a folder has no levels to draw
    assert (tmp_path / "report" / "robustness_digits_quick_blur.png").stat().st_size > 0


WORKFLOW = {
    "datasets": {"digits": {"source": "digits"}},
    "models": {"tiny": {"arch": "convnet", "width": 4}},
    "trainings": {"fast": {"model": "tiny", "epochs": 1, "batch_size": 32}},
    "attacks": {"badnets": {"kind": "badnets", "target": 0, "rate": 0.1},
                "blended": {"kind": "blended", "target": 0, "rate": 0.1}},
    "defenses": {"none": {"kind": "none"}},
    "robustness": {"blur": {"kind": "blur", "levels": [1, 3]}, "jpeg": {"kind": "jpeg"}},
    "figures": {"cams": {"kind": "gradcam", "dataset": "digits", "training": "fast", "attacks": ["badnets"],
                         "distortions": {"blur": 3}}},
    "evaluation": {"pgd": None},
    "experiments": [{"dataset": ["digits"], "attack": ["badnets", "blended"], "training": ["fast"],
                     "defense": ["none"], "seed": [0, 1], "robustness": ["blur", "jpeg"]}],
}


def test_one_robustness_job_per_victim_and_entry_and_a_gradcam_figure(tmp_path):
    write_config(tmp_path, WORKFLOW)
    jobs = planned_jobs(tmp_path)
    robustness = sorted(job for job in jobs if job[0] == "robustness")
    assert len(robustness) == 2 * 2 * 2  # attacks × seeds × entries
    assert ("robustness", "attack=blended", "dataset=digits", "robustness=jpeg", "seed=1", "training=fast") in robustness
    assert sum(job[0] == "victim" for job in jobs) == 4  # the victims are shared, never retrained
    assert sum(job[0] == "figure_gradcam" for job in jobs) == 1


def test_config_errors_name_the_robustness_key(tiny_config, load_config):
    tiny_config["experiments"][0]["robustness"] = ["missing"]
    with pytest.raises(ConfigError, match=r"experiments\[0\]\.robustness: no robustness entry named 'missing'"):
        load_config(tiny_config)
    from poisonflow.stages.robustness import check_entries  # run by the workflow when it parses the config

    tiny_config["robustness"] = {"missing": {"kind": "blur", "levels": [1, 4]}}
    with pytest.raises(ConfigError, match=r"robustness\.missing\.levels"):
        check_entries(load_config(tiny_config).data)
    tiny_config["robustness"] = {"missing": {"kind": "folder"}}
    with pytest.raises(ConfigError, match=r"robustness\.missing\.path"):
        check_entries(load_config(tiny_config).data)
    tiny_config["robustness"] = {"missing": {"kind": "ifgsm-steps", "levels": [2.5]}}
    with pytest.raises(ConfigError, match=r"robustness\.missing\.levels\[0\]"):
        check_entries(load_config(tiny_config).data)
