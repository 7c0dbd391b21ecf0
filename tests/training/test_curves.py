"""Learning curves (A-ABL Fig. 8): per-epoch accuracy of benign and poisoned samples, plain and iFGSM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from poisonflow.curves import CurveRecorder, accuracies, curve_samples, read_curves
from poisonflow.errors import ConfigError
from poisonflow.trainer import EpochEnd


class Mean(nn.Module):
    """Class 1 when the mean brightness exceeds 0.5 (logit 40·(mean − 0.5))."""

    def forward(self, x):
        score = 40 * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_samples_are_drawn_once_per_group_and_capped():
    poisoned = np.zeros(100, bool)
    poisoned[[3, 50, 70]] = True
    groups = curve_samples(poisoned, 10, seed=0)
    assert len(groups["benign"]) == 10 and not poisoned[groups["benign"]].any()
    assert groups["poisoned"].tolist() == [3, 50, 70]
    assert np.array_equal(curve_samples(poisoned, 10, seed=0)["benign"], groups["benign"])


def test_ifgsm_accuracy_counts_what_the_budget_cannot_flip():
    # mean 0.5216 (class 1): ε 4/255 cannot bring it below 0.5, ε 8/255 can
    images = np.full((4, 8, 8, 3), 133, dtype=np.uint8)
    labels = np.ones(4, dtype=np.int64)
    assert accuracies(Mean(), images, labels, 4 / 255, 5, "cpu") == (1.0, 1.0)
    assert accuracies(Mean(), images, labels, 8 / 255, 5, "cpu") == (1.0, 0.0)


def test_recorder_writes_a_row_per_epoch_and_keeps_them_across_a_resume(tmp_path):
    images = np.concatenate([np.full((6, 8, 8, 3), 60, np.uint8), np.full((2, 8, 8, 3), 133, np.uint8)])
    labels = np.array([0] * 6 + [1, 1])
    poisoned = np.array([False] * 6 + [True, True])
    settings = {"eps": 8 / 255, "steps": 5, "samples": 4}
    path = tmp_path / "curves.csv"
    recorder = CurveRecorder(path, images, labels, poisoned, settings, seed=0, device="cpu")
    model = Mean().train()
    for epoch in (1, 2):
        recorder(EpochEnd(epoch, {}, model))
    assert model.training  # the recorder leaves the model in the mode it found
    rows = read_curves(path)
    assert [row["epoch"] for row in rows] == [1.0, 2.0]
    assert rows[0]["benign_nat"] == 1.0 and rows[0]["benign_adv"] == 1.0  # 0.235 is far from 0.5
    assert rows[0]["poisoned_nat"] == 1.0 and rows[0]["poisoned_adv"] == 0.0
    # a resumed training (after epoch 1's checkpoint) rewrites epoch 2 and keeps epoch 1
    resumed = CurveRecorder(path, images, labels, poisoned, settings, seed=0, device="cpu")
    resumed(EpochEnd(2, {}, model))
    assert [row["epoch"] for row in read_curves(path)] == [1.0, 2.0]


def test_figure_needs_the_curves_to_be_recorded(tiny_config, load_config):
    from poisonflow.stages.figures import check_figures

    # left out of the jobs' evaluation JSON while null: adding the key reran no victim
    assert "curves" not in load_config(tiny_config).spec_json("evaluation")
    tiny_config["figures"] = {"fig8": {"kind": "learning-curves", "dataset": "digits", "training": "t",
                                       "attacks": ["a"]}}
    config = load_config(tiny_config)
    with pytest.raises(ConfigError, match=r"figures\.fig8: .*evaluation\.curves"):
        check_figures(config.data, config.describe)
    tiny_config["evaluation"] = {"curves": {"eps": 0.01}}
    config = load_config(tiny_config)
    check_figures(config.data, config.describe)
    assert config.data["evaluation"]["curves"] == {"eps": 0.01, "steps": 5, "samples": 500}
    assert '"curves":{"eps":0.01' in config.spec_json("evaluation")


def test_learning_curves_figure_is_drawn(tmp_path):
    from poisonflow.figures import learning_curves

    rows = [{"epoch": e, "benign_nat": 0.5 + 0.1 * e, "benign_adv": 0.1 * e, "poisoned_nat": 0.9,
             "poisoned_adv": 0.8} for e in (1, 2, 3)]
    path = learning_curves({"BadNets": rows, "Blend": rows}, tmp_path / "fig8.png", "cifar10")
    assert path.stat().st_size > 1000 and path.with_suffix(".pdf").exists()


def test_a_defense_hands_the_observer_to_its_final_training(tmp_path):
    from defense_utils import tiny_context

    from poisonflow.defenses import adv_train

    ctx = tiny_context(tmp_path, n=60)
    poisoned = np.zeros(60, bool)
    poisoned[:6] = True
    ctx.observer = CurveRecorder(tmp_path / "curves.csv", ctx.train_images, ctx.train_labels, poisoned,
                                 {"eps": 2 / 255, "steps": 1, "samples": 10}, seed=0, device="cpu")
    adv_train.run({"kind": "adv-train", "training": {"epochs": 2, "adversarial": None}}, ctx)
    rows = read_curves(tmp_path / "curves.csv")
    assert [row["epoch"] for row in rows] == [1.0, 2.0]
    assert all(0.0 <= row[column] <= 1.0 for row in rows for column in ("benign_nat", "poisoned_adv"))
