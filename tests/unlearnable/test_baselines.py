"""The seven unlearnable-example baselines of the TriggerUE paper (EM, TAP, REM, EntF, LSP, OPS, AR).

Tiny data: 60 images of 8×8 pixels in 3 colour-coded classes, a convnet of width 4.
"""

from __future__ import annotations

import copy
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poisonflow.kinds import defaults_of, settings_for
from poisonflow import config
from poisonflow.attacks import UNLEARNABLE, PoisonContext
from poisonflow.errors import ConfigError
from poisonflow.stages.poison import protect as stage_protect
from poisonflow.store import read_store, write_store
from poisonflow.unlearnable import ar, em, entf, lsp, ops, rem, tap
from poisonflow.unlearnable.common import (build_surrogate, images_to_float, project_linf,
                                           scale_to_l2, sgd, sign_gradient_steps, train_step)

KINDS = ["em", "tap", "rem", "entf", "lsp", "ops", "ar"]
N, SIZE, K = 60, 8, 3
TINY_MODEL = {"arch": "convnet", "width": 4}
# Small budgets for every kind (CPU settings); each test overrides what it measures.
TINY = {
    "em": {"model": TINY_MODEL, "steps": 5, "max_rounds": 3, "batch_size": 32},
    "tap": {"steps": 10, "step": 2 / 255, "crop_padding": 1},
    "rem": {"model": TINY_MODEL, "steps": 2, "adv_steps": 2, "eot_samples": 1, "train_steps": 4, "batch_size": 32,
            "crop_padding": 1},
    "entf": {"steps": 10, "step": 2 / 255, "crop_padding": 1},
    "lsp": {"patch_size": 4},
    "ops": {},
    "ar": {"min_response": 0.5},
}
LINF_KINDS = ["em", "tap", "rem", "entf"]


def blobs(n=N, size=SIZE, seed=0):
    """Images whose class is a faint tint (red, green, blue: +20 of 255) under noise of std 20.

    Faint enough that perturbations of 16–24/255 can move a trained model's features and predictions.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % K
    base = 110 + 20 * np.eye(K)[labels]
    images = np.clip(base[:, None, None, :] + rng.normal(0, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return images, labels


IMAGES, LABELS = blobs()
# Pure noise: its cyclic labels can be fitted only through the perturbations (EM, REM take rounds).
NOISE = np.random.default_rng(0).integers(0, 256, IMAGES.shape).astype(np.uint8)


class Killed(Exception):
    """Stands for the job being killed in the middle of a generation."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def surrogate():
    """A convnet trained on the clean blobs (full batch, 40 steps): accuracy 1."""
    model = build_surrogate(TINY_MODEL, K, SIZE, seed=0, device="cpu")
    optimizer = sgd(model, 0.05, 0.9, 0.0)
    x, y = images_to_float(IMAGES), torch.as_tensor(LABELS)
    for _ in range(40):
        train_step(model, optimizer, x, y)
    model.eval()
    assert float((model(x).argmax(1) == y).float().mean()) == 1.0
    return model


def context(model=None, **extra):
    return PoisonContext(IMAGES, LABELS, ["red", "green", "blue"], surrogate=model, extra=dict(extra))


def run(kind, model=None, seed=0, images=IMAGES, labels=LABELS, **overrides):
    spec = {"kind": kind, **copy.deepcopy(TINY[kind]), **overrides}
    return UNLEARNABLE.get(kind).protect(spec, images, labels, context(model), seed)


def linf(a, b):
    return np.abs(a.astype(int) - b.astype(int)).max()


def l2_per_image(a, b):
    return np.sqrt(((a.astype(float) - b.astype(float)) ** 2).reshape(len(a), -1).sum(1))


# --- every kind ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_returns_uint8_images_of_the_same_shape_that_differ(kind, surrogate):
    out = run(kind, surrogate)
    assert out.dtype == np.uint8 and out.shape == IMAGES.shape
    assert (out != IMAGES).any(axis=(1, 2, 3)).mean() > 0.9  # (almost) every image is protected


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_given_the_seed(kind, surrogate):
    first = run(kind, surrogate, seed=3)
    assert np.array_equal(first, run(kind, surrogate, seed=3))
    if kind != "ops":  # on images without tied scores the one-pixel search does not use the seed
        assert not np.array_equal(first, run(kind, surrogate, seed=4))


