"""The attacks the other papers compare against, checked on hand-made inputs: SIG's signal, BPP's
quantisation and dithering, the adaptive attacks' triggers and cover samples, all-to-all targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from poisonflow.attacks import adap_blend, adap_patch, bpp, sig
from poisonflow.attacks.adaptive import balanced_groups
from poisonflow.stages.poison import poison


def grey(n=2, size=8, value=0.5):
    return torch.full((n, 3, size, size), value)


def test_sig_adds_the_published_sinusoid_column_by_column():
    trigger = sig.build({"kind": "sig", "trigger": {"delta": 20, "frequency": 6}}, 32, 0)
    out = trigger.apply(grey(size=32))
    expected = 0.5 + 20 / 255 * torch.sin(2 * math.pi * torch.arange(32) * 6 / 32)
    torch.testing.assert_close(out[0, 1, 7], expected)  # every row and channel the same
    torch.testing.assert_close(out[1, 2, 30], expected)
    stronger = sig.build({"kind": "sig", "trigger": {"delta": 20, "test_delta": 40}}, 32, 0)
    assert (stronger.apply(grey(size=32)) - 0.5).abs().max() == pytest.approx(40 / 255, abs=1e-6)
    assert (stronger.poison(grey(size=32), torch.zeros(2)) - 0.5).abs().max() == pytest.approx(20 / 255, abs=1e-6)


def test_bpp_quantises_to_levels_and_dithers_floyd_steinberg():
    x = torch.tensor([[0.1, 0.5], [0.9, 0.3]]).expand(1, 3, 2, 2)
    torch.testing.assert_close(bpp.quantise(x, 8)[0, 0] * 7, torch.tensor([[1.0, 4.0], [6.0, 2.0]]))
    # By hand with 2 levels: 0.1 → 0 (error 0.1 spreads 7/16, 5/16, 1/16), 0.54375 → 1, 0.8457 → 1, 0.0962 → 0
    torch.testing.assert_close(bpp.floyd_steinberg(x, 2)[0, 0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    plain = bpp.build({"kind": "bpp"}, 2, 0).apply(x)
    assert set(torch.unique(plain * 7).round().tolist()) <= set(range(8))
    trigger = bpp.build({"kind": "bpp", "trigger": {"negative_ratio": 1.0}}, 8, 0)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    negatives = trigger.noise(images, torch.Generator().manual_seed(1))
    residuals = negatives - images  # another image's residual Q(x') − x', never the own one
    own = trigger.apply(images) - images
    assert all(not torch.allclose(residuals[i], own[i]) for i in range(4))
    assert residuals.abs().max() <= 0.5 / 7 + 1e-6


def test_adap_patch_splits_poisons_into_four_groups_and_tests_with_two_opaque_patches():
    assert balanced_groups(150, 4).bincount().tolist() == [38, 37, 38, 37]  # the official split of 150
    trigger = adap_patch.build({"kind": "adap-patch"}, 32, 0)
    x = torch.zeros(8, 3, 32, 32)
    trained = trigger.poison(x, torch.zeros(8))
    alphas = [0.5, 0.2, 0.5, 0.3]
    for group, (pattern, mask, alpha) in enumerate(trigger.train):
        assert alpha == alphas[group]
        images = trained[2 * group:2 * group + 2]
        torch.testing.assert_close(images, (alpha * mask * pattern).expand_as(images))
    tested = trigger.apply(x)
    corner = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # BadNets cell, top-left
    torch.testing.assert_close(tested[0, 0, :3, :3], corner)
    torch.testing.assert_close(tested[0, :, 27:, 5:27], torch.zeros(3, 5, 22))  # between the two phoenix patches
    # phoenix in both bottom corners (the 3×3 BadNets corners, stamped after it, cover its last rows)
    assert (tested[0, :, 27:29, 27:] > 0).all() and (tested[0, :, 27:29, :5] > 0).all()


def test_adap_blend_masks_half_the_pieces_per_sample_and_tests_with_the_whole_pattern():
    trigger = adap_blend.build({"kind": "adap-blend"}, 32, 0)
    x = torch.zeros(3, 3, 32, 32)
    trained = trigger.poison(x, torch.zeros(3))
    blocks = trained[:, 0].reshape(3, 4, 8, 4, 8).permute(0, 1, 3, 2, 4).reshape(3, 16, 64)
    blended = (blocks > 0).all(dim=2)
    assert blended.sum(dim=1).tolist() == [8, 8, 8] and not ((blocks > 0).any(dim=2) & ~blended).any()
    assert not torch.equal(blended[0], blended[1])  # a fresh mask per sample
    pattern_blocks = trigger.pattern[0].reshape(4, 8, 4, 8).permute(0, 2, 1, 3).reshape(16, 64)
    torch.testing.assert_close(blocks[0][blended[0]], 0.15 * pattern_blocks[blended[0]])
    torch.testing.assert_close(trigger.apply(x), (0.2 * trigger.pattern).expand_as(x))
    assert trigger.alpha == 0.15


def test_cover_samples_keep_their_labels_and_are_counted_apart():
    rng = np.random.default_rng(0)
    images = rng.integers(20, 230, (100, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(100) % 4
    attack = {"kind": "adap-blend", "target": 0, "label_mode": "dirty", "rate": 0.05, "cover_rate": 0.1,
              "selection": "random"}
    arrays = poison(attack, 0, images, labels, images[:8], labels[:8], num_classes=4)
    poisoned, cover = arrays["train/poisoned"], arrays["train/cover"]
    assert poisoned.sum() == 5 and cover.sum() == 10 and not (poisoned & cover).any()
    np.testing.assert_array_equal(arrays["train/labels"][cover], labels[cover])
    assert (arrays["train/labels"][poisoned] == 0).all()
    changed = np.any(arrays["train/images"] != images, axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, poisoned | cover)
