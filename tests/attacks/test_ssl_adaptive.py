"""GSSD's adaptive attack: the distance it minimises, τ kept in [0, 1], an encoder that stays
frozen, a pattern that moves the triggered embeddings toward the target's, and the blend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poisonflow import kinds
from poisonflow.attacks import PoisonContext, ssl_adaptive
from poisonflow.errors import ConfigError
from poisonflow.models import build_model
from poisonflow.stages.trigger import TriggerContext
import defense_utils

torch.set_num_threads(1)


def test_distances_on_hand_made_embeddings():
    z = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    centre = torch.tensor([0.0, 1.0])
    np.testing.assert_allclose(ssl_adaptive.DISTANCES["l2"](z, centre).numpy(), [np.sqrt(18), 1.0], rtol=1e-6)
    np.testing.assert_allclose(ssl_adaptive.DISTANCES["cosine"](z, centre).numpy(), [1 - 0.8, 0.0], atol=1e-6)


def test_trigger_model_keeps_its_encoder_frozen_in_eval_mode_and_projects():
    encoder = build_model({"arch": "convnet", "width": 4}, 3, 8)
    model = ssl_adaptive.TriggerModel(encoder, torch.full((3, 8, 8), 0.5), blend=0.2).train()
    assert model.training and not model.encoder.training
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["pattern"]
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model.triggered(x), 0.8 * x + 0.2 * 0.5)
    with torch.no_grad():
        model.pattern.add_(2.0)
    model.project()
    assert float(model.pattern.detach().max()) == 1.0


def tiny_generator(tmp_path, **overrides):
    images, labels = defense_utils.synthetic_images(60, classes=3, size=8)
    spec = kinds.generator_settings("ssl-adaptive", {
        "kind": "ssl-adaptive", "target": 1, "epochs": 8, "batch_size": 6, "rate": 0.1,
        "simclr": {"epochs": 2, "batch_size": 20, "model": {"arch": "convnet", "width": 4}}, **overrides})
    context = TriggerContext(images, labels, ["a", "b", "c"], None, "cpu", 0, tmp_path, "generators.adaptive")
    return ssl_adaptive.train_generator(spec, context), spec


def test_pattern_pulls_the_triggered_embeddings_toward_the_target_mean(tmp_path):
    generator, _ = tiny_generator(tmp_path)
    pattern = generator["pattern"]
    assert pattern.shape == (3, 8, 8) and float(pattern.min()) >= 0 and float(pattern.max()) <= 1
    assert float(generator["distance_last"]) < 0.9 * float(generator["distance_first"])
    assert int(generator["target"]) == 1 and float(generator["blend"]) == pytest.approx(0.2)


def test_d_p_is_the_rate_of_the_set_from_the_other_classes():
    labels = np.arange(100) % 4
    subset = ssl_adaptive.poisoned_subset(labels, 2, 0.1, seed=0)
    assert len(subset) == 10 and (labels[subset] != 2).all()


def test_attack_blends_the_pattern_at_weight_b_and_checks_the_target(tmp_path):
    generator = {"pattern": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)),
                 "blend": torch.tensor(0.2), "target": torch.tensor(1)}
    context = PoisonContext(None, None, ["a", "b", "c"], generator=generator)
    trigger = ssl_adaptive.build({"kind": "ssl-adaptive", "generator": "g", "target": 1}, 8, 0, context)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(trigger.apply(x), (0.8 * x + 0.2 * generator["pattern"]).clamp(0, 1))
    with pytest.raises(ConfigError, match=r"^target: 2, but the generator pulled the pattern to class 1"):
        ssl_adaptive.build({"kind": "ssl-adaptive", "generator": "g", "target": 2}, 8, 0, context)
