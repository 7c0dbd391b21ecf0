"""The label-consistent (lc) and targeted-universal-perturbation (tuap) clean-label attacks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poisonflow import config
from poisonflow.attacks import ATTACKS, PoisonContext, lc, tuap
from poisonflow.data import digits
from poisonflow.errors import ConfigError
from poisonflow.models import build_model
from poisonflow.stages.poison import poison
from poisonflow.store import read_store
from poisonflow.trainer import images_to_tensor, to_float, train_model
from workflow_utils import snakemake, write_config

SIZE = 8
CHECKERBOARD_3 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
TRAINING = {"epochs": 4, "batch_size": 64, "augment": [], "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "schedule": {"name": "constant"}}


@pytest.fixture(scope="module")
def data():
    return digits.load({"source": "digits", "image_size": SIZE})


@pytest.fixture(scope="module")
def surrogate(data):
    """A width-4 convnet trained for a few epochs on 8-px digits, in eval mode."""
    torch.set_num_threads(1)
    model = build_model({"arch": "convnet", "width": 4}, 10, SIZE, seed=0)
    return train_model(model, data.train_images, data.train_labels, TRAINING, seed=0).model.eval()


def context(data, model, **kw) -> PoisonContext:
    return PoisonContext(data.train_images, data.train_labels, data.classes, surrogate=model, **kw)


def floats(images: np.ndarray) -> torch.Tensor:
    return to_float(images_to_tensor(images))


def lc_spec(trigger=None, **perturbation) -> dict:
    return {"kind": "lc", "target": 0, "label_mode": "clean", "rate": 0.5, "trigger": trigger or {},
            "perturbation": {"eps": 4 / 255, "step": 1 / 255, "steps": 6, **perturbation}}


def tuap_spec(**perturbation) -> dict:
    return {"kind": "tuap", "target": 3, "label_mode": "clean", "rate": 0.5,
            "perturbation": {"eps": 8 / 255, "step": 2 / 255, "epochs": 2, "batch_size": 64, "max_samples": 400,
                             **perturbation}}


def corner_mask(size: int, patch: int, margin: int = 0) -> torch.Tensor:
    """True on the pixels the four corner patches cover."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    for start in (margin, size - patch - margin):
        for other in (margin, size - patch - margin):
            mask[start:start + patch, other:other + patch] = True
    return mask


def target_probability(model, x: torch.Tensor, labels) -> float:
    with torch.no_grad():
        probs = F.softmax(model(x), dim=1)
    return float(probs[torch.arange(len(x)), torch.as_tensor(labels)].mean())


# --- LC -------------------------------------------------------------------------------------


def test_lc_registered_and_corners_at_the_four_corners():
    assert ATTACKS.get("lc") is lc and ATTACKS.get("tuap") is tuap
    assert lc.corner_positions(3, 8, 0) == ((0, 0), (0, 5), (5, 0), (5, 5))
    assert lc.corner_positions(2, 10, 1) == ((1, 1), (1, 7), (7, 1), (7, 7))
    with pytest.raises(ConfigError, match="trigger.size"):
        lc.corner_positions(9, 8, 0)


def test_lc_perturbation_is_within_eps_and_corners_equal_the_pattern(data, surrogate):
    trigger = lc.build(lc_spec(), SIZE, seed=0, context=context(data, surrogate))
    x, y = floats(data.train_images[:40]), torch.as_tensor(data.train_labels[:40])
    poisoned = trigger.poison(x, y)
    off_corners = ~corner_mask(SIZE, 3)
    change = (poisoned - x)[:, :, off_corners].abs()
    assert float(change.max()) <= 4 / 255 + 1e-6
    assert float(change.max()) >= 4 / 255 - 1e-6  # PGD used its budget (step 1/255, 6 steps)
    for row, col in ((0, 0), (0, 5), (5, 0), (5, 5)):
        for channel in range(3):
            assert torch.equal(poisoned[:, channel, row:row + 3, col:col + 3], CHECKERBOARD_3.expand(40, 3, 3))
    # the perturbation alone (before the stamp) is in the ε-ball everywhere, corners included
    assert float((trigger.perturb(x, y) - x).abs().max()) <= 4 / 255 + 1e-6


def test_lc_apply_stamps_only_the_corners(data, surrogate):
    trigger = lc.build(lc_spec({"pattern": "white", "size": 2, "margin": 1}), SIZE, 0, context(data, surrogate))
    x = floats(data.test_images[:10])
    stamped = trigger.apply(x)
    corners = corner_mask(SIZE, 2, margin=1)
    assert torch.equal(stamped[:, :, ~corners], x[:, :, ~corners])
    assert bool((stamped[:, :, corners] == 1.0).all())
    assert int(corners.sum()) == 16


