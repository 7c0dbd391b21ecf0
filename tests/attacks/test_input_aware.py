"""Input-Aware (IAB): the official networks' shapes, the mask pre-training's density, sample-specific
and reproducible triggers, cross samples with another image's trigger, and the poisoned labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poisonflow import kinds
from poisonflow.attacks import PoisonContext
from poisonflow.attacks import input_aware as ia
from poisonflow.errors import ConfigError
from poisonflow.stages.poison import poison
from poisonflow.stages.trigger import TriggerContext

SIZE = 16
TINY = {"kind": "input-aware", "model": {"arch": "convnet", "width": 4}, "channel_init": 4, "steps": 2,
        "mask_epochs": 12, "mask_optimizer": {"milestones": [8]}, "epochs": 2, "batch_size": 16}


def digits(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits, 8×8 upsampled to 16×16 RGB uint8 (no download)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images[start:start + n] / 16 * 255).round().astype(np.uint8)
    images = np.repeat(np.repeat(images, 2, 1), 2, 2)[..., None].repeat(3, -1)
    return images, data.target[start:start + n].astype(np.int64)


def as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def train(tmp_path, seed: int = 0, n: int = 48) -> dict:
    images, labels = digits(n)
    spec = kinds.generator_settings("input-aware", {**TINY, "seed": seed})
    context = TriggerContext(images, labels, [str(c) for c in range(10)], None, "cpu", seed, tmp_path,
                             "generators.iab")
    return ia.train_generator(spec, context)


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> dict:
    return train(tmp_path_factory.mktemp("iab"))


@pytest.fixture(scope="module")
def trigger(generator) -> ia.InputAwareTrigger:
    entry = {"kind": "input-aware", "generator": "iab", "trigger": {"noise_ratio": 1.0},
             "generator_entry": kinds.generator_settings("input-aware", TINY)}
    context = PoisonContext(np.zeros((1, SIZE, SIZE, 3), np.uint8), np.zeros(1, np.int64), [], generator=generator)
    return ia.build(entry, SIZE, 0, context)


@pytest.mark.parametrize("size, channel_init, steps", [(16, 16, 2), (32, 32, 3), (16, 4, 3)])
def test_pattern_and_mask_networks_have_the_official_shapes(size, channel_init, steps):
    x = torch.rand(2, 3, size, size)
    for out_channels in (3, 1):
        network = ia.Generator(out_channels, channel_init, steps).eval()
        with torch.no_grad():
            y = network(x)
        assert y.shape == (2, out_channels, size, size) and 0 <= y.min() and y.max() <= 1
    with pytest.raises(ValueError, match="divisible"):
        ia.Generator(3, channel_init, steps)(torch.rand(1, 3, size + 2, size + 2))


def test_cifar_networks_follow_the_official_channel_plan():
    network = ia.Generator(3, 32, 3)
    convs = [(name.split(".")[0], tuple(module.weight.shape[:2])) for name, module in network.named_modules()
             if isinstance(module, torch.nn.Conv2d)]
    assert convs == [
        ("convblock_down_0", (32, 3)), ("convblock_down_1", (32, 32)), ("convblock_down_2", (64, 32)),
        ("convblock_down_3", (64, 64)), ("convblock_down_4", (128, 64)), ("convblock_down_5", (128, 128)),
        ("convblock_middle", (128, 128)), ("convblock_up_0", (128, 128)), ("convblock_up_1", (64, 128)),
        ("convblock_up_2", (64, 64)), ("convblock_up_3", (32, 64)), ("convblock_up_4", (32, 32)),
        ("convblock_up_5", (3, 32))]
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.eps == 1e-5 and m.momentum == 0.05 for m in norms)
    assert isinstance(network.convblock_up_5.relu, torch.nn.Identity)  # the last block has no ReLU
    assert isinstance(network.upsample_0, torch.nn.Upsample) and network.upsample_0.mode == "bilinear"
    mnist = ia.Generator(1, 16, 2)
    assert mnist.convblock_middle.conv2d.weight.shape[:2] == (32, 32)
    assert mnist.convblock_up_1.conv2d.weight.shape[:2] == (16, 32)
    assert mnist.convblock_up_3.conv2d.weight.shape[:2] == (1, 16)


def test_mask_pretraining_brings_the_thresholded_mask_to_its_density():
    images, labels = digits(256)
    held_out = as_float(digits(128, start=1500)[0])
    spec = kinds.generator_settings("input-aware", {
        "kind": "input-aware", "channel_init": 4, "steps": 2, "mask_epochs": 12, "batch_size": 32, "augment": [],
        "rotation": 0, "mask_optimizer": {"milestones": [8]}})
    untrained = ia.build_network(1, 4, 2, 0).eval()
    mask = ia.train_mask(spec, images, labels, seed=0)
    with torch.no_grad():
        before, after = ia.threshold(untrained(held_out)), ia.threshold(mask(held_out))
    assert 0 <= after.min() and after.max() <= 1
    assert float(before.mean()) > 0.2  # untrained: about half the pixels
    assert 0.016 < float(after.mean()) < 0.064, float(after.mean())  # mask_density 0.032
    assert not any(p.requires_grad for p in mask.parameters()) and not mask.training  # frozen


def test_triggers_are_sample_specific_and_reproducible(generator, trigger, tmp_path):
    again = train(tmp_path / "again")
    assert generator.keys() == again.keys()
    assert {name.split(".")[0] for name in generator} == {"pattern", "mask"}
    for name in generator:
        torch.testing.assert_close(generator[name], again[name], msg=name)
    # both networks were trained: neither equals its seeded initialisation
    for prefix, out_channels, seed in (("mask", 1, 0), ("pattern", 3, 1)):
        initial = ia.build_network(out_channels, 4, 2, seed).state_dict()
        assert not torch.equal(generator[f"{prefix}.convblock_down_0.conv2d.weight"],
                               initial["convblock_down_0.conv2d.weight"]), prefix

    x = as_float(digits(6, start=1000)[0])
    patterns, masks = trigger.patterns_and_masks(x)
    assert 0 <= masks.min() and masks.max() <= 1
    triggered = trigger.apply(x)
    torch.testing.assert_close(triggered, ia.stamp(x, patterns, masks).clamp(0, 1))
    torch.testing.assert_close(trigger.apply(x), triggered)  # deterministic (eval mode)
    residual = (triggered - x).flatten(1)
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            # after two tiny epochs the patterns differ by ~1e-3 and the exact size varies by CPU
            assert float((patterns[i] - patterns[j]).abs().max()) > 1e-5, (i, j)
            assert not torch.equal(masks[i], masks[j]), (i, j)
            assert not torch.allclose(residual[i], residual[j], atol=1e-3), (i, j)


def test_cross_samples_carry_the_pattern_and_mask_of_another_image(trigger):
    x = as_float(digits(7, start=1200)[0])
    patterns, masks = trigger.patterns_and_masks(x)
    crossed = trigger.noise(x, torch.Generator().manual_seed(5))
    donor = ia.derangement(len(x), torch.Generator().manual_seed(5))
    assert (donor != torch.arange(len(x))).all() and sorted(donor.tolist()) == list(range(len(x)))
    torch.testing.assert_close(crossed, ia.stamp(x, patterns[donor], masks[donor]).clamp(0, 1))
    own = trigger.apply(x)
    assert all(not torch.allclose(crossed[i], own[i]) for i in range(len(x)))
    torch.testing.assert_close(trigger.noise(x, torch.Generator().manual_seed(5)), crossed)
    torch.testing.assert_close(trigger.noise(x[:1], torch.Generator()), x[:1])  # no other image: unchanged
    for n in (2, 3, 10):
        assert (ia.derangement(n, torch.Generator().manual_seed(n)) != torch.arange(n)).all()


def test_poisoning_relabels_the_poisoned_samples_only_and_keeps_cross_labels(trigger, generator):
    images, labels = digits(100, start=200)
    test_images, test_labels = digits(30, start=1300)
    entry = kinds.settings_for(ia.__name__, {"kind": "input-aware", "generator": "iab", "target": 3, "rate": 0.1,
                                             "trigger": {"noise_ratio": 1.0}})
    context = PoisonContext(images, labels, [str(c) for c in range(10)], generator=generator)
    arrays = poison(entry, 0, images, labels, test_images, test_labels, 10, context=context)
    poisoned, noise = arrays["train/poisoned"], arrays["train/noise_mode"]
    assert poisoned.sum() == 10 and noise.sum() == 10 and not (poisoned & noise).any()
    assert (arrays["train/labels"][poisoned] == 3).all() and (labels[poisoned] != 3).all()
    np.testing.assert_array_equal(arrays["train/labels"][~poisoned], labels[~poisoned])  # cross samples keep theirs
    changed = np.any(arrays["train/images"] != images, axis=(1, 2, 3))
    assert changed[poisoned].all() and changed[noise].all() and not changed[~poisoned & ~noise].any()
    expected = trigger.apply(as_float(images[poisoned])).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(arrays["train/images"][poisoned], expected.numpy())
    assert (arrays["test/labels"] == 3).all() and (arrays["test/true_labels"] != 3).all()
    none = kinds.settings_for(ia.__name__, {**entry, "trigger": {"noise_ratio": 0}})
    assert not poison(none, 0, images, labels, test_images, test_labels, 10, context=context)["train/noise_mode"].any()


def test_build_needs_the_trained_networks_and_checks_their_architecture(generator):
    entry = {"kind": "input-aware", "generator": "iab"}
    with pytest.raises(ConfigError, match="generators entry of kind input-aware"):
        ia.build(entry, SIZE, 0, PoisonContext(np.zeros((1, SIZE, SIZE, 3), np.uint8), np.zeros(1), []))
    context = PoisonContext(np.zeros((1, SIZE, SIZE, 3), np.uint8), np.zeros(1), [], generator=generator)
    wrong = {**entry, "generator_entry": kinds.generator_settings("input-aware", {**TINY, "channel_init": 8})}
    with pytest.raises(ValueError, match="channel_init 8"):
        ia.build(wrong, SIZE, 0, context)
    built = ia.build(entry, SIZE, 0, context)  # without the entry: the architecture read from the weights
    assert (built.pattern.convblock_down_0.conv2d.out_channels, built.pattern.steps) == (4, 2)


def test_joint_module_exposes_the_classifier_to_the_trainer_and_keeps_the_pattern_optimizer():
    from poisonflow.models import build_model

    classifier = build_model({"arch": "convnet", "width": 4}, 10, SIZE, seed=0)
    pattern = ia.build_network(3, 4, 2, 1)
    settings = {"lr": 0.01, "betas": [0.5, 0.9], "milestones": [2], "gamma": 0.1}
    joint = ia.JointModule(classifier, pattern, settings)
    assert [id(p) for p in joint.parameters()] == [id(p) for p in classifier.parameters()]
    assert joint.pattern_optimizer.param_groups[0]["betas"] == (0.5, 0.9)
    pattern(torch.rand(2, 3, SIZE, SIZE)).mean().backward()
    joint.step_pattern(epoch=2)  # past the milestone
    assert joint.pattern_optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    assert all(p.grad is None for p in pattern.parameters())  # zeroed after the step
    state = joint.state_dict()
    other = ia.JointModule(build_model({"arch": "convnet", "width": 4}, 10, SIZE, seed=0),
                           ia.build_network(3, 4, 2, 1), settings)
    other.load_state_dict(state)  # the Adam state travels with the weights (the trainer's checkpoint)
    assert other.pattern_optimizer.state_dict()["state"].keys() == joint.pattern_optimizer.state_dict()["state"].keys()


def test_a_batch_without_backdoor_samples_has_a_finite_loss():
    from poisonflow.augment import MixedBatch
    from poisonflow.models import build_model
    from poisonflow.trainer import RuntimeSettings, StepContext

    images, labels = digits(32)
    spec = kinds.generator_settings("input-aware", {**TINY, "augment": [], "rotation": 0})
    mask = ia.build_network(1, 4, 2, 0).eval()
    joint = ia.JointModule(build_model({"arch": "convnet", "width": 4}, 10, SIZE, seed=0),
                           ia.build_network(3, 4, 2, 1), spec["pattern_optimizer"])
    objective = ia.joint_objective(spec, ia.SecondBatches(images, spec), mask)
    ctx = StepContext({}, RuntimeSettings(False, False, False, True), torch.Generator().manual_seed(0),
                      torch.device("cpu"))
    for rows in (5, 16):  # int(0.1 · 5) = 0 backdoor samples; int(0.1 · 16) = 1
        batch = MixedBatch(as_float(images[:rows]), torch.as_tensor(labels[:rows]))
        output = objective.loss(joint, batch, ctx)
        assert output.loss.shape == (rows,) and torch.isfinite(output.loss).all()
