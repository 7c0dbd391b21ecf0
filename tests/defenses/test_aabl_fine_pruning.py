"""A-ABL, its adversarial-training baseline and fine-pruning, with their SCE loss and Otsu threshold."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from poisonflow.kinds import defaults_of, settings_for
from poisonflow.defenses import DEFENSES, DefenseContext, merge
from poisonflow.defenses import aabl, adv_train, fine_pruning
from poisonflow.errors import ConfigError
from poisonflow.losses import symmetric_cross_entropy
from poisonflow.thresholds import otsu_threshold
from poisonflow.trainer import images_to_tensor, to_float, train_model, training_digest
from defense_utils import TINY_TRAINING, tiny_context

torch.set_num_threads(1)

RCE_SCALE = -math.log(1e-4)  # ≈ 9.2103



# --- symmetric cross entropy ----------------------------------------------------------------------


def reference_sce(logits: np.ndarray, labels: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    p_y = p[np.arange(len(labels)), labels]
    return alpha * -np.log(np.clip(p_y, 1e-7, 1.0)) + beta * RCE_SCALE * (1 - p_y)


def test_sce_of_uniform_prediction_is_alpha_ln2_plus_half_rce_scale():
    loss = symmetric_cross_entropy(torch.zeros(1, 2), torch.tensor([0]), alpha=0.1, beta=1.0)
    assert loss.item() == pytest.approx(0.1 * math.log(2) + 0.5 * RCE_SCALE, rel=1e-6)
    assert loss.item() == pytest.approx(4.67446, abs=1e-4)


def test_sce_matches_formula_on_hand_made_logits():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-30.0, 0.0, 5.0], [1.0, 3.0, 0.5], [9.0, -9.0, 0.0]])
    labels = np.array([0, 1, 0, 2, 0])
    expected = reference_sce(logits, labels, alpha=0.1, beta=1.0)
    got = symmetric_cross_entropy(torch.tensor(logits), torch.tensor(labels), alpha=0.1, beta=1.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    # sample 2 has p_y ≈ 6e-16: CE is clipped at −ln 1e-7 and RCE is at its maximum
    assert got[2].item() == pytest.approx(0.1 * -math.log(1e-7) + RCE_SCALE, rel=1e-6)
    # other weights and reductions
    expected_cifar100 = reference_sce(logits, labels, alpha=6.0, beta=0.1)
    got_sum = symmetric_cross_entropy(torch.tensor(logits), torch.tensor(labels), 6.0, 0.1, reduction="sum")
    got_mean = symmetric_cross_entropy(torch.tensor(logits), torch.tensor(labels), 6.0, 0.1, reduction="mean")
    assert got_sum.item() == pytest.approx(expected_cifar100.sum(), rel=1e-6)
    assert got_mean.item() == pytest.approx(expected_cifar100.mean(), rel=1e-6)


def test_sce_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        symmetric_cross_entropy(torch.zeros(1, 2), torch.tensor([0]), 0.1, 1.0, reduction="max")


# --- Otsu threshold -------------------------------------------------------------------------------


def brute_force_high_class(values: np.ndarray) -> np.ndarray:
    """The high class of the prefix/suffix split of the sorted values with the largest σ_B²."""
    order = np.sort(values)
    best, best_cut = -1.0, None
    for cut in range(1, len(order)):
        low, high = order[:cut], order[cut:]
        w0, w1 = len(low) / len(order), len(high) / len(order)
        variance = w0 * w1 * (low.mean() - high.mean()) ** 2
        if variance > best:
            best, best_cut = variance, cut
    return values >= order[best_cut]


def test_otsu_on_hand_made_values():
    # cut after the 1s: σ_B² = (5/7)(2/7)(0.6 − 10)² ≈ 18.0 beats the cut after the 0s (≈ 4.3)
    assert otsu_threshold(np.array([0, 0, 1, 1, 1, 10, 10])) == 5.5


def test_otsu_separates_two_normal_clusters():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0, 1, 400), rng.normal(12, 1, 200)
    values = rng.permutation(np.concatenate([low, high]))
    threshold = otsu_threshold(values)
    assert low.max() < threshold < high.min()
    np.testing.assert_array_equal(values > threshold, np.isin(values, high))


@pytest.mark.parametrize("seed", range(6))
def test_otsu_equals_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.exponential(1.0, 9), rng.normal(4.0, 1.5, 6)])
    bins = 100_000
    counts, _ = np.histogram(values, bins=bins)
    assert counts.max() == 1  # every value in its own bin: the histogram search sees every cut
    threshold = otsu_threshold(values, bins=bins)
    np.testing.assert_array_equal(values > threshold, brute_force_high_class(values))


def test_otsu_of_constant_values_keeps_nothing_above():
    assert otsu_threshold(np.full(5, 3.0)) == 3.0
    with pytest.raises(ValueError, match="NaN"):
        otsu_threshold(np.array([1.0, np.nan]))


# --- A-ABL split ----------------------------------------------------------------------------------


class MeanBrightness(nn.Module):
    """Logits (0, a·(mean pixel − 1/2)): class 1 iff the image is brighter than mid-grey.

    iFGSM's sign gradient is the same for every pixel, so the attack moves every pixel by ε
    towards the other class and the margin shrinks by exactly a·ε: samples within ε of mid-grey
    flip (vulnerable), the rest keep their class (robust).
    """

    def __init__(self, pixels: int, slope: float):
        super().__init__()
        self.linear = nn.Linear(pixels, 2)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[1] = slope / pixels
            self.linear.bias.copy_(torch.tensor([0.0, -slope / 2]))

    def forward(self, x):
        return self.linear(x.flatten(1))


def grey_images(levels: list[int], size: int = 2) -> np.ndarray:
    return np.stack([np.full((size, size, 3), level, dtype=np.uint8) for level in levels])


def test_split_keeps_the_vulnerable_and_removes_the_robust():
    # levels far from 127.5 are robust to ε = 0.1 (25.5 levels); those within 20 levels are not
    robust = [10, 20, 30, 225, 235, 245]
    vulnerable = [110, 115, 120, 125, 130, 135, 140, 145]
    levels = robust + vulnerable
    images, labels = grey_images(levels), (np.array(levels) > 127.5).astype(np.int64)
    slope = 20.0
    model = MeanBrightness(pixels=12, slope=slope)
    split = merge(defaults_of(aabl.__name__)["split"], {"eps": 0.1, "steps": 5, "step": None, "batch_size": 5})

    result = aabl.split_by_vulnerability(model, images, labels, split)

    # expected: each pixel moved by ε towards the other class
    x_adv = np.array(levels) / 255 + np.where(labels == 0, 0.1, -0.1)
    margin = slope * (x_adv - 0.5)  # logit of class 1 minus logit of class 0
    p_y = np.where(labels == 1, 1 / (1 + np.exp(-margin)), 1 / (1 + np.exp(margin)))
    expected = 0.1 * -np.log(p_y) + 1.0 * RCE_SCALE * (1 - p_y)
    np.testing.assert_allclose(result.losses, expected, rtol=1e-4)
    np.testing.assert_array_equal(result.kept, np.isin(levels, vulnerable))
    assert expected[: len(robust)].max() < result.threshold < expected[len(robust):].min()

    # max_kept caps γ: Otsu keeps 8 of 14; at most half (7) are kept, the 7 of highest SCE
    capped = aabl.split_by_vulnerability(model, images, labels, {**split, "max_kept": 0.5})
    assert capped.kept.sum() == 7 and (capped.kept <= result.kept).all()  # within the vulnerable 8
    assert capped.losses[capped.kept].min() >= capped.losses[~capped.kept].max()
    assert capped.threshold == pytest.approx(np.sort(expected)[::-1][7], rel=1e-4)  # the highest SCE left out
    assert np.array_equal(aabl.split_by_vulnerability(model, images, labels, {**split, "max_kept": 0.6}).kept,
                          result.kept)  # 8/14 < 0.6: Otsu's split stands


def test_split_with_sce_attack_loss_agrees_on_a_linear_model():
    levels = [10, 30, 225, 245, 115, 125, 130, 140]
    images, labels = grey_images(levels), (np.array(levels) > 127.5).astype(np.int64)
    split = merge(defaults_of(aabl.__name__)["split"], {"eps": 0.1, "step": None, "attack_loss": "sce"})
    result = aabl.split_by_vulnerability(MeanBrightness(12, 20.0), images, labels, split)
    np.testing.assert_array_equal(result.kept, [False] * 4 + [True] * 4)


# --- A-ABL end to end -----------------------------------------------------------------------------

AABL_SPEC = {
    "kind": "aabl",
    "stage1": {"epochs": 2},
    "split": {"eps": 8 / 255},
    "stage3": {"epochs": 1, "adversarial": {"eps": 4 / 255, "step": 2 / 255, "steps": 2}},
}


def test_aabl_runs_end_to_end_and_resumes_from_its_checkpoints(tmp_path):
    ctx = tiny_context(tmp_path)
    result = DEFENSES.get("aabl").run(AABL_SPEC, ctx)

    assert result.kept.dtype == bool and result.kept.shape == (120,)
    assert 0 < result.metrics["gamma"] <= 1
    assert result.metrics["gamma"] == pytest.approx(result.kept.mean())
    assert isinstance(result.metrics["threshold"], float)
    logits = result.model(to_float(images_to_tensor(ctx.train_images[:4])))
    assert logits.shape == (4, 3)

    # stage 1 trained with Adam on all samples, stage 3 adversarially on the kept ones only
    resolved = settings_for(aabl.__name__, AABL_SPEC)
    stage1 = torch.load(ctx.workdir / "stage1.pt", weights_only=True)
    stage3 = torch.load(ctx.workdir / "stage3.pt", weights_only=True)
    stage1_training = merge(TINY_TRAINING, resolved["stage1"])
    stage3_training = merge(TINY_TRAINING, resolved["stage3"])
    assert stage1_training["optimizer"]["name"] == "adam" and stage1_training["optimizer"]["lr"] == 1e-3
    assert stage3_training["adversarial"] == {"eps": 4 / 255, "step": 2 / 255, "steps": 2}
    # both stages start from the same seeded fresh model
    assert stage1["digest"] == training_digest(ctx.fresh_model(), ctx.train_images, ctx.train_labels,
                                               stage1_training, seed=0)
    assert stage3["digest"] == training_digest(ctx.fresh_model(), ctx.train_images, ctx.train_labels,
                                               stage3_training, seed=0, subset=result.kept)
    assert stage1["epoch"] == 2 and stage3["epoch"] == 1

    # the split's scores: SCE of the stage-1 model on the unperturbed samples, and after iFGSM (never lower)
    before, after = result.sample_scores["SCE before iFGSM"], result.sample_scores["SCE after iFGSM"]
    stage1_model = ctx.fresh_model()
    stage1_model.load_state_dict(stage1["model"])
    stage1_model.eval()
    with torch.no_grad():
        direct = symmetric_cross_entropy(stage1_model(to_float(images_to_tensor(ctx.train_images))),
                                         torch.as_tensor(ctx.train_labels), 0.1, 1.0).double().numpy()
    np.testing.assert_allclose(before, direct, rtol=1e-5, atol=1e-6)
    assert (after >= before - 1e-5).mean() > 0.95
    np.testing.assert_array_equal(result.kept, after > result.thresholds["SCE after iFGSM"])

    # Fig. 11: the whole set's SCE under the final (stage-3) model, before and after the same iFGSM
    final_before = result.sample_scores["final model: SCE before iFGSM"]
    final_after = result.sample_scores["final model: SCE after iFGSM"]
    result.model.eval()
    with torch.no_grad():
        direct = symmetric_cross_entropy(result.model(to_float(images_to_tensor(ctx.train_images))),
                                         torch.as_tensor(ctx.train_labels), 0.1, 1.0).double().numpy()
    np.testing.assert_allclose(final_before, direct, rtol=1e-5, atol=1e-6)
    assert final_after.shape == (120,) and (final_after >= final_before - 1e-5).mean() > 0.95
    assert not np.allclose(final_before, before)  # another model than stage 1's
    assert set(result.thresholds) == {"SCE after iFGSM"}  # the Otsu line belongs to the split alone
    without = aabl.run({**AABL_SPEC, "final_scores": False}, ctx)
    assert set(without.sample_scores) == {"SCE before iFGSM", "SCE after iFGSM"}

    # a rerun loads both stages and the split instead of recomputing them
    again = aabl.run(AABL_SPEC, ctx)
    np.testing.assert_array_equal(again.kept, result.kept)
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


def test_aabl_rejects_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match="aabl.split.epsilon"):
        settings_for(aabl.__name__, {"kind": "aabl", "split": {"epsilon": 0.1}})
    with pytest.raises(ConfigError, match="aabl.split.attack_loss"):
        settings_for(aabl.__name__, {"split": {"attack_loss": "mse"}})
    with pytest.raises(ConfigError, match="aabl.stage2"):
        settings_for(aabl.__name__, {"stage2": {}})


def test_aabl_defaults_follow_the_paper():
    assert defaults_of(aabl.__name__)["stage1"]["epochs"] == 20
    assert defaults_of(aabl.__name__)["stage1"]["optimizer"] == {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}
    assert defaults_of(aabl.__name__)["split"]["eps"] == 2 / 255 and defaults_of(aabl.__name__)["split"]["steps"] == 5
    assert defaults_of(aabl.__name__)["split"]["step"] == pytest.approx(2 / 255)  # "a step size equal to 2/255"
    assert (defaults_of(aabl.__name__)["split"]["sce_alpha"], defaults_of(aabl.__name__)["split"]["sce_beta"]) == (0.1, 1.0)
    assert defaults_of(aabl.__name__)["stage3"]["adversarial"] == {"eps": 8 / 255, "step": 2 / 255, "steps": 10}


# --- fine-pruning ---------------------------------------------------------------------------------


def trained_victim(ctx: DefenseContext) -> nn.Module:
    torch.manual_seed(0)
    model = ctx.build_model()
    return train_model(model, ctx.train_images, ctx.train_labels, TINY_TRAINING, seed=0).model


def test_clean_split_is_a_seeded_fraction():
    first = fine_pruning.clean_split(1000, 0.05, seed=3)
    assert len(first) == 50 and len(np.unique(first)) == 50 and first.max() < 1000
    np.testing.assert_array_equal(first, fine_pruning.clean_split(1000, 0.05, seed=3))
    assert not np.array_equal(first, fine_pruning.clean_split(1000, 0.05, seed=4))
    assert len(fine_pruning.clean_split(10, 0.01, seed=0)) == 1


def test_fine_pruning_prunes_least_active_channels_and_fine_tunes_a_copy(tmp_path):
    ctx = tiny_context(tmp_path)
    ctx.victim = trained_victim(ctx)
    victim_state = copy.deepcopy(ctx.victim.state_dict())
    spec = {"kind": "fine-pruning", "clean_fraction": 1.0, "ratio": 0.25, "finetune": {"epochs": 1}}

    result = DEFENSES.get("fine-pruning").run(spec, ctx)

    channels = 16  # convnet width 4: last stage has 4·4 channels
    mask = result.model.channel_mask
    assert result.metrics == {"pruned_channels": 4, "clean_samples": 120}
    assert int((mask == 0).sum()) == 4 and int((mask == 1).sum()) == channels - 4
    # the zeroed channels are the four least active ones of the victim on the clean split
    with torch.no_grad():
        x = to_float(images_to_tensor(ctx.reserve_images))
        activation = ctx.victim.body((x - ctx.victim.mean) / ctx.victim.std).mean(dim=(0, 2, 3))
    assert activation[mask == 0].max() <= activation[mask == 1].min() + 1e-6
    with torch.no_grad():
        assert torch.count_nonzero(result.model.feature_map(x)[:, mask == 0]) == 0
    # fine-tuning changed the weights; the victim is untouched
    assert result.model is not ctx.victim
    assert not torch.equal(result.model.fc.weight, victim_state["fc.weight"])
    assert not torch.equal(result.model.body[0].weight, victim_state["body.0.weight"])
    for name, tensor in ctx.victim.state_dict().items():
        assert torch.equal(tensor, victim_state[name]), name
    assert (tmp_path / "work" / "finetune.pt").exists()


def test_fine_pruning_uses_the_clean_fraction_and_needs_a_victim(tmp_path):
    ctx = tiny_context(tmp_path)
    with pytest.raises(ValueError, match="victim"):
        fine_pruning.run({"kind": "fine-pruning"}, ctx)
    ctx.victim = trained_victim(ctx)
    result = fine_pruning.run({"clean_fraction": 0.25, "ratio": 0.5, "finetune": {"epochs": 1}}, ctx)
    assert result.metrics == {"pruned_channels": 8, "clean_samples": 30}
    with pytest.raises(ConfigError, match="fine-pruning.ratio"):
        settings_for(fine_pruning.__name__, {"ratio": 1.0})


# --- adversarial training (A-ABL's "Adv. Train" baseline) ----------------------------------------


def test_defaults_are_madrys_cifar_budget():
    adversarial = defaults_of(adv_train.__name__)["training"]["adversarial"]
    assert adversarial["eps"] == pytest.approx(8 / 255) and adversarial["step"] == pytest.approx(2 / 255)
    assert adversarial["steps"] == 10


def test_trains_a_fresh_model_adversarially_on_every_sample(tmp_path, monkeypatch):
    seen = {}
    original = adv_train.train_model

    def spy(model, images, labels, training, **kwargs):
        seen.update(training=training, n=len(labels), subset=kwargs.get("subset"),
                    fresh=all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), initial.values())))
        return original(model, images, labels, training, **kwargs)

    ctx = tiny_context(tmp_path)
    torch.manual_seed(ctx.seed)
    initial = {k: v.clone() for k, v in ctx.build_model().state_dict().items()}
    monkeypatch.setattr(adv_train, "train_model", spy)
    result = adv_train.run({"kind": "adv-train", "training": {"epochs": 2, "adversarial": {"steps": 2}}}, ctx)
    assert seen["fresh"] and seen["n"] == 120 and seen["subset"] is None
    assert seen["training"]["adversarial"] == {"eps": pytest.approx(8 / 255), "step": pytest.approx(2 / 255), "steps": 2}
    assert seen["training"]["batch_size"] == TINY_TRAINING["batch_size"]  # the victim's recipe underneath
    assert result.kept.dtype == bool and result.kept.all() and len(result.kept) == 120
    rows = list(csv.DictReader(open(ctx.workdir / "history-adv-train.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(math.isfinite(float(r["loss"])) for r in rows)
    # resumed, not retrained: a second run finds the finished checkpoint
    again = adv_train.run({"kind": "adv-train", "training": {"epochs": 2, "adversarial": {"steps": 2}}}, ctx)
    for a, b in zip(result.model.state_dict().values(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert np.array_equal(result.kept, again.kept)


def test_the_defense_stage_stores_and_plots_a_splits_scores(tmp_path):
    from poisonflow.defenses import DefenseResult
    from poisonflow.stages.defense import write_sample_scores

    rng = np.random.default_rng(0)
    poisoned = np.zeros(50, bool)
    poisoned[:5] = True
    after = np.where(poisoned, 0.1, 5.0) + rng.random(50)
    result = DefenseResult(model=None, kept=after > 2.0, sample_scores={"before": after / 2, "after": after},
                           thresholds={"after": 2.0})
    write_sample_scores(tmp_path, result, poisoned, "aabl, seed 0")
    stored = np.load(tmp_path / "scores.npz")
    assert sorted(stored.files) == ["after", "before", "kept", "poisoned", "threshold: after"]
    assert float(stored["threshold: after"]) == 2.0
    np.testing.assert_array_equal(stored["after"], after)
    np.testing.assert_array_equal(stored["kept"], ~poisoned)
    np.testing.assert_array_equal(stored["poisoned"], poisoned)
    assert (tmp_path / "scores.png").stat().st_size > 5000 and (tmp_path / "scores.pdf").exists()

