"""Trigger steps and the badnets / blended / wanet attacks: exact pixels and formula values."""

from __future__ import annotations

import numpy as np
import pytest

from poisonflow.kinds import defaults_of, settings_for
import torch
import torch.nn.functional as F
from PIL import Image

from poisonflow import triggers
from poisonflow.attacks import ATTACKS
from poisonflow.attacks import badnets, blended, wanet
from poisonflow.errors import ConfigError

CHECKERBOARD_3 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def grey(n: int, size: int, value: float = 0.5) -> torch.Tensor:
    return torch.full((n, 3, size, size), value)


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def badnets_spec(**trigger) -> dict:
    return {"kind": "badnets", "target": 0, "label_mode": "dirty", "rate": 0.1, "trigger": trigger}


# --- BadNets --------------------------------------------------------------------------------


def test_checkerboard_3_is_the_badnets_pattern_on_every_channel():
    patch = triggers.patch_pattern("checkerboard", 3, torch.Generator())
    assert patch.shape == (3, 3, 3)
    for channel in range(3):
        assert torch.equal(patch[channel], CHECKERBOARD_3)


def test_checkerboard_other_sizes_keep_white_bottom_right_and_black_top_left():
    expected_4 = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float32)
    assert torch.equal(triggers.checkerboard_patch(4)[1], expected_4)
    expected_2 = torch.tensor([[0, 0], [0, 1]], dtype=torch.float32)
    assert torch.equal(triggers.checkerboard_patch(2)[0], expected_2)
    assert torch.equal(triggers.checkerboard_patch(1), torch.ones(3, 1, 1))


@pytest.mark.parametrize(
    "position, margin, corner",
    [
        ("top-left", 0, (0, 0)),
        ("top-right", 0, (0, 5)),
        ("bottom-left", 0, (5, 0)),
        ("bottom-right", 0, (5, 5)),
        ("top-left", 1, (1, 1)),
        ("top-right", 1, (1, 4)),
        ("bottom-left", 1, (4, 1)),
        ("bottom-right", 1, (4, 4)),
        ([2, 3], 0, (2, 3)),
    ],
)
def test_badnets_stamps_checkerboard_at_named_and_explicit_positions(position, margin, corner):
    trigger = badnets.build(badnets_spec(position=position, margin=margin), image_size=8, seed=0)
    x = random_images(4, 8)
    before = x.clone()
    out = trigger.apply(x)
    row, col = corner
    assert (trigger.row, trigger.col) == corner
    assert out.shape == x.shape and torch.equal(x, before)  # input untouched
    for channel in range(3):
        assert torch.equal(out[:, channel, row : row + 3, col : col + 3], CHECKERBOARD_3.expand(4, 3, 3))
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[row : row + 3, col : col + 3] = False
    assert torch.equal(out[:, :, outside], x[:, :, outside])
    assert int((out != x).any(dim=(0, 1)).sum()) <= 9


def test_badnets_default_is_bottom_right_3x3_checkerboard():
    out = badnets.build({"kind": "badnets"}, image_size=8, seed=0).apply(grey(1, 8))
    assert out[0, 0, 7, 7] == 1.0 and out[0, 0, 5, 5] == 0.0 and out[0, 0, 5, 6] == 0.0
    assert out[0, 0, 5, 7] == 1.0 and out[0, 0, 6, 6] == 1.0 and out[0, 0, 6, 7] == 0.0
    assert out[0, 0, 4, 4] == 0.5 and out[0, 0, 7, 4] == 0.5


def test_badnets_cifar_badnets_c_position_rows_26_29_cols_17_20():
    trigger = badnets.build(badnets_spec(position=[26, 17]), image_size=32, seed=0)
    out = trigger.apply(grey(2, 32))
    assert torch.equal(out[:, 2, 26:29, 17:20], CHECKERBOARD_3.expand(2, 3, 3))
    white = (out == 1.0).all(dim=1).all(dim=0).nonzero().tolist()
    black = (out == 0.0).all(dim=1).all(dim=0).nonzero().tolist()
    # the pattern's cells in image coordinates; everything else stays grey
    assert white == [[26, 19], [27, 18], [28, 17], [28, 19]]
    assert black == [[26, 17], [26, 18], [27, 17], [27, 19], [28, 18]]
    assert int((out == 0.5).all(dim=1).all(dim=0).sum()) == 32 * 32 - 9


