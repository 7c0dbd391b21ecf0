"""NAD, ShrinkPad, Auto-Encoder pre-processing, STRIP and SentiNet (the hard-sample paper's defenses)."""

from __future__ import annotations

import copy
import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from poisonflow.kinds import defaults_of, settings_for
from poisonflow import config
from poisonflow.defenses import DEFENSES, DefenseContext, merge
from poisonflow.defenses import autoencoder, nad, sentinet, shrinkpad, strip
from poisonflow.defenses.preprocessing import Preprocessed
from poisonflow.defenses.screening import background_indices, fitted_threshold
from poisonflow.errors import ConfigError
from poisonflow.models import Classifier, build_model
from poisonflow.trainer import images_to_tensor, to_float, train_model
from workflow_utils import snakemake, write_config
import defense_utils

torch.set_num_threads(1)

TINY_TRAINING = {**defense_utils.TINY_TRAINING, "epochs": 2}
PALETTE = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])


def colour_images(n: int, size: int = 8, noise: float = 30.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c = a dominant colour channel c plus Gaussian noise (3 classes)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = PALETTE[labels][:, None, None, :] + rng.normal(0, noise, (n, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def with_trigger(images: np.ndarray) -> np.ndarray:
    """A 3×3 white patch in the bottom-right corner."""
    out = images.copy()
    out[:, -3:, -3:, :] = 255
    return out


def tiny_context(tmp_path, victim=None, n: int = 120, size: int = 8, screen=None) -> DefenseContext:
    images, labels = colour_images(n, size, seed=0)
    clean_images, clean_labels = colour_images(n, size, seed=1)
    model_spec = TINY_TRAINING["model"]
    return DefenseContext(
        train_images=images, train_labels=labels, reserve_images=clean_images, reserve_labels=clean_labels,
        training=TINY_TRAINING, build_model=lambda: build_model(model_spec, num_classes=3, image_size=size),
        victim=victim, seed=0, device=torch.device("cpu"), workdir=tmp_path / "work", num_classes=3,
        screen_images=screen)


def trained_victim(ctx: DefenseContext) -> nn.Module:
    model = build_model(TINY_TRAINING["model"], num_classes=3, image_size=ctx.train_images.shape[1], seed=0)
    return train_model(model, ctx.train_images, ctx.train_labels, TINY_TRAINING, seed=0).model


def floats(images: np.ndarray) -> torch.Tensor:
    return to_float(images_to_tensor(images))


# --- a hand-built backdoored victim: a bright patch anywhere means class 0 --------------------------


class BrightPatchBody(nn.Module):
    """Feature map = the image's three channels and a patch detector that is 1 where all three
    channels exceed 0.45 (0 below 0.4). Clean colour images never light it (their two weak channels
    sit near 0.16); a white patch does, even half-blended with another image (0.5 + 0.5·0.16)."""

    def forward(self, x):
        detector = ((x.min(dim=1, keepdim=True).values - 0.4) * 20.0).clamp(0.0, 1.0)
        return torch.cat([x, detector], dim=1)


def bright_patch_victim() -> Classifier:
    """Logit c = 20·(mean of channel c), plus 1000·(mean of the detector) for class 0."""
    model = Classifier(BrightPatchBody(), channels=4, num_classes=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        for c in range(3):
            model.fc.weight[c, c] = 20.0
        model.fc.weight[0, 3] = 1000.0
    return model.eval()


def screening_inputs(size: int = 16, count: int = 60, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Clean colour images and triggered images of classes 1 and 2, shuffled; and which are triggered."""
    clean, _ = colour_images(count, size, noise=15.0, seed=seed)
    others, labels = colour_images(count, size, noise=15.0, seed=seed + 1)
    triggered = with_trigger(others[labels != 0])
    images = np.concatenate([clean, triggered])
    truth = np.concatenate([np.zeros(len(clean), bool), np.ones(len(triggered), bool)])
    order = np.random.default_rng(seed).permutation(len(truth))
    return images[order], truth[order]


def detector_context(tmp_path, screen: np.ndarray) -> DefenseContext:
    clean_images, clean_labels = colour_images(90, 16, noise=15.0, seed=11)
    return DefenseContext(
        train_images=clean_images, train_labels=clean_labels, reserve_images=clean_images, reserve_labels=clean_labels,
        training=TINY_TRAINING, build_model=bright_patch_victim, victim=bright_patch_victim(), seed=0,
        device=torch.device("cpu"), workdir=tmp_path / "work", num_classes=3, screen_images=screen)


def test_bright_patch_victim_behaves_as_designed():
    model = bright_patch_victim()
    clean, labels = colour_images(30, 16, noise=15.0, seed=0)
    with torch.no_grad():
        assert torch.equal(model(floats(clean)).argmax(1), torch.as_tensor(labels))
        assert (model(floats(with_trigger(clean))).argmax(1) == 0).all()
        blended = 0.5 * floats(with_trigger(clean)) + 0.5 * floats(clean[::-1].copy())
        assert (model(blended).argmax(1) == 0).all()
        assert model.feature_map(floats(clean))[:, 3].max() == 0


# --- NAD ------------------------------------------------------------------------------------------


def reference_attention(a: np.ndarray, power: float = 2.0) -> np.ndarray:
    attention = (np.abs(a) ** power).mean(axis=1).reshape(len(a), -1)
    return attention / (np.linalg.norm(attention, axis=1, keepdims=True) + 1e-6)


def test_attention_loss_on_hand_made_maps():
    student = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    teacher = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    student[0, :, 0, 0] = 1.0  # all attention on the top-left position: mean_c |a|² = 1
    teacher[0, 0, 1, 1] = -math.sqrt(2)  # all on the bottom-right: (2 + 0)/2 = 1 (|a| counts, not the sign)
    # both maps are one-hot vectors of norm 1, divided by (1 + 1e-6); their difference is (1, 0, 0, −1)/(1 + 1e-6)
    scale = 1.0 / (1.0 + 1e-6)
    np.testing.assert_allclose(nad.attention_map(student).numpy(), [[scale, 0, 0, 0]], rtol=1e-6)
    assert nad.attention_loss(student, teacher, distance="mse").item() == pytest.approx(2 * scale**2 / 4, rel=1e-6)
    assert nad.attention_loss(student, teacher, distance="l2").item() == pytest.approx(math.sqrt(2) * scale, rel=1e-6)
    assert nad.attention_loss(student, student).item() == 0.0


def test_attention_loss_equals_a_numpy_computation():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(3, 4, 3, 2)), rng.normal(size=(3, 4, 3, 2))
    qs, qt = reference_attention(student), reference_attention(teacher)
    s, t = torch.tensor(student), torch.tensor(teacher)
    assert nad.attention_loss(s, t, 2.0, "mse").item() == pytest.approx(((qs - qt) ** 2).mean(), rel=1e-9)
    assert nad.attention_loss(s, t, 2.0, "l2").item() == pytest.approx(
        np.linalg.norm(qs - qt, axis=1).mean(), rel=1e-9)
    q3 = reference_attention(student, power=3.0)
    np.testing.assert_allclose(nad.attention_map(s, 3.0).numpy(), q3, rtol=1e-9)


@pytest.mark.parametrize("arch, ends", [
    ("convnet", [5, 12, 19]),  # the ReLU before each max-pool, and the last ReLU
    ("resnet18", [4, 6, 8, 10]),  # 3 stem modules, then the last block of each of 4 groups of 2
    ("resnet34", [5, 9, 15, 18]),  # groups of 3, 4, 6, 3 blocks
])
def test_stage_ends_are_the_last_module_at_each_resolution(arch, ends):
    model = build_model({"arch": arch, "width": 4}, num_classes=3, image_size=16)
    assert nad.stage_ends(model.body, (16, 16)) == ends
    modules = nad.distilled_modules(model, (16, 16), stages=3)
    assert modules == [model.body[i] for i in ends[-3:]]
    # the distilled outputs have three different sizes, the deepest being the last feature map
    with nad.captured_outputs(modules) as outputs, torch.no_grad():
        model.eval()(torch.zeros(2, 3, 16, 16))
    sizes = [tuple(o.shape[-2:]) for o in outputs]
    assert len(set(sizes)) == 3 and sizes[-1] == tuple(model.feature_map(torch.zeros(1, 3, 16, 16)).shape[-2:])


NAD_SPEC = {"kind": "nad", "clean_fraction": 1.0, "teacher": {"epochs": 1}, "student": {"epochs": 1}}


def test_nad_distils_a_copy_and_leaves_the_victim_untouched(tmp_path):
    ctx = tiny_context(tmp_path)
    ctx.victim = trained_victim(ctx)
    victim_state = copy.deepcopy(ctx.victim.state_dict())

    result = DEFENSES.get("nad").run(NAD_SPEC, ctx)

    assert result.model is not ctx.victim and result.kept is None and result.input_scores is None
    assert result.metrics == {"clean_samples": 120, "distilled_stages": 3}
    assert not torch.equal(result.model.body[0].weight, victim_state["body.0.weight"])
    for name, tensor in ctx.victim.state_dict().items():
        assert torch.equal(tensor, victim_state[name]), name
    assert (ctx.workdir / "teacher.pt").exists() and (ctx.workdir / "student.pt").exists()
    # the attention term matters: with β = 0 the same run gives another student
    plain = nad.run({**NAD_SPEC, "beta": 0.0}, tiny_context(tmp_path / "beta0", victim=ctx.victim))
    assert not torch.equal(plain.model.body[0].weight, result.model.body[0].weight)
    # a rerun resumes from both checkpoints and returns the same student
    again = nad.run(NAD_SPEC, ctx)
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


def test_nad_attention_term_pulls_the_student_towards_the_teacher(tmp_path):
    ctx = tiny_context(tmp_path)
    ctx.victim = trained_victim(ctx)
    images, labels = ctx.reserve_images, ctx.reserve_labels
    # a teacher trained independently, so that its attention differs clearly from the victim's
    teacher = train_model(build_model(TINY_TRAINING["model"], 3, 8, seed=5), images, labels, TINY_TRAINING,
                          seed=5).model
    resolved = settings_for(nad.__name__, {**NAD_SPEC, "student": {"epochs": 3}})

    def at_gap(model):
        x = floats(images)
        with torch.no_grad(), nad.captured_outputs(nad.distilled_modules(model, (8, 8), 3)) as s, \
                nad.captured_outputs(nad.distilled_modules(teacher, (8, 8), 3)) as t:
            model.eval()(x)
            teacher.eval()(x)
        return sum(nad.attention_loss(a, b).item() for a, b in zip(s, t))

    def student(beta):
        return nad.distill(copy.deepcopy(ctx.victim), teacher, images, labels,
                           merge(ctx.training, resolved["student"]), {**resolved, "beta": beta}, seed=0)

    # the same training with the attention term ends much closer to the teacher's attention
    assert at_gap(student(50.0)) < 0.5 * at_gap(student(0.0))


def test_nad_rejects_bad_keys():
    with pytest.raises(ConfigError, match="nad.at_distance"):
        settings_for(nad.__name__, {"at_distance": "cosine"})
    with pytest.raises(ConfigError, match="nad.stages"):
        settings_for(nad.__name__, {"stages": 0})
    with pytest.raises(ConfigError, match="nad.betas"):
        settings_for(nad.__name__, {"betas": [1]})


# --- ShrinkPad ------------------------------------------------------------------------------------


def test_shrink_pad_places_the_shrunk_image_at_its_offset():
    # an 8×8 image whose pixel (r, c) is r·8 + c (scaled); shrinking by 4 halves it, and bilinear
    # interpolation at scale 2 (half-pixel centres) averages each 2×2 block
    image = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).repeat(1, 3, 1, 1) / 64
    out = shrinkpad.shrink_pad(image, 4, top=torch.tensor([1]), left=torch.tensor([3]))
    blocks = image[0, 0].view(4, 2, 4, 2).mean(dim=(1, 3))  # (r//2, c//2) → mean of its block
    assert out.shape == image.shape
    for channel in range(3):
        torch.testing.assert_close(out[0, channel, 1:5, 3:7], blocks)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[1:5, 3:7] = False
    assert torch.count_nonzero(out[0][:, outside]) == 0
    assert blocks[0, 0].item() == pytest.approx((0 + 1 + 8 + 9) / 4 / 64)


def test_shrinkpad_offsets_are_per_image_seeded_and_cover_every_shift():
    ones = torch.ones(300, 3, 6, 6)

    def offsets(module):
        out = module(ones)
        rows = out[:, 0].sum(dim=2).gt(0).float().argmax(dim=1)  # first non-zero row
        cols = out[:, 0].sum(dim=1).gt(0).float().argmax(dim=1)
        assert torch.equal(out[:, 0].sum(dim=(1, 2)), torch.full((300,), 16.0))  # a 4×4 block of ones
        return rows, cols

    rows, cols = offsets(shrinkpad.ShrinkPad(2, seed=0))
    assert set(zip(rows.tolist(), cols.tolist())) == {(r, c) for r in range(3) for c in range(3)}
    again = offsets(shrinkpad.ShrinkPad(2, seed=0))
    assert torch.equal(rows, again[0]) and torch.equal(cols, again[1])
    other = offsets(shrinkpad.ShrinkPad(2, seed=1))
    assert not torch.equal(rows, other[0])


def test_shrinkpad_wraps_the_victim(tmp_path):
    ctx = tiny_context(tmp_path, victim=build_model(TINY_TRAINING["model"], 3, 8, seed=0).eval())
    result = DEFENSES.get("shrinkpad").run({"kind": "shrinkpad", "size": 2}, ctx)
    assert isinstance(result.model, Preprocessed) and result.model.classifier is ctx.victim
    assert result.input_scores is None and result.kept is None and result.metrics == {"shrink_pixels": 2}
    x = floats(ctx.reserve_images[:5])
    generator = torch.Generator().manual_seed(0)  # the offsets the defended model will draw
    top, left = torch.randint(0, 3, (5,), generator=generator), torch.randint(0, 3, (5,), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), ctx.victim(shrinkpad.shrink_pad(x, 2, top, left)))
    with pytest.raises(ConfigError, match="shrinkpad.size"):
        shrinkpad.run({"size": 8}, ctx)


# --- Auto-Encoder pre-processing --------------------------------------------------------------------


class ConstantHalf(nn.Module):
    def forward(self, x):
        return torch.full_like(x, 0.5)


def test_reconstruction_error_is_mean_binary_cross_entropy():
    images, _ = colour_images(10, 4)
    # a constant 0.5 reconstruction costs ln 2 per value, whatever the image
    assert autoencoder.reconstruction_error(ConstantHalf(), images) == pytest.approx(math.log(2), rel=1e-6)


def test_autoencoder_shapes_and_depth_check():
    model = autoencoder.build_autoencoder(width=4, depth=2, image_shape=(8, 8), seed=0)
    out = model(torch.rand(2, 3, 8, 8))
    assert out.shape == (2, 3, 8, 8) and 0 <= out.min() and out.max() <= 1
    assert model.encoder(torch.rand(1, 3, 8, 8)).shape == (1, 8, 2, 2)  # widths 4, 8; side 8 → 4 → 2
    with pytest.raises(ConfigError, match="autoencoder.depth"):
        autoencoder.build_autoencoder(width=4, depth=2, image_shape=(6, 6), seed=0)


def test_autoencoder_reconstruction_error_decreases_with_training(tmp_path):
    images, _ = colour_images(96, 8)
    model = autoencoder.build_autoencoder(width=8, depth=2, image_shape=(8, 8), seed=0)
    before = autoencoder.reconstruction_error(model, images)
    settings = merge(defaults_of(autoencoder.__name__), {"epochs": 6, "batch_size": 16, "lr": 0.01})
    losses = autoencoder.train_autoencoder(model, images, settings, seed=0, checkpoint=tmp_path / "ae.pt")
    after = autoencoder.reconstruction_error(model, images)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert after < 0.8 * before
    # the checkpoint holds the finished run: a rerun trains nothing and returns the same losses
    again = autoencoder.build_autoencoder(width=8, depth=2, image_shape=(8, 8), seed=0)
    assert autoencoder.train_autoencoder(again, images, settings, seed=0, checkpoint=tmp_path / "ae.pt") == losses
    assert autoencoder.reconstruction_error(again, images) == pytest.approx(after)


def test_autoencoder_defense_puts_the_trained_autoencoder_before_the_victim(tmp_path):
    ctx = tiny_context(tmp_path, victim=build_model(TINY_TRAINING["model"], 3, 8, seed=0).eval())
    spec = {"kind": "autoencoder", "epochs": 2, "width": 4, "depth": 2, "clean_fraction": 0.5}
    result = DEFENSES.get("autoencoder").run(spec, ctx)
    assert isinstance(result.model, Preprocessed) and result.model.classifier is ctx.victim
    assert result.input_scores is None and result.metrics["clean_samples"] == 60
    assert result.metrics["reconstruction_bce"] < result.metrics["first_epoch_bce"]
    x = floats(ctx.reserve_images[:4])
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), ctx.victim(result.model.preprocess(x)))
        assert not torch.allclose(result.model.preprocess(x), x)
    assert (ctx.workdir / "autoencoder.pt").exists()


# --- shared screening steps -------------------------------------------------------------------------


def test_background_draws_never_pick_the_input_itself():
    rng = np.random.default_rng(0)
    draws = background_indices(5, 400, np.arange(5), rng, 5)
    assert draws.shape == (5, 400) and draws.min() >= 0 and draws.max() <= 4
    for i in range(5):
        assert i not in draws[i] and set(draws[i]) == set(range(5)) - {i}
    free = background_indices(5, 50, None, rng, 3)
    assert free.shape == (3, 50) and set(free.ravel()) == set(range(5))


def test_fitted_thresholds_on_hand_made_values():
    values = np.array([0.0, 2.0])  # mean 1, std 1
    assert fitted_threshold(values, 0.5, "normal") == pytest.approx(1.0)
    assert fitted_threshold(values, NormalDist().cdf(-1.0), "normal") == pytest.approx(0.0, abs=1e-9)
    assert fitted_threshold(np.arange(11.0), 0.1, "quantile") == pytest.approx(1.0)


# --- STRIP ----------------------------------------------------------------------------------------


def test_entropy_and_superimposition_on_hand_made_values():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(strip.entropy_bits(p), torch.tensor([1.0, 0.0, 2.0]))
    x = torch.full((1, 3, 2, 2), 0.8)
    backgrounds = torch.stack([torch.full((3, 2, 2), 0.2), torch.full((3, 2, 2), 1.0)]).unsqueeze(0)
    blended = strip.superimpose(x, backgrounds, 0.5, 0.5)
    assert blended.shape == (1, 2, 3, 2, 2)
    torch.testing.assert_close(blended[0, :, 0, 0, 0], torch.tensor([0.5, 0.9]))
    torch.testing.assert_close(strip.superimpose(x, backgrounds, 1.0, 1.0)[0, :, 0, 0, 0], torch.tensor([1.0, 1.0]))


def test_strip_entropy_of_a_confident_model_is_zero():
    images, _ = colour_images(6, 16, noise=15.0)
    triggered = with_trigger(images[1:3])
    backgrounds = np.zeros((2, 4), dtype=np.int64) + np.arange(4)
    entropy = strip.strip_entropy(bright_patch_victim(), triggered, images, backgrounds, 0.5, 0.5)
    np.testing.assert_allclose(entropy, 0.0, atol=1e-6)


STRIP_SPEC = {"kind": "strip", "n": 16, "clean_fraction": 1.0}


def test_strip_separates_triggered_inputs_on_a_hand_built_victim(tmp_path):
    screen, truth = screening_inputs()
    ctx = detector_context(tmp_path, screen)
    result = DEFENSES.get("strip").run(STRIP_SPEC, ctx)

    assert result.model is ctx.victim and result.kept is None
    assert result.input_scores.shape == truth.shape and result.input_flags.dtype == bool
    entropy = -result.input_scores
    assert entropy[truth].max() < 1e-3 < entropy[~truth].mean()
    assert roc_auc_score(truth, result.input_scores) > 0.99
    assert result.input_flags[truth].all() and result.input_flags[~truth].mean() <= 0.1
    np.testing.assert_array_equal(result.input_flags, entropy < result.metrics["threshold"])
    assert result.metrics["clean_samples"] == 90


def test_strip_returns_the_victim_and_fits_its_threshold_on_clean_data_only(tmp_path):
    screen, truth = screening_inputs()
    ctx = detector_context(tmp_path, screen)
    mixed = strip.run(STRIP_SPEC, ctx)
    assert mixed.model is ctx.victim
    only_triggered = strip.run(STRIP_SPEC, detector_context(tmp_path, screen[truth]))
    assert only_triggered.metrics["threshold"] == mixed.metrics["threshold"]
    # the threshold is the 1% quantile of the clean split's own entropies (empirical, or of a fitted normal)
    pool = ctx.reserve_images
    rng = np.random.default_rng([0, 5])
    own = background_indices(len(pool), 16, np.arange(len(pool)), rng, len(pool))
    clean_entropy = strip.strip_entropy(ctx.victim, pool, pool, own, 0.5, 0.5)
    assert mixed.metrics["threshold"] == pytest.approx(np.quantile(clean_entropy, 0.01))
    normal = strip.run({**STRIP_SPEC, "threshold_fit": "normal"}, ctx)
    expected = NormalDist(clean_entropy.mean(), clean_entropy.std()).inv_cdf(0.01)
    assert normal.metrics["threshold"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="screen"):
        strip.run(STRIP_SPEC, detector_context(tmp_path, None))


# --- SentiNet -------------------------------------------------------------------------------------


def test_grad_cam_of_a_pooled_linear_head_is_the_weighted_feature_map():
    model = bright_patch_victim()
    images, _ = colour_images(3, 16, noise=15.0)
    x = floats(with_trigger(images))
    heat = sentinet.grad_cam(model, x, torch.tensor([0, 1, 2]))
    # logit y = Σ_c W[y, c]·mean(A_c): the gradient is W[y, c]/(H·W) at every position
    feature_map = model.feature_map(x).detach()
    weights = model.fc.weight.detach() / 256
    for i, y in enumerate([0, 1, 2]):
        expected = torch.relu((weights[y].view(4, 1, 1) * feature_map[i]).sum(0))
        torch.testing.assert_close(heat[i], expected)
    # for the target class, the trigger is the most salient region
    mask = sentinet.salient_masks(heat[:1], 9 / 256)
    assert mask[0, -3:, -3:].all() and int(mask.sum()) == 9


def test_salient_masks_and_paste_on_hand_made_values():
    heat = torch.tensor([[[0.0, 3.0], [2.0, 1.0]]])
    mask = sentinet.salient_masks(heat, 0.5)
    assert mask.tolist() == [[[False, True], [True, False]]]
    tie = sentinet.salient_masks(torch.zeros(1, 2, 2), 0.25)  # ties: the first position
    assert tie.tolist() == [[[True, False], [False, False]]]
    source = torch.full((1, 1, 1, 2, 2), 9.0)
    targets = torch.zeros(1, 3, 1, 2, 2)
    pasted = sentinet.paste(source, mask, targets)
    assert pasted.shape == (1, 3, 1, 2, 2) and pasted[0, :, 0].tolist() == [[[0.0, 9.0], [9.0, 0.0]]] * 3


def test_boundary_is_fitted_through_the_upper_envelope():
    confidence = np.array([0.10, 0.11, 0.12, 0.50, 0.51, 0.90, 0.91, 0.92])
    fooled = np.array([0.10, 0.30, 0.20, 0.00, 0.40, 0.60, 0.10, 0.20])
    x, y = sentinet.envelope_points(confidence, fooled, bin_width=0.25, per_bin=1)
    np.testing.assert_allclose(x, [0.11, 0.51, 0.90])
    np.testing.assert_allclose(y, [0.30, 0.40, 0.60])
    boundary = sentinet.fit_boundary(confidence, fooled, 0.25, 1, degree=2)
    np.testing.assert_allclose(boundary(x), y, atol=1e-9)  # three points: the parabola passes through them
    assert boundary(np.array([2.0]))[0] == pytest.approx(boundary(np.array([0.90]))[0])  # clipped to the range
    flat = sentinet.fit_boundary(np.array([0.5, 0.5]), np.array([0.2, 0.4]), 0.1, 2, degree=2)
    np.testing.assert_allclose(flat(np.array([0.0, 0.5, 1.0])), 0.3)  # one distinct confidence: a constant


SENTINET_SPEC = {"kind": "sentinet", "n": 16, "clean_fraction": 1.0}


def test_sentinet_separates_triggered_inputs_on_a_hand_built_victim(tmp_path):
    screen, truth = screening_inputs()
    ctx = detector_context(tmp_path, screen)
    result = DEFENSES.get("sentinet").run(SENTINET_SPEC, ctx)

    assert result.model is ctx.victim and result.kept is None
    assert result.input_scores.shape == truth.shape and result.input_flags.dtype == bool
    assert roc_auc_score(truth, result.input_scores) > 0.99
    assert result.input_flags[truth].all() and result.input_flags[~truth].mean() <= 0.1
    np.testing.assert_array_equal(result.input_flags, result.input_scores > result.metrics["threshold"])
    # triggered inputs hijack every pasted image; clean ones mostly only images of their own class
    assert result.metrics["clean_fooled"] < 0.6
    only_triggered = sentinet.run(SENTINET_SPEC, detector_context(tmp_path, screen[truth]))
    assert only_triggered.metrics["threshold"] == result.metrics["threshold"]


def test_sentinet_points_of_triggered_inputs_are_fully_fooled():
    images, labels = colour_images(9, 16, noise=15.0, seed=2)
    triggered = with_trigger(images[labels != 0])
    pool, _ = colour_images(12, 16, noise=15.0, seed=4)
    targets = np.tile(np.arange(12), (len(triggered), 1))
    points = sentinet.sentinet_points(bright_patch_victim(), triggered, pool, targets, 13 / 256,
                                      torch.Generator().manual_seed(0))
    assert (points.predicted == 0).all()
    np.testing.assert_allclose(points.fooled, 1.0)
    assert ((points.inert_confidence > 1 / 3) & (points.inert_confidence <= 1)).all()


# --- config ---------------------------------------------------------------------------------------

MODULES = {"nad": nad, "shrinkpad": shrinkpad, "autoencoder": autoencoder, "strip": strip, "sentinet": sentinet}


def load_config(defenses: dict):
    raw = {
        "datasets": {"digits": {"source": "digits"}},
        "models": {"m": {"arch": "convnet", "width": 4}},
        "trainings": {"t": {"model": "m"}},
        "attacks": {"a": {"kind": "badnets"}},
        "defenses": defenses,
        "experiments": [{"dataset": ["digits"], "attack": ["a"], "training": ["t"], "defense": list(defenses),
                         "seed": [0]}],
    }
    return config.load(raw)


def test_config_entries_resolve_to_the_fragment_defaults():
    cfg = load_config({kind: {"kind": kind} for kind in MODULES})
    for kind, module in MODULES.items():
        assert cfg.defense(kind) == defaults_of(module.__name__), kind
        assert settings_for(module.__name__, cfg.defense(kind)) == defaults_of(module.__name__)


@pytest.mark.parametrize("kind, change, message", [
    ("strip", {"frr": 1.0}, r"defenses\.x\.frr"),
    ("sentinet", {"mask_fraction": 0}, r"defenses\.x\.mask_fraction"),
    ("nad", {"student": {"adversarial": None}}, r"defenses\.x\.student"),
    ("autoencoder", {"widht": 4}, r"defenses\.x"),
])
def test_schema_rejects_bad_values_naming_the_key(kind, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"x": {"kind": kind, **change}})


# --- the real defense stage -------------------------------------------------------------------------


def test_defense_stage_scores_the_detectors_and_runs_every_kind(tmp_path):
    """STRIP and SentiNet through Snakemake; the three repairing kinds through the same stage command
    in this process (a Snakemake job each would spend most of its time importing torch)."""
    from poisonflow.cli import main

    workflow = {
        "evaluation": {"pgd": None},
        "datasets": {"digits": {"source": "digits", "image_size": 16}},
        "models": {"tiny": {"arch": "convnet", "width": 4}},
        "trainings": {"fast": {"model": "tiny", "epochs": 4, "batch_size": 64, "augment": [],
                               "optimizer": {"name": "sgd", "lr": 0.05}}},
        "attacks": {"badnets": {"kind": "badnets", "target": 0, "rate": 0.1}},
        "defenses": {
            "strip": {"kind": "strip", "n": 8},
            "sentinet": {"kind": "sentinet", "n": 8},
            "shrinkpad": {"kind": "shrinkpad", "size": 2},
            "ae": {"kind": "autoencoder", "epochs": 1, "width": 4, "depth": 2, "clean_fraction": 0.2},
            "nad": {"kind": "nad", "teacher": {"epochs": 1}, "student": {"epochs": 1}},
        },
        "experiments": [{"dataset": ["digits"], "attack": ["badnets"], "training": ["fast"],
                         "defense": ["strip", "sentinet"], "seed": [0]}],
        "workflow": {"group_small_jobs": True},  # jobs in the warm process: no torch import each
    }
    write_config(tmp_path, workflow)
    results = tmp_path / "results"
    root = results / "defenses/digits/badnets/fast/seed0"
    targets = [f"results/defenses/digits/badnets/fast/seed0/{name}/metrics.json" for name in ("strip", "sentinet")]
    snakemake(tmp_path, *targets)  # the two defense jobs and what they need, no aggregate
    cfg = config.load(tmp_path / "config.yaml")
    for name in ("shrinkpad", "ae", "nad"):
        code = main(["defense", "--name", name, "--spec", json.dumps(cfg.defense(name)),
                     "--training", json.dumps(cfg.training("fast")), "--evaluation", json.dumps(cfg.evaluation()),
                     "--seed", "0", "--clean", str(results / "data/digits.zarr"),
                     "--poison", str(results / "poison/digits/badnets/seed0.zarr"),
                     "--victim-dir", str(results / "victims/digits/badnets/fast/seed0"), "--out-dir", str(root / name)])
        assert code == 0, name
    metrics = {name: json.loads((root / name / "metrics.json").read_text()) for name in workflow["defenses"]}
    for name in ("strip", "sentinet"):
        assert {"auroc", "tpr", "fpr", "threshold", "acc", "asr"} <= set(metrics[name]), name
        assert all(0 <= metrics[name][key] <= 1 for key in ("auroc", "tpr", "fpr")), name
        assert "nder" not in metrics[name]  # the victim is returned unchanged
    for name in ("shrinkpad", "ae", "nad"):
        assert "auroc" not in metrics[name] and 0 <= metrics[name]["nder"] <= 1, name
        assert (root / name / "model.pt").exists() and not (root / name / "work").exists()
    assert metrics["strip"]["acc"] == metrics["sentinet"]["acc"]
