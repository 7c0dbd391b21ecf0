"""ABL: the LGA loss, the isolation rule, isolation on a poisoned set, unlearning, resumption."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from poisonflow.kinds import defaults_of, settings_for
from poisonflow import checkpoint, config
from poisonflow.defenses import DEFENSES, DefenseContext, abl, merge
from poisonflow.errors import ConfigError
from poisonflow.models import build_model
from poisonflow.trainer import images_to_tensor, to_float, train_model
import defense_utils

torch.set_num_threads(1)

TINY_TRAINING = {**defense_utils.TINY_TRAINING, "model": {"arch": "convnet", "width": 8}, "augment": []}
TARGET = 0


def weak_class_images(n: int, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes whose mean colours differ by ±4 under per-pixel noise σ = 40: hard to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    palette = 110.0 + 4.0 * (np.eye(3) * 2 - 1)
    images = palette[labels][:, None, None, :] + rng.normal(0, 40, (n, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def bright_corner_poison(images: np.ndarray, labels: np.ndarray, rate: float = 0.1, seed: int = 0):
    """Dirty-label poison: a white 3×3 bottom-right patch on ``rate``·N non-target images, relabelled."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.flatnonzero(labels != TARGET), int(round(rate * len(labels))), replace=False)
    images, labels = images.copy(), labels.copy()
    images[chosen, -3:, -3:, :] = 255
    labels[chosen] = TARGET
    poisoned = np.zeros(len(labels), dtype=bool)
    poisoned[chosen] = True
    return images, labels, poisoned


def poisoned_context(tmp_path, n: int = 300, seed: int = 0, victim=None) -> tuple[DefenseContext, np.ndarray]:
    images, labels = weak_class_images(n)
    images, labels, poisoned = bright_corner_poison(images, labels)
    reserve_images, reserve_labels = weak_class_images(60, seed=1)
    ctx = DefenseContext(
        train_images=images, train_labels=labels, reserve_images=reserve_images, reserve_labels=reserve_labels,
        training=TINY_TRAINING,
        build_model=lambda: build_model(TINY_TRAINING["model"], num_classes=3, image_size=8),
        victim=victim, seed=seed, device=torch.device("cpu"), workdir=tmp_path / "work", num_classes=3,
    )
    return ctx, poisoned


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(to_float(images_to_tensor(images))).argmax(1).numpy()
    return float((predictions == labels).mean())


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    state_b = b.state_dict()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, state_b[name]), name


# --- the LGA loss ---------------------------------------------------------------------------------


def test_lga_flips_the_sign_of_losses_below_gamma():
    ce = torch.tensor([0.1, 0.5, 0.7, 2.0])
    np.testing.assert_allclose(abl.lga_loss(ce, 0.5).numpy(), [-0.1, 0.0, 0.7, 2.0], rtol=1e-6)
    np.testing.assert_allclose(abl.lga_loss(ce, 0.0).numpy(), ce.numpy(), rtol=1e-6)  # γ = 0: plain CE


def test_lga_forms_on_hand_made_losses():
    # the forms give per-sample losses; the trainer descends on their batch mean
    ce = torch.tensor([0.1, 0.5, 0.7, 2.0], requires_grad=True)
    # sample: mean of (−0.1, 0, 0.7, 2.0); each loss's gradient is its sign / 4
    per_sample = abl.LGA_FORMS["sample"](ce, 0.5).mean()
    assert per_sample.item() == pytest.approx(0.65, rel=1e-6)
    per_sample.backward()
    np.testing.assert_allclose(ce.grad.numpy(), [-0.25, 0.0, 0.25, 0.25], rtol=1e-6)
    # batch: the mean 0.825 lies above γ, so it is descended as is
    assert abl.LGA_FORMS["batch"](ce, 0.5).mean().item() == pytest.approx(0.825, rel=1e-6)
    # a batch mean of 0.2 below γ = 0.5 is negated: every loss gets gradient −1/3 (ascent)
    low = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    batch = abl.LGA_FORMS["batch"](low, 0.5).mean()
    assert batch.item() == pytest.approx(-0.2, rel=1e-6)
    batch.backward()
    np.testing.assert_allclose(low.grad.numpy(), [-1 / 3] * 3, rtol=1e-6)


def test_unlearning_loss_is_the_negated_mean():
    ce = torch.tensor([0.2, 1.0, 2.4])
    assert abl.unlearning_loss(ce).mean().item() == pytest.approx(-1.2, rel=1e-6)


# --- the isolation rule ---------------------------------------------------------------------------


def test_isolation_takes_exactly_the_lowest_loss_fraction():
    losses = np.array([0.9, 0.05, 3.0, 0.2, 0.05, 1.0, 0.4, 2.0, 0.3, 0.6])
    assert np.flatnonzero(abl.lowest_loss_mask(losses, 0.3)).tolist() == [1, 3, 4]
    assert np.flatnonzero(abl.lowest_loss_mask(losses, 0.25)).tolist() == [1, 4]  # ⌊2.5⌋ = 2
    assert np.flatnonzero(abl.lowest_loss_mask(losses, 0.01)).tolist() == [1]  # at least one; tie → lower index
    assert np.flatnonzero(abl.lowest_loss_mask(losses, 0.5)).tolist() == [1, 3, 4, 6, 8]
    assert abl.isolation_count(50_000, 0.01) == 500 and abl.isolation_count(1437, 0.01) == 14
    with pytest.raises(ValueError, match="NaN"):
        abl.lowest_loss_mask(np.array([0.1, np.nan]), 0.5)


