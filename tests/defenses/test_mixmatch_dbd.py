"""MixMatch as a trainer mode (its formulas on hand-made inputs, fixed-length epochs, per-epoch
splits) and DBD end to end on a tiny input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poisonflow import mixmatch, splits, trainer
from poisonflow.defenses import DEFENSES, dbd
from poisonflow.errors import ConfigError
from poisonflow.kinds import defaults_of
from poisonflow.modelio import model_spec, save_model
from poisonflow.models import build_model
import defense_utils
from defense_utils import TINY_TRAINING

torch.set_num_threads(1)


# -- the formulas ------------------------------------------------------------------------------

def test_sharpen_is_the_renormalised_power():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    expected = np.array([0.25, 0.09, 0.04]) / 0.38
    np.testing.assert_allclose(mixmatch.sharpen(p, 0.5).numpy()[0], expected, rtol=1e-6)


def test_losses_are_soft_cross_entropy_and_mean_squared_error():
    logits = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.2, 0.8], [1.0, 0.0]])
    lx, lu = mixmatch.mixmatch_losses(logits, targets, labeled=1)
    np.testing.assert_allclose(lx.numpy(), [np.log(2)], rtol=1e-6)
    p = 1 / (1 + np.exp(-1.0))
    expected = ((p - 0.2) ** 2 + (1 - p - 0.8) ** 2 + 0.25 + 0.25) / 4
    assert float(lu) == pytest.approx(expected, rel=1e-6)


def test_ramp_and_mix_weight():
    assert mixmatch.ramp(10, 15.0, 190) == pytest.approx(15 * 10 / 190)  # DBD's first MixMatch epoch: 0.789
    assert mixmatch.ramp(500, 15.0, 190) == 15.0
    g = torch.Generator().manual_seed(0)
    weights = [mixmatch.mix_weight(g, 0.75) for _ in range(200)]
    assert min(weights) >= 0.5 and max(weights) <= 1.0


def test_unlabeled_batches_come_from_outside_the_split_without_repeats_in_a_pass():
    images = np.zeros((10, 4, 4, 3), dtype=np.uint8)
    mode = mixmatch.MixMatch(images, 2, {}, torch.device("cpu"))
    labeled = np.zeros(10, dtype=bool)
    labeled[:4] = True
    mode.set_labeled(labeled, steps_per_epoch=3)
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([mode.unlabeled_batch(3, g) for _ in range(2)]).tolist()
    assert sorted(drawn) == [4, 5, 6, 7, 8, 9]
    mode.set_labeled(np.ones(10, dtype=bool), 1)
    with pytest.raises(ValueError, match="no unlabeled sample"):
        mode.unlabeled_batch(2, g)


# -- the trainer: fixed-length epochs and per-epoch splits -----------------------------------------

def test_epoch_steps_fix_the_steps_and_resplit_sets_each_epochs_samples():
    images, labels = defense_utils.synthetic_images(20, size=8)
    model = build_model(TINY_TRAINING["model"], 3, 8)
    seen: dict[int, list] = {}
    masks = {0: np.arange(20) < 5, 1: np.arange(20) >= 15}

    def resplit(epoch, net):
        assert not net.training  # split in eval mode
        return masks[epoch]

    training = {**TINY_TRAINING, "epochs": 2, "batch_size": 4, "epoch_steps": 3, "optimizer": {"name": "adam", "lr": 1e-3}}
    trainer.train_model(model, images, labels, training, seed=0, resplit=resplit,
                        on_batch=lambda end: seen.setdefault(end.epoch, []).append(end.index.tolist()))
    assert [len(seen[e]) for e in (0, 1)] == [3, 3]  # 3 steps of 4 = 12 draws from 5 samples
    assert set(sum(seen[0], [])) == set(range(5)) and set(sum(seen[1], [])) == set(range(15, 20))
    first = sum(seen[0], [])
    assert sorted(first[:5]) == list(range(5))  # one whole shuffle before the next begins
    with pytest.raises(ValueError, match="constant schedule"):
        trainer.train_model(model, images, labels, {**training, "schedule": {"name": "cosine"}}, seed=0,
                            resplit=resplit)


def test_a_mixmatch_step_trains_and_is_reproducible():
    images, labels = defense_utils.synthetic_images(24, size=8)
    training = {**TINY_TRAINING, "epochs": 1, "batch_size": 4, "epoch_steps": 3, "optimizer": {"name": "adam", "lr": 1e-3}}
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(TINY_TRAINING["model"], 3, 8)
        mode = mixmatch.MixMatch(images, 3, {}, torch.device("cpu"))

        def split(epoch, net):
            mask = np.arange(24) % 2 == 0
            mode.set_labeled(mask, 3)
            return mask

        result = trainer.train_model(model, images, labels, training, seed=0, objective=mode.objective(), resplit=split)
        results.append(result)
    assert np.isfinite(results[0].history[0]["loss"])
    assert results[0].history[0]["loss"] == results[1].history[0]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(results[0].model.state_dict().values(),
                                                 results[1].model.state_dict().values()))


# -- DBD ---------------------------------------------------------------------------------------

def test_defaults_are_the_official_ones():
    d = defaults_of(dbd.__name__)
    assert d["sce"] == {"alpha": 0.1, "beta": 1.0} and d["epsilon"] == 0.5
    assert d["warmup"]["epochs"] == 10 and d["warmup"]["batch_size"] == 128
    assert d["warmup"]["optimizer"] == {"name": "adam", "lr": 0.002, "weight_decay": 0.0}
    assert d["mixmatch"]["epochs"] == 190 and d["mixmatch"]["epoch_steps"] == 1024 and d["mixmatch"]["batch_size"] == 64
    assert (d["temperature"], d["alpha"], d["lambda_u"], d["rampup"], d["rampup_offset"]) == (0.5, 0.75, 15.0, 190, 10)


def tiny_dbd_context(tmp_path):
    ctx = defense_utils.tiny_context(tmp_path, n=60)
    folder = tmp_path / "features"
    folder.mkdir()
    backbone = build_model(TINY_TRAINING["model"], 3, 8)
    save_model(backbone, folder / "backbone.pt", model_spec(TINY_TRAINING["model"], 3, 8))
    ctx.features_dir = folder
    return ctx, backbone


def test_dbd_starts_from_the_backbone_and_labels_half_the_set(tmp_path):
    ctx, backbone = tiny_dbd_context(tmp_path)
    head_only = dbd.pretrained_backbone(ctx, "dbd")
    body = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(head_only.state_dict()[k], v) for k, v in body.items())
    spec = {"kind": "dbd", "features": "f", "warmup": {"epochs": 1}, "mixmatch": {"epochs": 1, "epoch_steps": 2}}
    result = DEFENSES.get("dbd").run(spec, ctx)
    assert result.kept.sum() == 30 and result.metrics["labeled_share"] == 0.5
    assert not result.model.training


def test_dbd_splits_off_the_samples_whose_labels_disagree_with_a_trained_head(tmp_path):
    """The split itself: a model that fits the true labels ranks flipped labels high."""
    images, labels = defense_utils.synthetic_images(90, size=8)
    torch.manual_seed(0)
    model = trainer.train_model(build_model(TINY_TRAINING["model"], 3, 8), images, labels,
                                {**TINY_TRAINING, "epochs": 10}, seed=0).model
    flipped = labels.copy()
    flipped[:15] = (labels[:15] + 1) % 3
    losses = splits.per_sample_sce(model, images, flipped, 0.1, 1.0, "cpu")
    labeled = splits.lowest_share(losses, 0.5)
    assert labeled.sum() == 45 and not labeled[:15].any()


def test_dbd_refuses_a_backbone_of_another_architecture(tmp_path):
    ctx, _ = tiny_dbd_context(tmp_path)
    other = {"arch": "convnet", "width": 8}
    save_model(build_model(other, 3, 8), ctx.features_dir / "backbone.pt", model_spec(other, 3, 8))
    with pytest.raises(ConfigError, match=r"^dbd\.features: its backbone is not the victim's architecture"):
        dbd.pretrained_backbone(ctx, "dbd")
    ctx.features_dir = None
    with pytest.raises(ConfigError, match=r"^dbd\.features: the defense was given no features folder"):
        dbd.pretrained_backbone(ctx, "dbd")