def test_lc_lowers_the_true_class_probability_on_the_surrogate(data, surrogate):
    trigger = lc.build(lc_spec(eps=8 / 255, step=2 / 255, steps=10), SIZE, 0, context(data, surrogate))
    x, y = floats(data.test_images[:60]), data.test_labels[:60]
    clean = target_probability(surrogate, x, y)
    perturbed = target_probability(surrogate, trigger.perturb(x, torch.as_tensor(y)), y)
    assert clean > 0.5, clean  # the surrogate has learnt something
    assert perturbed < clean - 0.1, (clean, perturbed)


def test_lc_random_start_is_seeded(data, surrogate):
    x, y = floats(data.train_images[:8]), torch.as_tensor(data.train_labels[:8])

    def run(seed):
        return lc.build(lc_spec(random_start=True, steps=1), SIZE, seed, context(data, surrogate)).perturb(x, y)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    no_start = lc.build(lc_spec(steps=1), SIZE, 0, context(data, surrogate)).perturb(x, y)
    assert torch.equal(no_start, lc.build(lc_spec(steps=1), SIZE, 5, context(data, surrogate)).perturb(x, y))


def test_lc_batches_give_the_same_result(data, surrogate):
    x, y = floats(data.train_images[:20]), torch.as_tensor(data.train_labels[:20])
    whole = lc.build(lc_spec(batch_size=256), SIZE, 0, context(data, surrogate)).perturb(x, y)
    pieces = lc.build(lc_spec(batch_size=7), SIZE, 0, context(data, surrogate)).perturb(x, y)
    assert torch.allclose(whole, pieces, atol=1e-6)


def test_lc_warns_when_the_surrogate_is_not_adversarially_trained(data, surrogate):
    spec = {**lc_spec(), "surrogate": "plain", "surrogate_entry": {"training": {"adversarial": None}}}
    with pytest.warns(UserWarning, match="surrogate 'plain' is not adversarially trained"):
        lc.build(spec, SIZE, 0, context(data, surrogate))


# --- TUAP -----------------------------------------------------------------------------------


def test_tuap_delta_is_universal_and_within_eps(data, surrogate):
    trigger = tuap.build(tuap_spec(), SIZE, seed=0, context=context(data, surrogate))
    assert trigger.delta.shape == (3, SIZE, SIZE)
    assert float(trigger.delta.abs().max()) <= 8 / 255 + 1e-7
    assert float(trigger.delta.abs().max()) >= 8 / 255 - 1e-7  # signed steps reach the budget
    grey = torch.full((5, 3, SIZE, SIZE), 0.5)  # no clipping at 0.5 ± 8/255
    change = trigger.apply(grey) - grey
    for image in change:
        assert torch.allclose(image, trigger.delta, atol=1e-6)
    x = floats(data.test_images[:10])
    assert torch.equal(trigger.apply(x), (x + trigger.delta).clamp(0, 1))


def test_tuap_raises_the_target_class_probability(data, surrogate):
    eps = 16 / 255
    trigger = tuap.build(tuap_spec(eps=eps, step=eps / 4), SIZE, seed=0, context=context(data, surrogate))
    keep = data.test_labels != 3  # held-out images: δ generalizes beyond the images it was computed on
    x = floats(data.test_images[keep])
    target = np.full(int(keep.sum()), 3)
    random_sign = (torch.randint(0, 2, (3, SIZE, SIZE), generator=torch.Generator().manual_seed(0)) * 2 - 1) * eps
    clean = target_probability(surrogate, x, target)
    triggered = target_probability(surrogate, trigger.apply(x), target)
    noise = target_probability(surrogate, (x + random_sign).clamp(0, 1), target)
    assert triggered > clean + 0.05 and triggered > noise + 0.05, (clean, triggered, noise)


