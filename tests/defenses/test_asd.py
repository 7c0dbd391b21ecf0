"""ASD: the seed pool from the reserve, the three splits on hand-made losses, the meta model's
trainable tail, and the kind end to end on a tiny input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poisonflow import splits
from poisonflow.defenses import DEFENSES, asd
from poisonflow.errors import ConfigError
from poisonflow.kinds import defaults_of, settings_for
from poisonflow.models import build_model
import defense_utils
from defense_utils import TINY_TRAINING

torch.set_num_threads(1)


def test_defaults_are_the_official_ones():
    d = defaults_of(asd.__name__)
    assert d["seed_per_class"] == 10 and d["split_epochs"] == [60, 90] and d["epsilon"] == 0.5
    assert d["growth"] == {"count": 10, "every": 5}
    assert d["meta"] == {"epochs": 1, "lr": 0.015, "batch_size": 128, "stages": 2}
    assert d["mixmatch"]["epochs"] == 120 and d["mixmatch"]["epoch_steps"] == 1024
    assert d["mixmatch"]["optimizer"] == {"name": "adam", "lr": 0.002, "weight_decay": 0.0}
    assert (d["temperature"], d["alpha"], d["lambda_u"], d["rampup"]) == (0.5, 0.75, 15.0, 120)


def test_stage_one_grows_by_ten_per_class_every_five_epochs():
    growth = {"count": 10, "every": 5}
    assert [asd.stage1_count(e, growth) for e in (0, 4, 5, 9, 10, 59)] == [0, 0, 10, 10, 20, 110]


def test_splits_on_hand_made_losses():
    losses = np.array([0.5, 0.1, 0.9, 0.3, 0.2, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert splits.lowest_per_class(losses, labels, 2).tolist() == [True, True, False, True, True, False]
    assert splits.lowest_per_class(losses, labels, 0).sum() == 0
    assert splits.lowest_share(losses, 0.5).tolist() == [False, True, False, True, True, False]


def test_seed_pool_is_class_balanced_from_the_reserve_and_checked():
    images = np.arange(30)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3).astype(np.uint8)
    labels = np.arange(30) % 3
    x, y = asd.seed_pool(images, labels, 4, 3, seed=0)
    assert np.bincount(y).tolist() == [4, 4, 4] and (labels[x[:, 0, 0, 0]] == y).all()
    with pytest.raises(ConfigError, match=r"^asd\.seed_per_class: the reserve holds 10 samples of class 0"):
        asd.seed_pool(images, labels, 11, 3, seed=0)


def test_meta_model_trains_only_the_last_two_stages_and_the_head(tmp_path):
    ctx = defense_utils.tiny_context(tmp_path, n=48)
    torch.manual_seed(0)
    model = build_model(TINY_TRAINING["model"], 3, 8)
    resolved = settings_for(asd.__name__, {"kind": "asd"})
    virtual = asd.meta_model(model, ctx, resolved, epoch=0)
    tail = {id(p) for p in asd.trainable_tail(virtual, (8, 8), 2)}
    before, after = dict(model.named_parameters()), dict(virtual.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {name for name, p in virtual.named_parameters() if id(p) in tail}
    assert changed == trainable and "fc.weight" in changed
    assert "body.0.weight" not in changed  # the first stage's first conv stays


def test_asd_runs_its_three_stages_on_a_tiny_input(tmp_path, monkeypatch):
    ctx = defense_utils.tiny_context(tmp_path, n=60)
    calls = []
    original = asd.clean_pool

    def spy(epoch, model, ctx_, resolved):
        pool = original(epoch, model, ctx_, resolved)
        calls.append((epoch, int(pool.sum())))
        return pool

    monkeypatch.setattr(asd, "clean_pool", spy)
    spec = {"kind": "asd", "seed_per_class": 2, "split_epochs": [1, 2], "growth": {"count": 3, "every": 1},
            "mixmatch": {"epochs": 3, "epoch_steps": 2}}
    result = DEFENSES.get("asd").run(spec, ctx)
    # epoch 0: stage 1, no sample yet (seeds only); 1: stage 2, half; 2: meta-split, half; then the final split
    assert calls == [(0, 0), (1, 30), (2, 30), (3, 30)]
    assert result.kept.sum() == 30 and len(result.kept) == 60 and not result.model.training
