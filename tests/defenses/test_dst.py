"""D-ST (Chen et al., NeurIPS 2022): the FCT metric, the three-way split, the losses, the run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poisonflow.defenses import DEFENSES, dst
from poisonflow.kinds import defaults_of, settings_for
import defense_utils
from defense_utils import synthetic_images

torch.set_num_threads(1)


TINY_SPEC = {"kind": "d-st", "sd_training": {"epochs": 1}, "sd_finetune": {"epochs": 1},
             "extractor": {"epochs": 1, "batch_size": 16}, "classifier": {"epochs": 1, "batch_size": 16}}


def tiny_context(tmp_path, victim=None, n: int = 60, seed: int = 0):
    return defense_utils.tiny_context(tmp_path, victim, n, seed)


# --- FCT -------------------------------------------------------------------------------------------


def test_fct_is_the_mean_squared_feature_difference_under_the_transformation():
    images, _ = synthetic_images(10, size=6, seed=3)
    weight = torch.randn(6 * 6 * 3, 5, generator=torch.Generator().manual_seed(0))

    def encoder(x):  # a hand-made feature map: a fixed linear projection of the pixels
        return x.flatten(1) @ weight

    def flip(x, fct, generator):
        return x.flip(-1)

    scores = dst.fct_scores(encoder, images, {}, seed=0, batch_size=4, transform=flip)
    x = images.astype(np.float64).transpose(0, 3, 1, 2) / 255
    f1 = x.reshape(10, -1) @ weight.double().numpy()
    f2 = x[..., ::-1].reshape(10, -1) @ weight.double().numpy()
    np.testing.assert_allclose(scores, ((f1 - f2) ** 2).mean(axis=1), rtol=1e-5)


def test_feature_consistency_on_hand_made_features():
    a = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 3.0, 0.0]])
    torch.testing.assert_close(dst.feature_consistency(a, b), torch.tensor([1.0, (4 + 16) / 4]))


def test_rotate_translate_matches_exact_quarter_turns_and_shifts():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    turned = dst.rotate_translate(x, torch.tensor([90.0, 0.0]), torch.zeros(2, 2))
    torch.testing.assert_close(turned[0], torch.rot90(x[0], 1, dims=(1, 2)))  # counter-clockwise
    torch.testing.assert_close(turned[1], x[1])
    moved = dst.rotate_translate(x, torch.zeros(2), torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
    expected = torch.zeros_like(x)
    expected[0, :, :, 2:] = x[0, :, :, :-2]  # two pixels right, zeros enter
    expected[1, :, :-1, :] = x[1, :, 1:, :]  # one pixel up
    torch.testing.assert_close(moved, expected)


def test_fct_transform_is_seeded():
    x = torch.rand(4, 3, 8, 8)
    fct = {"rotation_degrees": 180, "translate": 0.2}
    first = dst.fct_transform(x, fct, torch.Generator().manual_seed(1))
    again = dst.fct_transform(x, fct, torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, x)


# --- the split -------------------------------------------------------------------------------------


def test_split_fractions_are_exact_on_hand_made_scores():
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.arange(200, dtype=np.float64))  # distinct values 0..199
    flags, gamma_c, gamma_p = dst.split_by_fct(scores, 0.2, 0.05)
    # official calculate_gamma.py: γ_c = s[int(0.2·200)] = 40, γ_p = s[200 − int(0.05·200)] = 190
    assert (gamma_c, gamma_p) == (40.0, 190.0)
    assert (flags == dst.CLEAN).sum() == 41  # Δ ≤ γ_c: ⌊α_c·N⌋ + 1
    assert (flags == dst.POISONED).sum() == 10  # Δ ≥ γ_p: ⌊α_p·N⌋
    assert (flags == dst.UNCERTAIN).sum() == 149
    np.testing.assert_array_equal(flags == dst.CLEAN, scores <= 40)
    np.testing.assert_array_equal(flags == dst.POISONED, scores >= 190)


def test_split_without_poison_ratio_marks_nothing_poisoned():
    flags, _, gamma_p = dst.split_by_fct(np.arange(10.0), 0.5, 0.0)
    assert math.isinf(gamma_p) and not (flags == dst.POISONED).any()
    assert (flags == dst.CLEAN).sum() == 6


def test_classifier_weights_give_the_official_mixed_loss_in_expectation():
    flags = np.array([0, 0, 0, 1, 2, 1, 0, 2])
    w = dst.classifier_weights(flags, 0.001)
    trained = (flags == 0) | (flags == 2)
    ce = np.arange(8, dtype=np.float64) + 1
    # over all trained samples, the weighted mean equals mean CE(clean) − 0.001·mean CE(poisoned)
    expected = ce[flags == 0].mean() - 0.001 * ce[flags == 2].mean()
    assert (w * ce)[trained].mean() == pytest.approx(expected)
    assert (w[flags == 1] == 0).all()


# --- losses ----------------------------------------------------------------------------------------


def test_intra_class_loss_matches_the_official_formula():
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 2])
    centres = F.normalize(torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), dim=1)
    sim = centres @ centres.T
    sim.fill_diagonal_(0)
    torch.testing.assert_close(dst.intra_class_loss(features, labels), sim.mean())


def official_consistency_loss(features, labels, flags, temperature, base_temperature):
    """SupConLoss_Consistency (ST/losses.py of the official code), contrast_mode 'all', as written there."""
    batch_size = features.shape[0]
    labels = labels.view(-1, 1)
    mask = torch.eq(labels, labels.T).float()
    nonclean = torch.where(flags != 0)[0]
    mask[nonclean, :] = 0
    mask[nonclean, nonclean] = 1
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    mask = mask.repeat(2, 2)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * 2).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).view(2, batch_size).mean()


def test_consistency_supcon_matches_the_official_loss():
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(8, 5, generator=g), dim=1)
    z2 = F.normalize(torch.randn(8, 5, generator=g), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    flags = torch.tensor([0, 0, 1, 2, 0, 0, 1, 0])
    ours = dst.consistency_supcon(z1, z2, labels, flags == 0, 0.1, 0.07).mean()
    official = official_consistency_loss(torch.stack([z1, z2], 1), labels, flags, 0.1, 0.07)
    torch.testing.assert_close(ours, official)


# --- defaults --------------------------------------------------------------------------------------


def test_defaults_are_the_official_ones():
    d = defaults_of("poisonflow.defenses.dst")
    assert (d["clean_ratio"], d["poison_ratio"]) == (0.2, 0.05)
    assert d["fct"] == {"rotation_degrees": 180, "translate": 0.2}
    assert d["sd_training"]["epochs"] == 2 and d["sd_finetune"]["epochs"] == 10
    for stage in ("sd_training", "sd_finetune"):
        assert d[stage]["batch_size"] == 128 and d[stage]["augment"] == []
        assert d[stage]["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                                         "nesterov": False}
    assert d["extractor"]["epochs"] == 200 and d["extractor"]["batch_size"] == 512
    assert d["extractor"]["optimizer"] == {"name": "sgd", "lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4,
                                          "nesterov": False}
    assert d["extractor"]["schedule"] == {"name": "cosine"}
    assert (d["temperature"], d["base_temperature"], d["projection_dim"]) == (0.1, 0.07, 128)
    assert d["views"] == {"crop_scale": [0.2, 1.0], "crop_ratio": [0.75, 4 / 3], "flip_prob": 0.5,
                          "jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.2}
    assert d["classifier"]["epochs"] == 10 and d["classifier"]["batch_size"] == 512
    assert d["classifier"]["optimizer"] == {"name": "sgd", "lr": 5.0, "momentum": 0.9, "weight_decay": 0.0,
                                           "nesterov": False}
    assert d["classifier"]["schedule"] == {"name": "multistep", "milestones": [60, 75, 90], "gamma": 0.2}
    assert d["unlearning_weight"] == 0.001


# --- the run ---------------------------------------------------------------------------------------


def test_d_st_runs_end_to_end_and_is_deterministic(tmp_path):
    assert DEFENSES.get("d-st") is dst
    first = dst.run(TINY_SPEC, tiny_context(tmp_path / "a"))
    again = dst.run(TINY_SPEC, tiny_context(tmp_path / "b"))
    n = 60
    assert first.kept.dtype == bool and first.kept.shape == (n,)
    # clean: ⌊0.2·60⌋ + 1 = 13 (ties aside), poisoned ⌊0.05·60⌋ = 3
    assert first.metrics["clean"] == first.kept.sum() >= 13
    assert first.metrics["clean"] + first.metrics["uncertain"] + first.metrics["poisoned"] == n
    np.testing.assert_array_equal(first.kept, again.kept)
    scores = first.sample_scores["FCT, clean cut γ_c"]
    assert scores.shape == (n,) and np.isfinite(scores).all()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        logits, repeat = first.model.eval()(x), again.model.eval()(x)
    assert logits.shape == (4, 3)
    torch.testing.assert_close(logits, repeat)
    assert all(p.requires_grad for p in first.model.parameters())


def test_classifier_stage_trains_only_the_last_layer(tmp_path):
    ctx = tiny_context(tmp_path)
    resolved = settings_for("poisonflow.defenses.dst", TINY_SPEC)
    backbone = ctx.build_model()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    flags = np.array([0, 1, 2] * 20)
    model = dst.train_classifier(backbone, ctx, flags, resolved)
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("fc."):
            assert not torch.equal(value, after[key]), key
        else:
            torch.testing.assert_close(value, after[key], msg=key)  # frozen, BatchNorm statistics included


def test_rotate_translate_equals_torchvision_nearest_rotation_and_translation():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for angle in (90.0, 30.0, -135.0):
        expected = TF.rotate(x, angle, interpolation=TF.InterpolationMode.NEAREST)
        torch.testing.assert_close(dst.rotate_translate(x, torch.tensor([angle]), torch.zeros(1, 2)), expected)
    expected = TF.affine(x, angle=0.0, translate=[2, -1], scale=1.0, shear=[0.0, 0.0])
    torch.testing.assert_close(dst.rotate_translate(x, torch.zeros(1), torch.tensor([[2.0, -1.0]])), expected)