@pytest.mark.parametrize("kind", LINF_KINDS)
def test_linf_budget_holds_per_pixel(kind, surrogate):
    eps = 6 / 255
    out = run(kind, surrogate, eps=eps)
    assert linf(out, IMAGES) <= eps * 255 + 0.5
    assert linf(out, IMAGES) >= 5  # the budget is used, not ignored


def test_schema_defaults_equal_the_modules_defaults():
    raw = {
        "datasets": {"digits": {"source": "digits"}},
        "models": {"m": {"arch": "convnet", "width": 4}},
        "trainings": {"t": {"model": "m"}},
        "surrogates": {"s": {"training": "t"}},
        "attacks": {kind: {"kind": kind, **({"surrogate": "s"} if kind in ("tap", "entf") else {})} for kind in KINDS},
        "defenses": {"n": {"kind": "none"}},
        "experiments": [{"dataset": ["digits"], "attack": ["lsp"], "training": ["t"], "defense": ["n"], "seed": [0]}],
    }
    cfg = config.load(raw)
    for kind in KINDS:
        module = importlib.import_module(f"poisonflow.unlearnable.{kind}")
        entry = {k: v for k, v in cfg.attack(kind).items() if k not in ("surrogate", "surrogate_entry")}
        assert entry == defaults_of(module.__name__), kind
        assert UNLEARNABLE.module_name(kind) == f"poisonflow.unlearnable.{kind}"


def test_paper_defaults():
    assert (defaults_of(em.__name__)["eps"], defaults_of(em.__name__)["step"], defaults_of(em.__name__)["steps"]) == (8 / 255, 0.8 / 255, 20)
    assert (defaults_of(em.__name__)["train_steps"], defaults_of(em.__name__)["stop_accuracy"]) == (10, 0.99)
    assert defaults_of(em.__name__)["model"] == {"arch": "resnet18", "width": 64}
    assert (defaults_of(tap.__name__)["eps"], defaults_of(tap.__name__)["steps"]) == (8 / 255, 250)
    assert (defaults_of(rem.__name__)["adv_eps"], defaults_of(rem.__name__)["eot_samples"], defaults_of(rem.__name__)["train_steps"]) == (4 / 255, 5, 5000)
    assert (defaults_of(lsp.__name__)["patch_size"], defaults_of(lsp.__name__)["eps"]) == (8, 6 / 255)
    assert (defaults_of(ar.__name__)["eps"], defaults_of(ar.__name__)["crop"]) == (1.0, 4)


@pytest.mark.parametrize("kind", ["tap", "entf"])
def test_missing_surrogate_is_a_config_error_naming_the_key(kind):
    spec = {"kind": kind, **TINY[kind]}
    with pytest.raises(ConfigError, match=rf"^attacks\.mine\.surrogate: {kind} crafts"):
        UNLEARNABLE.get(kind).protect(spec, IMAGES, LABELS, context(None, key="attacks.mine"), 0)
    with pytest.raises(ConfigError, match=r"^attack\.surrogate:"):
        UNLEARNABLE.get(kind).protect(spec, IMAGES, LABELS, context(None), 0)