def test_tuap_step_matches_the_linear_model_formula():
    """For logits = W·x, ∇δ mean CE to t is mean_i (softmax(W·(x_i+δ)) − onehot(t))ᵀ W."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(3 * 2 * 2, 3, bias=False)
    linear.weight.data = torch.randn(3, 12, generator=generator)
    model = torch.nn.Sequential(torch.nn.Flatten(), linear)
    x = torch.rand(4, 3, 2, 2, generator=generator) * 0.5 + 0.25
    delta = torch.full((3, 2, 2), 0.01)
    probs = F.softmax((x + delta).flatten(1) @ linear.weight.data.T, dim=1)
    grad = ((probs - F.one_hot(torch.tensor(1), 3).float()) @ linear.weight.data).mean(0).view(3, 2, 2)
    expected = (delta - 0.02 * grad.sign()).clamp(-0.025, 0.025)
    assert torch.allclose(tuap.targeted_step(model, x, delta, 1, 0.025, 0.02), expected, atol=1e-7)


def test_tuap_subset_and_order_are_seeded():
    assert np.array_equal(tuap.sample_indices(10, 20, seed=0), np.arange(10))
    subset = tuap.sample_indices(100, 30, seed=4)
    assert len(set(subset)) == 30 and np.array_equal(subset, np.sort(subset)) and subset.max() < 100
    assert np.array_equal(subset, tuap.sample_indices(100, 30, seed=4))
    assert not np.array_equal(subset, tuap.sample_indices(100, 30, seed=5))
    assert np.array_equal(np.sort(tuap.epoch_order(50, 0, 3)), np.arange(50))
    assert not np.array_equal(tuap.epoch_order(50, 0, 3), tuap.epoch_order(50, 0, 4))


def test_tuap_resumes_from_the_saved_epoch(data, surrogate, tmp_path, monkeypatch):
    images = data.train_images[:200]
    settings = tuap_spec(batch_size=50)["perturbation"]
    direct = tuap.universal_perturbation(surrogate, images, 3, settings, seed=0)
    checkpoint = tmp_path / "delta.pt"
    tuap.universal_perturbation(surrogate, images, 3, {**settings, "epochs": 1}, seed=0, checkpoint=checkpoint)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    resumed = tuap.universal_perturbation(surrogate, images, 3, settings, seed=0, checkpoint=checkpoint)
    assert torch.equal(direct, resumed)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2

    def no_epochs(*args, **kwargs):
        raise AssertionError("a finished δ is recomputed")

    monkeypatch.setattr(tuap, "run_epoch", no_epochs)
    assert torch.equal(tuap.universal_perturbation(surrogate, images, 3, settings, 0, checkpoint=checkpoint), direct)
    with pytest.raises(AssertionError, match="recomputed"):  # another target: the saved δ does not apply
        tuap.universal_perturbation(surrogate, images, 4, settings, 0, checkpoint=checkpoint)


def test_tuap_build_caches_in_the_workdir(data, surrogate, tmp_path):
    trigger = tuap.build(tuap_spec(epochs=1), SIZE, 0, context(data, surrogate, workdir=tmp_path / "work"))
    saved = torch.load(tmp_path / "work" / tuap.CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 1 and torch.equal(saved["delta"], trigger.delta)


# --- both: missing surrogate, the poison stage, the schema ----------------------------------


@pytest.mark.parametrize("module, spec", [(lc, lc_spec()), (tuap, tuap_spec())])
def test_missing_surrogate_names_the_key(data, module, spec):
    with pytest.raises(ConfigError, match=r"^attacks\.x\.surrogate: an? \w+ attack"):
        module.build(spec, SIZE, 0, context(data, None, extra={"key": "attacks.x"}))
    with pytest.raises(ConfigError, match=r"^attack\.surrogate:"):
        module.build(spec, SIZE, 0, None)


@pytest.mark.parametrize("spec", [lc_spec(), tuap_spec()])
def test_clean_label_poisoning_keeps_labels(data, surrogate, spec):
    arrays = poison(spec, 0, data.train_images, data.train_labels, data.test_images, data.test_labels, 10,
                    context=context(data, surrogate))
    chosen = np.flatnonzero(arrays["train/poisoned"])
    target = spec["target"]
    assert len(chosen) == round(0.5 * int((data.train_labels == target).sum()))
    assert (data.train_labels[chosen] == target).all()
    assert np.array_equal(arrays["train/labels"], data.train_labels)
    assert np.array_equal(arrays["train/true_labels"], data.train_labels)
    assert not np.array_equal(arrays["train/images"][chosen], data.train_images[chosen])
    others = np.flatnonzero(~arrays["train/poisoned"])
    assert np.array_equal(arrays["train/images"][others], data.train_images[others])
    eps = spec["perturbation"]["eps"] * 255
    change = np.abs(arrays["train/images"][chosen].astype(int) - data.train_images[chosen].astype(int))
    if spec["kind"] == "lc":  # corners hold the pattern, the rest moved at most eps (in uint8 steps)
        corners = corner_mask(SIZE, 3).numpy()
        assert change[:, ~corners].max() <= round(eps)
        assert np.array_equal(arrays["test/images"][:, 5:8, 5:8, 0], np.broadcast_to(
            (CHECKERBOARD_3 * 255).numpy().astype(np.uint8), (len(arrays["test/images"]), 3, 3)))
    else:
        assert change.max() <= round(eps)
    assert (arrays["test/labels"] == target).all() and (arrays["test/true_labels"] != target).all()


BASE = {
    "datasets": {"digits": {"source": "digits"}},
    "models": {"m": {"arch": "convnet", "width": 4}},
    "trainings": {"t": {"model": "m"}},
    "surrogates": {"s": {"training": "t"}},
    "attacks": {"l": {"kind": "lc", "surrogate": "s"}, "u": {"kind": "tuap", "surrogate": "s"}},
    "defenses": {"n": {"kind": "none"}},
    "experiments": [{"dataset": ["digits"], "attack": ["l", "u"], "training": ["t"], "defense": ["n"], "seed": [0]}],
}


def test_config_defaults_are_the_papers():
    cfg = config.load(copy.deepcopy(BASE))
    lc_entry, tuap_entry = cfg.attack("l"), cfg.attack("u")
    assert lc_entry["trigger"] == {"pattern": "checkerboard", "size": 3, "margin": 0}
    assert lc_entry["perturbation"] == pytest.approx(
        {"eps": 8 / 255, "step": 2 / 255, "steps": 30, "random_start": False, "batch_size": 256})
    assert tuap_entry["perturbation"] == pytest.approx(
        {"eps": 4 / 255, "step": 1 / 255, "epochs": 5, "batch_size": 128, "max_samples": 5000})
    assert lc_entry["label_mode"] == tuap_entry["label_mode"] == "clean"


@pytest.mark.parametrize("change, message", [
    (lambda c: c["attacks"]["l"].pop("surrogate"), r"^attacks\.l: 'surrogate' is a required property"),
    (lambda c: c["attacks"]["u"].pop("surrogate"), r"^attacks\.u: 'surrogate' is a required property"),
    (lambda c: c["attacks"]["l"].update(perturbation={"eps": 0}), r"^attacks\.l\.perturbation\.eps: 0 is less"),
    (lambda c: c["attacks"]["u"].update(perturbation={"epochs": 0}), r"^attacks\.u\.perturbation\.epochs: 0 is less"),
    (lambda c: c["attacks"]["l"].update(trigger={"position": "top-left"}), r"^attacks\.l\.trigger\.position: unknown key"),
    (lambda c: c["attacks"]["u"].update(trigger={"size": 3}), r"^attacks\.u\.trigger\.size: unknown key"),
])
def test_bad_entries_name_the_key(change, message):
    raw = copy.deepcopy(BASE)
    change(raw)
    with pytest.raises(ConfigError, match=message):
        config.load(raw)


# --- end to end -----------------------------------------------------------------------------


def test_workflow_with_an_adversarially_trained_surrogate_and_lc(tmp_path):
    pgd = {"eps": 8 / 255, "step": 2 / 255, "steps": 2}
    write_config(tmp_path, {
        "evaluation": {"pgd": None},
        "datasets": {"digits": {"source": "digits", "image_size": 16}},
        "models": {"tiny": {"arch": "convnet", "width": 4}},
        "trainings": {
            "fast": {"model": "tiny", "epochs": 2, "batch_size": 64, "augment": []},
            "robust": {"model": "tiny", "epochs": 2, "batch_size": 64, "augment": [], "adversarial": pgd},
        },
        "surrogates": {"robust": {"training": "robust", "score_epoch": 2}},
        "attacks": {"lc": {"kind": "lc", "target": 0, "rate": 0.5, "surrogate": "robust",
                           "perturbation": {"steps": 5}}},
        "defenses": {"none": {"kind": "none"}},
        "experiments": [{"dataset": ["digits"], "attack": ["lc"], "training": ["fast"], "defense": ["none"],
                         "seed": [0]}],
        "workflow": {"group_small_jobs": True},  # jobs in the warm process: no torch import each
    })
    snakemake(tmp_path)
    clean = read_store(tmp_path / "results/data/digits.zarr")
    poisoned = read_store(tmp_path / "results/poison/digits/lc/seed0.zarr")
    labels = clean["train/labels"]
    assert np.array_equal(poisoned["train/labels"], labels)
    chosen = np.flatnonzero(poisoned["train/poisoned"])
    assert len(chosen) == round(0.5 * int((labels == 0).sum())) and (labels[chosen] == 0).all()
    images, original = poisoned["train/images"][chosen], clean["train/images"][chosen]
    corners = corner_mask(16, 3).numpy()
    assert 0 < np.abs(images[:, ~corners].astype(int) - original[:, ~corners].astype(int)).max() <= 8
    assert (images[:, 13:16, 13:16, 0] == (CHECKERBOARD_3 * 255).numpy()).all()
    # a `none` defense runs no job: the victim's metrics stand for it
    assert (tmp_path / "results/victims/digits/lc/fast/seed0/metrics.json").is_file()
    assert not (tmp_path / "results/defenses/digits/lc/fast/seed0/none").exists()
