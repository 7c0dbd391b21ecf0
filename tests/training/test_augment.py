"""Batched augmentations: pixel values on hand-made images, and agreement with torchvision's transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from poisonflow import augment
from poisonflow.errors import ConfigError

torch.set_num_threads(1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_resized_crop_equals_torchvision_resized_crop():
    x = torch.rand(6, 3, 12, 10, generator=gen(1))
    boxes = augment.sample_resized_crop_boxes(6, 12, 10, (0.08, 1.0), (0.75, 4 / 3), gen(2))
    out = augment.resized_crop(x, boxes)
    x_u8 = (x * 255).round().to(torch.uint8)
    out_u8 = augment.resized_crop(x_u8, boxes)
    for i in range(6):
        top, left, height, width = boxes[i].tolist()
        reference = TF.resized_crop(x[i], top, left, height, width, [12, 10], antialias=False)
        torch.testing.assert_close(out[i], reference, atol=2e-6, rtol=0)
        # uint8: the float result rounded (as a uint8 pipeline on the GPU); exact halves may round either way
        reference_u8 = TF.resized_crop(x_u8[i].float(), top, left, height, width, [12, 10], antialias=False)
        difference = (out_u8[i].float() - reference_u8.round()).abs()
        tie = ((reference_u8 - reference_u8.floor()) - 0.5).abs() < 1e-3
        assert float(difference.max()) <= 1 and bool((difference[~tie] == 0).all())


def test_resized_crop_of_the_whole_image_is_the_identity():
    x = torch.randint(0, 256, (2, 3, 7, 9), dtype=torch.uint8, generator=gen())
    boxes = torch.tensor([[0, 0, 7, 9], [0, 0, 7, 9]])
    assert torch.equal(augment.resized_crop(x, boxes), x)


def test_resized_crop_boxes_fit_and_follow_scale_and_ratio():
    boxes = augment.sample_resized_crop_boxes(2000, 32, 32, (0.25, 0.5), (0.5, 2.0), gen(3))
    top, left, height, width = boxes.T
    assert bool(((top >= 0) & (left >= 0) & (top + height <= 32) & (left + width <= 32)).all())
    area = (height * width).float() / 1024
    # box sides are rounded to whole pixels, so area and ratio hold up to that rounding
    assert float(area.min()) > 0.25 * 0.8 and float(area.max()) < 0.5 * 1.2
    ratio = width.float() / height.float()
    assert float(ratio.min()) > 0.5 * 0.85 and float(ratio.max()) < 2.0 * 1.15
    assert 0.34 < float(area.mean()) < 0.41  # uniform area fraction in [0.25, 0.5]: mean 0.375


def test_resized_crop_falls_back_to_the_central_box():
    # an area of the whole image with an aspect ratio of at least 2 never fits a square image
    boxes = augment.sample_resized_crop_boxes(3, 10, 10, (1.0, 1.0), (2.0, 3.0), gen())
    assert boxes.tolist() == [[2, 0, 5, 10]] * 3  # height round(10 / 2), centred


def test_cutout_fills_a_square_clipped_at_the_border():
    x = torch.zeros(200, 1, 10, 10)
    out = augment.cutout(x, 4, 0.5, gen(4))
    again = torch.Generator().manual_seed(4)
    centre_y = torch.randint(0, 10, (200,), generator=again)
    centre_x = torch.randint(0, 10, (200,), generator=again)
    for i in range(200):
        rows = slice(max(int(centre_y[i]) - 2, 0), min(int(centre_y[i]) + 2, 10))
        cols = slice(max(int(centre_x[i]) - 2, 0), min(int(centre_x[i]) + 2, 10))
        expected = torch.zeros(1, 10, 10)
        expected[:, rows, cols] = 0.5
        assert torch.equal(out[i], expected)
    assert int((out == 0.5).flatten(1).sum(1).max()) == 16


def test_cutout_fill_on_uint8_is_scaled():
    out = augment.cutout(torch.zeros(1, 3, 6, 6, dtype=torch.uint8), 20, 0.5, gen())
    assert out.dtype == torch.uint8 and bool((out == 128).all())


@pytest.mark.parametrize("name, magnitude, expected", [
    ("Invert", 0.0, lambda x: 255 - x),
    ("Posterize", 4, lambda x: x & 0xF0),
    ("Solarize", 0.5, lambda x: torch.where(x >= 127.5, 255 - x, x)),
    ("Identity", 0.0, lambda x: x),
])
def test_colour_operations_on_hand_made_pixels(name, magnitude, expected):
    x = torch.arange(0, 256, 4, dtype=torch.uint8).view(1, 1, 8, 8).expand(1, 3, 8, 8).contiguous()
    assert torch.equal(augment.OPERATIONS[name](x, magnitude), expected(x))


def test_translate_moves_content_by_whole_pixels_with_black_fill():
    x = torch.arange(1, 37, dtype=torch.uint8).view(1, 1, 6, 6).expand(1, 3, 6, 6).contiguous()
    right = augment.OPERATIONS["TranslateX"](x, 2.7)  # int(2.7) = 2 pixels
    assert torch.equal(right[..., 2:], x[..., :4]) and bool((right[..., :2] == 0).all())
    up = augment.OPERATIONS["TranslateY"](x, -1.2)
    assert torch.equal(up[..., :5, :], x[..., 1:, :]) and bool((up[..., 5, :] == 0).all())


def possible_randaugment_outputs(image: torch.Tensor, magnitude: int) -> list[torch.Tensor]:
    space = augment.magnitude_space(31, image.shape[-2], image.shape[-1])
    choices = augment.randaugment_choices(augment.RANDAUGMENT_OPERATIONS, magnitude, space)
    return [augment.OPERATIONS[name](image[None], m)[0] for name, m in choices]


def test_randaugment_produces_what_torchvision_randaugment_produces():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=gen(5))
    candidates = possible_randaugment_outputs(image, 9)
    for seed in range(40):
        torch.manual_seed(seed)
        produced = v2.RandAugment(num_ops=1, magnitude=9)(image)
        assert any(torch.equal(produced, c) for c in candidates), seed
    batch = augment.randaugment(image[None].repeat(60, 1, 1, 1), gen(6), num_ops=1, magnitude=9, bins=31)
    for i in range(60):
        assert any(torch.equal(batch[i], c) for c in candidates), i
    assert len({tuple(b.flatten().tolist()) for b in batch}) >= 12  # images draw their own operations


def test_randaugment_batched_equals_per_image():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=gen(7))
    choice = torch.randint(0, 28, (16,), generator=gen(8))
    choices = augment.randaugment_choices(augment.RANDAUGMENT_OPERATIONS, 12, augment.magnitude_space(31, 8, 8))
    batched = augment.apply_per_image(images, choice, choices)
    for i in range(16):
        name, magnitude = choices[int(choice[i])]
        assert torch.equal(batched[i], augment.OPERATIONS[name](images[i:i + 1], magnitude)[0]), (i, name)


def possible_autoaugment_outputs(image: torch.Tensor, policy: str) -> list[torch.Tensor]:
    space = augment.magnitude_space(augment.AUTOAUGMENT_BINS, image.shape[-2], image.shape[-1])
    outputs = []
    for sub_policy in augment.autoaugment_policies(policy):
        firsts = [image[None]] + [augment.OPERATIONS[n](image[None], m)[0][None] for n, m in
                                  {augment.signed_operation(sub_policy[0][0], sub_policy[0][2], neg, space)
                                   for neg in (False, True)}]
        for first in firsts:
            outputs.append(first[0])
            for negative in (False, True):
                name, m = augment.signed_operation(sub_policy[1][0], sub_policy[1][2], negative, space)
                outputs.append(augment.OPERATIONS[name](first, m)[0])
    return outputs


def test_autoaugment_produces_what_torchvision_autoaugment_produces():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=gen(9))
    candidates = possible_autoaugment_outputs(image, "cifar10")
    for seed in range(30):
        torch.manual_seed(seed)
        produced = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)(image)
        assert any(torch.equal(produced, c) for c in candidates), seed
    batch = augment.autoaugment(image[None].repeat(40, 1, 1, 1), gen(10), "cifar10")
    for i in range(40):
        assert any(torch.equal(batch[i], c) for c in candidates), i


def test_beta_draws_follow_the_beta_distribution():
    g = gen(11)
    draws = np.array([augment.beta_sample(1.0, g) for _ in range(3000)])
    assert abs(draws.mean() - 0.5) < 0.02 and abs(draws.var() - 1 / 12) < 0.01  # Beta(1, 1) is uniform
    g = gen(12)
    draws = np.array([augment.beta_sample(0.2, g) for _ in range(3000)])
    assert abs(draws.var() - 0.25 * 1 / 1.4) < 0.02  # Var Beta(a, a) = 1 / (4 (2a + 1))


def two_flat_images(height=8, width=8):
    x = torch.stack([torch.zeros(3, height, width), torch.ones(3, height, width)])
    return x, torch.tensor([0, 1])


def test_mixup_blends_each_image_with_its_partner():
    x, y = two_flat_images()
    batch = augment.mixup(x, y, 1.0, gen(13))
    lam = batch.lam
    assert torch.allclose(batch.images[0], torch.full((3, 8, 8), 1 - lam))
    assert torch.allclose(batch.images[1], torch.full((3, 8, 8), lam))
    assert batch.partner_labels.tolist() == [1, 0]


def test_cutmix_pastes_a_box_and_lam_is_the_own_area():
    x, y = two_flat_images(16, 16)
    for seed in range(20):
        batch = augment.cutmix(x, y, 1.0, gen(seed))
        own_fraction = float((batch.images[0] == 0).float().mean())
        assert batch.lam == pytest.approx(own_fraction)
        assert torch.equal(batch.images[1], 1 - batch.images[0])  # the same box, filled from the partner
        pasted = (batch.images[0, 0] == 1).nonzero()
        if len(pasted):  # one axis-aligned rectangle
            rows, cols = pasted[:, 0], pasted[:, 1]
            assert len(pasted) == (int(rows.max()) - int(rows.min()) + 1) * (int(cols.max()) - int(cols.min()) + 1)


def test_mixed_cross_entropy_equals_cross_entropy_with_soft_targets():
    logits = torch.randn(5, 4, generator=gen(14))
    labels, partners = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 2, 3, 0, 0])
    batch = augment.MixedBatch(torch.zeros(5, 3, 2, 2), labels, partners, 0.3)
    soft = 0.3 * F.one_hot(labels, 4).float() + 0.7 * F.one_hot(partners, 4).float()
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(logits, soft, reduction="none", label_smoothing=smoothing)
        torch.testing.assert_close(augment.mixed_cross_entropy(logits, batch, smoothing), expected)


def test_batch_augment_converts_uint8_and_mixes_with_the_given_probability():
    x = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=gen())
    y = torch.arange(8)
    plain = augment.BatchAugment([], {})(x, y, gen())
    assert plain.images.dtype == torch.float32 and torch.equal(plain.images, x.float() / 255) and not plain.mixed
    never = augment.BatchAugment(["mixup"], {"mix_prob": 0.0})
    assert not any(never(x, y, gen(s)).mixed for s in range(10))
    both = augment.BatchAugment(["cutmix", "mixup"], {})
    g = gen(15)
    kinds = set()
    for _ in range(30):
        batch = both(x, y, g)
        # mixup changes every pixel of a non-constant batch; cutmix leaves pixels outside the box as they were
        kinds.add("cutmix" if bool((batch.images == plain.images).any()) else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_same_seed_same_augmented_batch():
    names = ["crop", "flip", "rrc", "cutout", "randaugment", "autoaugment", "cutmix"]
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=gen())
    a = augment.BatchAugment(names, {"cutout_size": 3})(x, torch.arange(16), gen(16))
    b = augment.BatchAugment(names, {"cutout_size": 3})(x, torch.arange(16), gen(16))
    c = augment.BatchAugment(names, {"cutout_size": 3})(x, torch.arange(16), gen(17))
    assert torch.equal(a.images, b.images) and a.lam == b.lam
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("names, settings, message", [
    (["blur"], {}, r"^training\.augment: unknown augmentation 'blur'"),
    (["rrc"], {"rrc_scale": [0.5, 0.2]}, r"^training\.rrc_scale: needs 0 < low <= high"),
    (["randaugment"], {"randaugment_magnitude": 31}, r"^training\.randaugment_magnitude: must be below"),
    (["autoaugment"], {"autoaugment_policy": "mnist"}, r"^training\.autoaugment_policy: unknown policy 'mnist'"),
])
def test_bad_settings_name_the_key(names, settings, message):
    with pytest.raises(ConfigError, match=message):
        augment.BatchAugment(names, settings)


def test_apply_refuses_mixing_without_labels():
    with pytest.raises(ConfigError, match=r"^training\.augment: 'mixup' mixes labels"):
        augment.apply(["mixup"], torch.zeros(1, 3, 4, 4), gen())
    out = augment.apply(["flip"], torch.arange(4.0).view(1, 1, 1, 4).repeat(50, 1, 1, 1), gen())
    assert math.isclose(float((out[:, 0, 0, 0] == 3).float().mean()), 0.5, abs_tol=0.2)