def test_schema_requires_a_surrogate_for_tap_and_entf():
    raw = {
        "datasets": {"digits": {"source": "digits"}},
        "models": {"m": {"arch": "convnet", "width": 4}},
        "trainings": {"t": {"model": "m"}},
        "attacks": {"u": {"kind": "tap"}},
        "defenses": {"n": {"kind": "none"}},
        "experiments": [{"dataset": ["digits"], "attack": ["u"], "training": ["t"], "defense": ["n"], "seed": [0]}],
    }
    with pytest.raises(ConfigError, match=r"^attacks\.u: 'surrogate' is a required property"):
        config.load(raw)


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^em\.epz: unknown key \(known: batch_size, eps"):
        settings_for(em.__name__, {"kind": "em", "epz": 1})


def test_poison_stage_protects_a_rate_fraction_with_lsp_and_keeps_labels(tmp_path):
    attack = {"kind": "lsp", "rate": 0.5, "patch_size": 4, "eps": 6 / 255, "class_sep": 10.0}
    arrays = stage_protect(attack, 7, IMAGES, LABELS, context())
    assert np.array_equal(arrays["train/labels"], LABELS) and np.array_equal(arrays["train/true_labels"], LABELS)
    poisoned = arrays["train/poisoned"]
    assert poisoned.sum() == N // 2
    assert np.array_equal(arrays["train/images"][~poisoned], IMAGES[~poisoned])
    assert (arrays["train/images"][poisoned] != IMAGES[poisoned]).any(axis=(1, 2, 3)).all()
    assert not any(key.startswith("test/") for key in arrays)
    store = read_store(write_store(tmp_path / "seed7.zarr", arrays, {"attack": attack}))
    assert "train/images" in store and "test/images" not in store and "test/labels" not in store


# --- shared pieces ---------------------------------------------------------------------------


def test_sign_gradient_steps_on_a_linear_objective():
    """Objective Σz: each ascent step adds `step` to every pixel until ε or the pixel range stops it."""
    x = torch.tensor([0.5, 0.99, 0.0, 0.2]).view(1, 1, 2, 2)
    up = sign_gradient_steps(x, torch.zeros_like(x), lambda z: z.sum(), eps=0.1, step=0.04, steps=2, ascend=True)
    assert torch.allclose(up.flatten(), torch.tensor([0.08, 0.01, 0.08, 0.08]))
    down = sign_gradient_steps(x, torch.zeros_like(x), lambda z: z.sum(), eps=0.1, step=0.04, steps=5, ascend=False)
    assert torch.allclose(down.flatten(), torch.tensor([-0.1, -0.1, 0.0, -0.1]))


def test_budget_projections():
    x = torch.full((2, 3, 2, 2), 0.95)
    delta = torch.full((2, 3, 2, 2), 0.2)
    assert torch.allclose(project_linf(delta, x, 0.1), torch.full_like(x, 0.05))
    scaled = scale_to_l2(torch.arange(24.0).view(2, 3, 2, 2), 2.0)
    assert torch.allclose(scaled.flatten(1).norm(dim=1), torch.tensor([2.0, 2.0]))
    assert torch.equal(scale_to_l2(torch.zeros(1, 3, 2, 2), 1.0), torch.zeros(1, 3, 2, 2))


# --- EM and REM ------------------------------------------------------------------------------


def surrogate_loss(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(x), y))


def test_em_makes_labels_of_pure_noise_learnable_and_stops_when_fitted():
    """Noise images with cyclic labels carry no class information: only δ can make them fit."""
    noise = NOISE
    spec = {**TINY["em"], "steps": 10, "step": 2 / 255, "stop_accuracy": 1.0, "max_rounds": 6}
    settings = settings_for(em.__name__, spec)
    generation = em.error_minimizing_noise(noise, LABELS, settings, K, seed=0)
    x, y = images_to_float(noise), torch.as_tensor(LABELS)
    assert generation.delta.abs().max() <= settings["eps"] + 1e-6
    assert generation.accuracy == 1.0 and generation.rounds < 6  # stopped at stop_accuracy, before the cap
    assert surrogate_loss(generation.model, x + generation.delta, y) < 0.1 * surrogate_loss(generation.model, x, y)


def counting(monkeypatch, module, name, kill_at=None):
    """Replace ``module.name`` by a wrapper that counts its calls and raises Killed on call ``kill_at``."""
    original, calls = getattr(module, name), []

    def wrapper(*args):
        calls.append(1)
        if len(calls) == kill_at:
            raise Killed
        return original(*args)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_em_resumes_from_its_checkpoint_after_a_kill(tmp_path, monkeypatch):
    ctx = context(None)
    ctx.workdir = tmp_path
    spec = {"kind": "em", **TINY["em"], "stop_accuracy": 1.0}
    rounds = counting(monkeypatch, em, "minimize_error")
    uninterrupted = em.protect(spec, NOISE, LABELS, context(None), 0)
    assert len(rounds) == 3
    counting(monkeypatch, em, "minimize_error", kill_at=2)  # killed in round 2, after round 1's checkpoint
    with pytest.raises(Killed):
        em.protect(spec, NOISE, LABELS, ctx, 0)
    assert (tmp_path / "em.pt").exists()
    resumed = counting(monkeypatch, em, "minimize_error")
    assert np.array_equal(em.protect(spec, NOISE, LABELS, ctx, 0), uninterrupted)
    assert len(resumed) == 2  # rounds 2 and 3 only