@pytest.mark.parametrize("pattern, value", [("white", 1.0), ("black", 0.0)])
def test_badnets_solid_patterns(pattern, value):
    out = badnets.build(badnets_spec(pattern=pattern, size=2, position="top-left"), 6, 0).apply(grey(3, 6))
    assert torch.equal(out[:, :, 0:2, 0:2], torch.full((3, 3, 2, 2), value))
    assert torch.equal(out[:, :, 2:, :], torch.full((3, 3, 4, 6), 0.5))
    assert torch.equal(out[:, :, :, 2:], torch.full((3, 3, 6, 4), 0.5))


def test_badnets_random_patch_is_seeded_and_the_same_on_every_image():
    spec = badnets_spec(pattern="random", size=3, position="bottom-right")
    trigger = badnets.build(spec, 8, seed=5)
    expected = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(trigger.patch, expected)
    out = trigger.apply(random_images(4, 8))
    assert torch.equal(out[:, :, 5:8, 5:8], expected.expand(4, 3, 3, 3))
    assert torch.equal(badnets.build(spec, 8, seed=5).patch, trigger.patch)
    assert not torch.equal(badnets.build(spec, 8, seed=6).patch, trigger.patch)


@pytest.mark.parametrize(
    "trigger, key",
    [
        ({"size": 9}, "trigger.size"),
        ({"size": 0}, "trigger.size"),
        ({"position": [6, 0]}, "trigger.position"),
        ({"position": [0, -1]}, "trigger.position"),
        ({"position": "center"}, "trigger.position"),
        ({"position": [1, 2, 3]}, "trigger.position"),
        ({"margin": 6}, "trigger.margin"),
        ({"pattern": "stripes"}, "trigger.pattern"),
        ({"colour": "red"}, "trigger.colour"),
    ],
)
def test_badnets_bad_trigger_settings_name_the_key(trigger, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        badnets.build(badnets_spec(**trigger), image_size=8, seed=0)


def test_patch_position_explicit_corner_at_the_last_fitting_pixel():
    assert triggers.patch_position([5, 5], 3, 8, 8) == (5, 5)
    with pytest.raises(ConfigError, match=r"trigger\.position"):
        triggers.patch_position([5, 6], 3, 8, 8)


def test_trigger_refuses_images_of_another_size():
    with pytest.raises(ValueError, match="8, 8"):
        badnets.build(badnets_spec(), 8, 0).apply(grey(1, 9))


# --- Blended --------------------------------------------------------------------------------


def test_blend_formula_on_hand_made_image():
    x = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]]).expand(2, 3, 2, 2)
    pattern = torch.tensor([[[1.0, 0.0], [1.0, 0.5]]]).expand(3, 2, 2)
    out = triggers.blend(x, pattern, 0.2)
    # (1 − 0.2)·x + 0.2·pattern, pixel by pixel
    expected = torch.tensor([[0.2, 0.4], [1.0, 0.3]])
    assert torch.allclose(out, expected.expand(2, 3, 2, 2), atol=1e-7)


def write_png(path, array_u8: np.ndarray) -> str:
    Image.fromarray(array_u8).save(path)
    return str(path)


def test_blended_image_pattern_from_file(tmp_path):
    pixels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    path = write_png(tmp_path / "pattern.png", pixels)
    trigger = blended.build({"kind": "blended", "trigger": {"pattern": "image", "path": path, "alpha": 0.25}}, 2, 0)
    assert torch.equal(trigger.pattern, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    out = trigger.apply(grey(1, 2, 0.4))
    # red pixel: R = 0.75·0.4 + 0.25·1 = 0.55, G = B = 0.75·0.4 = 0.3
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.55, 0.3, 0.3]), atol=1e-7)
    assert torch.allclose(out[0, :, 1, 1], torch.tensor([0.55, 0.55, 0.55]), atol=1e-7)