class BrightnessLogit(nn.Module):
    """Logits (0, a·mean pixel): with every label 1, the loss is softplus(−a·mean), so the
    brightest images have the lowest loss."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x):
        z = self.a * x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(z), z], dim=1)


def test_isolate_ranks_per_sample_losses_of_a_hand_controlled_model():
    brightness = np.array([10, 200, 90, 250, 30, 120, 180, 60], dtype=np.uint8)
    images = np.broadcast_to(brightness[:, None, None, None], (8, 4, 4, 3)).copy()
    labels = np.ones(8, dtype=np.int64)
    result = abl.isolate(BrightnessLogit(3.0), images, labels, ratio=0.25, batch_size=3)
    expected = np.log1p(np.exp(-3.0 * brightness / 255.0))
    np.testing.assert_allclose(result.losses, expected, rtol=1e-5)
    assert np.flatnonzero(result.isolated).tolist() == [1, 3]  # the two brightest


# --- isolation on a poisoned set ------------------------------------------------------------------


ISOLATION = {"epochs": 8, "optimizer": {"lr": 0.05}}


@pytest.mark.parametrize("seed", [0, 1])
def test_lga_isolation_is_enriched_in_poisons(tmp_path, seed):
    ctx, poisoned = poisoned_context(tmp_path, seed=seed)
    resolved = settings_for(abl.__name__, {"isolation": ISOLATION, "isolation_ratio": 0.05})
    model = abl.isolation_training(ctx, resolved)
    isolation = abl.isolate(model, ctx.train_images, ctx.train_labels, 0.05)
    assert isolation.isolated.sum() == 15
    precision = poisoned[isolation.isolated].mean()  # ground truth only here, in the test
    assert poisoned.mean() == pytest.approx(0.1)
    assert precision >= 0.8, precision
    # the mean loss is held near γ = 0.5 by the clean samples while the poisons fall far below it
    assert np.median(isolation.losses[poisoned]) < 0.05 < 0.25 < np.median(isolation.losses[~poisoned])


# --- unlearning -----------------------------------------------------------------------------------


def test_unlearning_lowers_accuracy_on_the_isolated_labels(tmp_path):
    ctx, poisoned = poisoned_context(tmp_path)
    torch.manual_seed(0)
    backdoored = train_model(ctx.build_model(), ctx.train_images, ctx.train_labels,
                             merge(TINY_TRAINING, {"epochs": 8}), seed=0).model
    images, labels = ctx.train_images[poisoned], ctx.train_labels[poisoned]
    clean_images, clean_labels = ctx.train_images[~poisoned], ctx.train_labels[~poisoned]
    before, clean_before = accuracy(backdoored, images, labels), accuracy(backdoored, clean_images, clean_labels)
    # the paper's unlearning: 20 epochs of ascent at lr 5e-4, no augmentation
    unlearned = abl.unlearn(copy.deepcopy(backdoored), images, labels,
                            merge(TINY_TRAINING, defaults_of(abl.__name__)["unlearning"]), seed=0)
    after, clean_after = accuracy(unlearned, images, labels), accuracy(unlearned, clean_images, clean_labels)
    assert before == 1.0  # the backdoor is learned
    assert after <= 0.5, after
    assert clean_after >= clean_before - 0.02, (clean_before, clean_after)  # clean samples do not suffer


# --- the whole defense ----------------------------------------------------------------------------


SPEC = {
    "kind": "abl",
    "isolation_ratio": 0.05,
    "isolation": {"epochs": 3, "optimizer": {"lr": 0.05}},
    "clean": {"epochs": 2, "optimizer": {"lr": 0.05}, "schedule": {"milestones": [1]}},
    "unlearning": {"epochs": 3},
}


def test_abl_runs_end_to_end_and_leaves_the_victim_untouched(tmp_path):
    torch.manual_seed(5)
    victim = build_model(TINY_TRAINING["model"], num_classes=3, image_size=8).eval()
    victim_state = copy.deepcopy(victim.state_dict())
    ctx, _ = poisoned_context(tmp_path, n=120, victim=victim)

    result = DEFENSES.get("abl").run(SPEC, ctx)

    assert result.model is not victim
    for name, tensor in victim.state_dict().items():
        assert torch.equal(tensor, victim_state[name]), name
    assert result.kept.dtype == bool and result.kept.shape == (120,)
    assert result.metrics["isolated"] == 6 == int((~result.kept).sum())
    stored = torch.load(ctx.workdir / "isolated.pt", weights_only=True)
    isolated, losses = stored["isolated"].numpy(), stored["losses"].numpy()
    np.testing.assert_array_equal(isolated, ~result.kept)
    assert result.metrics["isolation_cutoff"] == pytest.approx(losses[~result.kept].max())
    assert losses[result.kept].min() >= result.metrics["isolation_cutoff"]
    # each stage ran its own number of epochs, and wrote one history row per epoch
    for stage, epochs in (("isolation", 3), ("clean", 2), ("unlearning", 3)):
        assert torch.load(ctx.workdir / f"{stage}.pt", weights_only=True)["epoch"] == epochs
        rows = (ctx.workdir / f"history-{stage}.csv").read_text().splitlines()
        assert rows[0] == "epoch,loss,accuracy,lr,seconds" and len(rows) == 1 + epochs


class Killed(Exception):
    pass


def kill_after(monkeypatch, saves: int) -> None:
    """Make ABL raise right after its ``saves``-th checkpoint write (a killed job)."""
    real_save = checkpoint.save
    count = {"n": 0}

    def save_then_maybe_die(path, digest, state):
        real_save(path, digest, state)
        count["n"] += 1
        if count["n"] == saves:
            raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_maybe_die)


# isolation writes checkpoints 1–3, the isolated set 4, the clean stage 5–6, unlearning 7–9
@pytest.mark.parametrize("saves, stage, epoch", [(2, "isolation", 2), (5, "clean", 1), (8, "unlearning", 2)],
                         ids=["killed-in-isolation", "killed-in-clean", "killed-in-unlearning"])
def test_abl_resumes_from_its_checkpoints_with_identical_weights(tmp_path, monkeypatch, saves, stage, epoch):
    ctx, _ = poisoned_context(tmp_path / "straight", n=120)
    reference = abl.run(SPEC, ctx)

    killed_ctx, _ = poisoned_context(tmp_path / "killed", n=120)
    with monkeypatch.context() as patch:
        kill_after(patch, saves)
        with pytest.raises(Killed):
            abl.run(SPEC, killed_ctx)
    assert torch.load(killed_ctx.workdir / f"{stage}.pt", weights_only=True)["epoch"] == epoch
    resumed = abl.run(SPEC, killed_ctx)

    np.testing.assert_array_equal(resumed.kept, reference.kept)
    assert_same_weights(resumed.model, reference.model)
    # a finished run reruns from its checkpoints alone
    again = abl.run(SPEC, ctx)
    assert_same_weights(again.model, reference.model)


# --- config ---------------------------------------------------------------------------------------


def test_resolve_spec_rejects_bad_keys_naming_them():
    with pytest.raises(ConfigError, match="abl.isolation_rate"):
        settings_for(abl.__name__, {"kind": "abl", "isolation_rate": 0.1})
    with pytest.raises(ConfigError, match="abl.isolation_ratio"):
        settings_for(abl.__name__, {"isolation_ratio": 1.0})
    with pytest.raises(ConfigError, match="abl.lga"):
        settings_for(abl.__name__, {"lga": "mean"})
    with pytest.raises(ConfigError, match="abl.unlearning.adversarial"):
        settings_for(abl.__name__, {"unlearning": {"adversarial": {"eps": 0.03, "step": 0.01, "steps": 2}}})


def test_defaults_follow_the_paper():
    assert defaults_of(abl.__name__)["isolation_ratio"] == 0.01 and defaults_of(abl.__name__)["gamma"] == 0.5
    assert defaults_of(abl.__name__)["isolation"]["epochs"] == 20 and defaults_of(abl.__name__)["isolation"]["optimizer"]["lr"] == 0.1
    assert defaults_of(abl.__name__)["clean"]["epochs"] == 60
    assert defaults_of(abl.__name__)["clean"]["schedule"] == {"name": "multistep", "milestones": [40], "gamma": 0.1}
    assert defaults_of(abl.__name__)["unlearning"]["epochs"] == 20 and defaults_of(abl.__name__)["unlearning"]["optimizer"]["lr"] == 5e-4
    assert defaults_of(abl.__name__)["unlearning"]["augment"] == []
    assert math.isclose(defaults_of(abl.__name__)["isolation"]["optimizer"]["weight_decay"], 1e-4)


def test_schema_defaults_equal_the_module_defaults():
    raw = {
        "datasets": {"digits": {"source": "digits"}},
        "models": {"m": {"arch": "convnet", "width": 4}},
        "trainings": {"t": {"model": "m"}},
        "attacks": {"a": {"kind": "badnets"}},
        "defenses": {"x": {"kind": "abl"}},
        "experiments": [{"dataset": ["digits"], "attack": ["a"], "training": ["t"], "defense": ["x"], "seed": [0]}],
    }
    spec = config.load(copy.deepcopy(raw)).defense("x")
    assert spec == defaults_of(abl.__name__)
    raw["defenses"]["x"]["isolation"] = {"adversarial": {"eps": 0.03, "step": 0.01, "steps": 2}}
    with pytest.raises(ConfigError, match="defenses.x.isolation.adversarial"):
        config.load(raw)