def test_rem_noise_lowers_the_source_models_loss_under_attack():
    settings = settings_for(rem.__name__, {**TINY["rem"], "train_steps": 6, "steps": 4})
    generation = rem.robust_error_minimizing_noise(IMAGES, LABELS, settings, K, seed=0)
    x, y = images_to_float(IMAGES), torch.as_tensor(LABELS)
    assert generation.delta.abs().max() <= settings["eps"] + 1e-6
    model = generation.model
    attack = {**settings, "adv_steps": 5}
    protected = x + generation.delta
    robust_protected = protected + rem.adversarial_perturbation(model, protected, y, attack, torch.Generator())
    robust_clean = x + rem.adversarial_perturbation(model, x, y, attack, torch.Generator())
    assert surrogate_loss(model, robust_protected, y) < surrogate_loss(model, robust_clean, y)


def test_rem_resumes_from_its_checkpoint_after_a_kill(tmp_path, monkeypatch):
    monkeypatch.setattr(rem, "CHECKPOINT_EVERY", 1)
    ctx = context(None)
    ctx.workdir = tmp_path
    spec = {"kind": "rem", **TINY["rem"]}
    uninterrupted = rem.protect(spec, IMAGES, LABELS, context(None), 0)
    counting(monkeypatch, rem, "adversarial_training_step", kill_at=3)  # killed at step 3 of 4
    with pytest.raises(Killed):
        rem.protect(spec, IMAGES, LABELS, ctx, 0)
    resumed = counting(monkeypatch, rem, "adversarial_training_step")
    assert np.array_equal(rem.protect(spec, IMAGES, LABELS, ctx, 0), uninterrupted)
    assert len(resumed) == 2  # steps 3 and 4 only


# --- TAP and EntF ----------------------------------------------------------------------------


def predictions(model, images):
    with torch.no_grad():
        return model(images_to_float(images)).argmax(1).numpy()


def test_tap_moves_predictions_to_the_next_class(surrogate):
    out = run("tap", surrogate, eps=24 / 255, step=4 / 255, steps=20, augment=[])
    target = (LABELS + 1) % K
    assert (predictions(surrogate, IMAGES) == target).mean() == 0.0
    assert (predictions(surrogate, out) == target).mean() > 0.8


def test_tap_permutation_and_restart_choice(surrogate):
    assert tap.target_classes(torch.tensor([0, 1, 2]), 3).tolist() == [1, 2, 0]
    settings = settings_for(tap.__name__, {"steps": 3, "restarts": 3, "augment": []})
    delta = tap.targeted_adversarial_noise(surrogate, IMAGES, LABELS, K, settings, seed=0)
    x, y = images_to_float(IMAGES), torch.as_tensor(LABELS)
    losses = []
    for restart in range(3):
        single = tap.targeted_perturbations(surrogate, x, y, K, settings,
                                            tap.seeded_generator(0, restart))
        losses.append((tap.target_loss(surrogate, x + single, y, K, 512), single))
    assert torch.equal(delta, min(losses, key=lambda pair: pair[0])[1])


def test_entf_centroids_are_class_means_of_features(surrogate):
    centroids = entf.class_centroids(surrogate, IMAGES, LABELS, K, 7, "cpu")
    with torch.no_grad():
        features = surrogate.features(images_to_float(IMAGES))
    for k in range(K):
        assert torch.allclose(centroids[k], features[torch.as_tensor(LABELS) == k].mean(0), atol=1e-5)


def test_entf_nearest_other_centroid_skips_the_own_class():
    centroids = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    features = torch.tensor([[0.1, 0.0], [0.9, 0.0], [4.0, 0.0]])
    assert entf.nearest_other_centroid(features, torch.tensor([0, 1, 2]), centroids).tolist() == [1, 0, 1]


def mean_distance(features, targets):
    return float((features - targets).pow(2).sum(1).mean())