def test_blended_image_is_converted_to_rgb_and_resized(tmp_path):
    path = write_png(tmp_path / "grey.png", np.full((5, 7), 51, dtype=np.uint8))  # single-channel 5×7
    trigger = blended.build({"kind": "blended", "trigger": {"pattern": "image", "path": path}}, 4, 0)
    assert torch.allclose(trigger.pattern, torch.full((3, 4, 4), 0.2), atol=1e-7)


def test_blended_noise_pattern_is_seeded_and_default_alpha_is_0_2():
    trigger = blended.build({"kind": "blended"}, 4, seed=3)
    expected = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3))
    assert trigger.alpha == 0.2 and torch.equal(trigger.pattern, expected)
    x = random_images(2, 4)
    assert torch.allclose(trigger.apply(x), 0.8 * x + 0.2 * expected, atol=1e-7)
    assert not torch.equal(blended.build({"kind": "blended"}, 4, seed=4).pattern, expected)


def test_blended_missing_image_names_trigger_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ConfigError, match=r"trigger\.path.*nope\.png"):
        blended.build({"kind": "blended", "trigger": {"pattern": "image", "path": str(missing)}}, 4, 0)
    with pytest.raises(ConfigError, match=r"trigger\.path"):
        blended.build({"kind": "blended", "trigger": {"pattern": "image"}}, 4, 0)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(ConfigError, match=r"trigger\.path"):
        blended.build({"kind": "blended", "trigger": {"pattern": "image", "path": str(not_an_image)}}, 4, 0)