@pytest.mark.parametrize("variant", ["pull", "push"])
def test_entf_moves_features_between_the_class_centroids(surrogate, variant):
    out = run("entf", surrogate, variant=variant, eps=16 / 255, step=2 / 255, steps=15, augment=[])
    centroids = entf.class_centroids(surrogate, IMAGES, LABELS, K, 64, "cpu")
    y = torch.as_tensor(LABELS)
    with torch.no_grad():
        clean = surrogate.features(images_to_float(IMAGES))
        protected = surrogate.features(images_to_float(out))
    if variant == "pull":
        targets = centroids[entf.nearest_other_centroid(clean, y, centroids)]
        assert mean_distance(protected, targets) < 0.5 * mean_distance(clean, targets)
    else:
        assert mean_distance(protected, centroids[y]) > 2 * mean_distance(clean, centroids[y])


# --- LSP -------------------------------------------------------------------------------------


def test_lsp_points_fill_colour_blocks():
    points = np.arange(12, dtype=float).reshape(1, 12)  # a 2×2 grid of patches × 3 channels
    image = lsp.patches_to_images(points, 3, 4, 2)[0]  # 3×4 image: the last patch row is cropped
    assert image.shape == (3, 3, 4)
    assert image[0].tolist() == [[0, 0, 3, 3], [0, 0, 3, 3], [6, 6, 9, 9]]
    assert image[2].tolist() == [[2, 2, 5, 5], [2, 2, 5, 5], [8, 8, 11, 11]]


def test_lsp_noise_is_separable_by_class_with_the_l2_budget():
    labels = np.arange(90) % K
    settings = {**defaults_of(lsp.__name__), "patch_size": 4}
    delta, centroids = lsp.synthetic_noise(labels, K, SIZE, SIZE, settings, seed=0)
    budget = 6 / 255 * math.sqrt(3 * SIZE * SIZE)
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((90,), budget), rtol=1e-5)
    assert torch.equal(delta[:, :, :4, :4], delta[:, :, :1, :1].expand(-1, -1, 4, 4))  # constant per patch
    assert centroids.shape == (K, 12) and set(np.abs(centroids).ravel()) == {10.0}
    assert len({tuple(c) for c in centroids}) == K  # distinct class centroids
    flat = delta.flatten(1)
    means = torch.stack([flat[torch.as_tensor(labels) == k].mean(0) for k in range(K)])
    nearest = torch.cdist(flat, means).argmin(1).numpy()
    assert (nearest == labels).all()  # the class structure is the shortcut
    assert not torch.equal(delta[0], delta[3])  # sample-wise: two images of class 0 differ


def test_lsp_protected_images_keep_the_l2_budget():
    out = run("lsp", eps=6 / 255)
    bound = 6 / 255 * 255 * math.sqrt(3 * SIZE * SIZE) + 0.5 * math.sqrt(3 * SIZE * SIZE)
    assert (l2_per_image(out, IMAGES) <= bound).all()


def test_lsp_rejects_a_patch_size_without_enough_centroids():
    labels = np.arange(20) % 10
    with pytest.raises(ConfigError, match=r"^lsp\.patch_size:"):
        lsp.synthetic_noise(labels, 10, 8, 8, {**defaults_of(lsp.__name__), "patch_size": 8}, seed=0)  # 3 dims, 8 vertices


# --- OPS -------------------------------------------------------------------------------------


def test_ops_scores_are_mean_over_std_of_the_deviation():
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.uniform(0, 1, (5, 3, 2, 2)), dtype=torch.float32)
    scores = ops.pixel_scores(x)
    deviation = np.abs(x.numpy()[:, :, 1, 0] - np.array([1.0, 0.0, 1.0]))  # colour index 5 = (1, 0, 1)
    assert scores[1, 0, 5].item() == pytest.approx(deviation.mean() / deviation.std(), rel=1e-5)


def test_ops_picks_the_pixel_a_class_shares_and_never_reuses_a_shortcut():
    images = np.random.default_rng(2).integers(0, 256, (6, 4, 4, 3)).astype(np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    images[:, 2, 1] = 0  # every image black at (2, 1): white there deviates by 1 with std 0
    shortcuts = ops.class_shortcuts(images, labels, 2)
    assert shortcuts[0] == [(2, 1, 7)]  # white (colour index 7)
    assert len(shortcuts[1]) == 1 and shortcuts[1][0] != (2, 1, 7)  # taken by class 0


def test_ops_breaks_ties_from_the_seed():
    """On a constant black background every position scores +∞ for white: the seed picks one."""
    images = np.zeros((4, 6, 6, 3), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1])
    picks = [ops.class_shortcuts(images, labels, 2, seed=seed) for seed in range(6)]
    assert picks[0] == ops.class_shortcuts(images, labels, 2, seed=0)
    assert all(pixels[0][2] == 7 for pick in picks for pixels in pick.values())  # white
    assert len({pick[0][0][:2] for pick in picks}) > 1  # positions vary with the seed
    assert all(pick[0] != pick[1] for pick in picks)


def test_ops_changes_one_pixel_per_image_at_one_position_per_class():
    out = run("ops")
    changed = (out != IMAGES).any(axis=3)  # (N, H, W)
    assert (changed.sum(axis=(1, 2)) == 1).all()
    positions = {}
    for image, label, diff in zip(out, LABELS, changed):
        row, col = map(int, np.argwhere(diff)[0])
        assert set(image[row, col].tolist()) <= {0, 255}  # a corner of the RGB cube
        positions.setdefault(int(label), set()).add((row, col, tuple(image[row, col].tolist())))
    assert all(len(found) == 1 for found in positions.values())
    assert len({next(iter(found)) for found in positions.values()}) == K


# --- AR --------------------------------------------------------------------------------------


def test_ar_recursion_on_hand_made_coefficients():
    beta = torch.zeros(1, 3, 3, 3, dtype=torch.float64)
    beta[:, :, 2, 1] = 1.0  # each pixel copies its left neighbour
    start = torch.arange(75, dtype=torch.float64).view(1, 3, 5, 5)
    signal = ar.ar_signals(beta, start)
    assert torch.equal(signal[:, :, :2], start[:, :, :2]) and torch.equal(signal[:, :, :, :2], start[:, :, :, :2])
    assert torch.equal(signal[0, 0, 3], torch.tensor([15.0, 16.0, 16.0, 16.0, 16.0], dtype=torch.float64))


def test_ar_coefficients_sum_to_one_without_the_current_pixel():
    beta = ar.random_coefficients(4, torch.Generator().manual_seed(0))
    assert torch.all(beta[:, :, 2, 2] == 0)
    assert torch.allclose(beta.sum(dim=(2, 3)), torch.ones(4, 3, dtype=torch.float64))


def test_ar_noise_is_annihilated_by_its_own_class_filter_only():
    settings = {**defaults_of(ar.__name__), "min_response": 0.5}
    coefficients = ar.search_coefficients(K, SIZE + 4, settings, torch.Generator().manual_seed(0))
    labels = np.arange(30) % K
    delta = ar.autoregressive_noise(labels, coefficients, SIZE, settings, torch.Generator().manual_seed(1))
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.ones(30), rtol=1e-5)  # ℓ2 = eps
    signals = delta.double()
    for k in range(K):
        own = ar.filter_response(coefficients[k], signals[labels == k])
        residual = F.conv2d(signals[labels == k], ar.ar_filter(coefficients[k]))
        assert residual.abs().max() < 1e-6 and own.max() < 1e-6  # zero up to float32 rounding
        for other in set(range(K)) - {k}:  # other classes' filters do not annihilate it
            assert ar.filter_response(coefficients[other], signals[labels == k]).min() > 0.1
    assert not torch.equal(delta[0], delta[3])  # each image has its own start


def test_ar_protected_images_keep_the_l2_budget():
    out = run("ar", eps=0.5)
    bound = 0.5 * 255 + 0.5 * math.sqrt(3 * SIZE * SIZE)
    assert (l2_per_image(out, IMAGES) <= bound).all()


def test_ar_search_gives_up_with_a_config_error():
    settings = {**defaults_of(ar.__name__), "min_response": 1e6, "max_attempts": 70}
    with pytest.raises(ConfigError, match=r"^ar\.min_response: found only [01] of 3 AR processes in 70 draws"):
        ar.search_coefficients(K, 12, settings, torch.Generator().manual_seed(0))