@pytest.mark.parametrize("trigger, key", [({"alpha": 1.5}, "trigger.alpha"), ({"pattern": "kitty"}, "trigger.pattern")])
def test_blended_bad_settings_name_the_key(trigger, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        blended.build({"kind": "blended", "trigger": trigger}, 4, 0)


# --- WaNet ----------------------------------------------------------------------------------


def reference_wanet_grid(seed: int, k: int, height: int, s: float, grid_rescale: float) -> torch.Tensor:
    """The method notes' WaNet formulas, written out line by line."""
    generator = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise_grid = F.interpolate(ins, size=height, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=height)
    x, y = torch.meshgrid(array1d, array1d, indexing="ij")
    identity_grid = torch.stack((y, x), 2)[None, ...]
    return torch.clamp((identity_grid + s * noise_grid / height) * grid_rescale, -1, 1)


@pytest.mark.parametrize("k, s, grid_rescale, size", [(4, 0.5, 1.0, 16), (3, 1.0, 0.9, 12)])
def test_wanet_grid_and_warp_match_reference(k, s, grid_rescale, size):
    spec = {"kind": "wanet", "trigger": {"k": k, "s": s, "grid_rescale": grid_rescale}}
    trigger = wanet.build(spec, size, seed=7)
    grid = reference_wanet_grid(7, k, size, s, grid_rescale)
    assert trigger.grid.shape == (1, size, size, 2)
    assert torch.allclose(trigger.grid, grid, atol=1e-7)
    x = random_images(3, size)
    expected = F.grid_sample(x, grid.repeat(3, 1, 1, 1), mode="bilinear", padding_mode="zeros", align_corners=True)
    out = trigger.apply(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() > 0.01  # the warp does move pixels


def test_wanet_control_grid_corners_survive_upsampling_and_mean_abs_is_one():
    generator = torch.Generator().manual_seed(1)
    control = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    control = control / control.abs().mean()
    noise_grid, identity_grid = triggers.wanet_grids(4, 10, generator)
    # align_corners=True keeps the corner control values exactly
    assert torch.allclose(noise_grid[0, 0, 0], control[0, :, 0, 0], atol=1e-6)
    assert torch.allclose(noise_grid[0, 9, 9], control[0, :, 3, 3], atol=1e-6)
    assert torch.allclose(control.abs().mean(), torch.tensor(1.0))
    # identity grid: (x = column, y = row) coordinates in [−1, 1]
    assert torch.equal(identity_grid[0, 0, 9], torch.tensor([1.0, -1.0]))
    assert torch.equal(identity_grid[0, 9, 0], torch.tensor([-1.0, 1.0]))


def test_warp_on_hand_made_grid_shifts_by_one_pixel_with_zero_padding():
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3) / 10
    _, identity = triggers.wanet_grids(2, 3, torch.Generator().manual_seed(0))
    shifted = identity.clone()
    shifted[..., 0] += 1.0  # one pixel right: 2/(W−1) = 1 in grid units for W = 3
    out = triggers.warp(x, shifted)
    expected = torch.tensor([[0.1, 0.2, 0.0], [0.4, 0.5, 0.0], [0.7, 0.8, 0.0]])
    assert torch.allclose(out[0, 0], expected, atol=1e-6)
    half = identity.clone()
    half[..., 1] += 0.5  # half a pixel down: the average of two rows
    assert torch.allclose(triggers.warp(x, half)[0, 0, 0], torch.tensor([0.15, 0.25, 0.35]), atol=1e-6)


def test_wanet_with_zero_strength_leaves_images_unchanged():
    trigger = wanet.build({"kind": "wanet", "trigger": {"s": 0}}, 16, seed=0)
    x = random_images(2, 16)
    assert torch.allclose(trigger.apply(x), x, atol=1e-5)


def test_wanet_is_deterministic_given_the_seed():
    a = wanet.build({"kind": "wanet"}, 16, seed=11)
    b = wanet.build({"kind": "wanet"}, 16, seed=11)
    c = wanet.build({"kind": "wanet"}, 16, seed=12)
    assert torch.equal(a.grid, b.grid)
    assert not torch.allclose(a.grid, c.grid)
    x = random_images(2, 16)
    assert torch.equal(a.apply(x), b.apply(x))


def test_wanet_noise_mode_grids_stay_in_bounds_and_differ_from_apply():
    trigger = wanet.build({"kind": "wanet"}, 16, seed=2)
    grids = triggers.noise_grid_for(trigger.grid, 5, torch.Generator().manual_seed(9))
    offsets = torch.rand(5, 16, 16, 2, generator=torch.Generator().manual_seed(9)) * 2 - 1
    assert torch.allclose(grids, torch.clamp(trigger.grid + offsets / 16, -1, 1), atol=1e-7)
    assert grids.min() >= -1 and grids.max() <= 1
    assert (grids - trigger.grid).abs().max() <= 1 / 16 + 1e-6
    x = random_images(5, 16)
    noisy = trigger.noise(x, torch.Generator().manual_seed(9))
    assert noisy.shape == x.shape and noisy.min() >= 0 and noisy.max() <= 1
    assert (noisy - trigger.apply(x)).abs().max() > 0.01
    same = trigger.noise(x, torch.Generator().manual_seed(9))
    assert torch.equal(noisy, same)
    assert not torch.equal(noisy, trigger.noise(x, torch.Generator().manual_seed(10)))


def test_wanet_defaults_and_bad_settings():
    assert defaults_of(wanet.__name__)["trigger"] == {"k": 4, "s": 0.5, "grid_rescale": 1.0, "noise_ratio": 2}
    assert wanet.build({"kind": "wanet"}, 8, 0).noise_ratio == 2
    for trigger, key in [({"k": 0}, "trigger.k"), ({"k": 2.5}, "trigger.k"), ({"s": -1}, "trigger.s"),
                         ({"grid_rescale": 0}, "trigger.grid_rescale"), ({"noise_ratio": -1}, "trigger.noise_ratio")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            wanet.build({"kind": "wanet", "trigger": trigger}, 8, 0)


def test_trigger_seed_key_is_left_to_the_caller():
    settings = settings_for(badnets.__name__, {"kind": "badnets", "trigger": {"seed": 4, "size": 2}})["trigger"]
    assert settings == {"pattern": "checkerboard", "size": 2, "position": "bottom-right", "margin": 0, "seed": 4}
    # the patch comes from build's seed argument, not from the key
    spec = badnets_spec(pattern="random", seed=4)
    assert torch.equal(badnets.build(spec, 8, seed=1).patch, badnets.build(badnets_spec(pattern="random"), 8, 1).patch)


# --- registry -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["badnets", "blended", "wanet"])
def test_registry_builds_each_kind_and_keeps_images_in_range(kind):
    module = ATTACKS.get(kind)
    x = random_images(3, 8)
    out = module.build({"kind": kind}, 8, 0).apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
