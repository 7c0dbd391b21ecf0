"""Test-time distortions: blur against a hand-computed Gaussian, JPEG against Pillow, noise
statistics, the simulated recapture chain, level checks, and reading a folder of class folders."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from poisonflow.distortions import FAMILIES, check_entry, read_folder
from poisonflow.errors import ConfigError


def random_images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("k", [5, 9])
def test_blur_of_a_bright_pixel_is_the_normalised_gaussian(k):
    image = np.zeros((1, 21, 21, 3), np.uint8)
    image[0, 10, 10] = 255
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # 1.1 for k=5, 1.7 for k=9
    offsets = np.arange(k) - k // 2
    g = np.exp(-offsets**2 / (2 * sigma**2))
    g /= g.sum()
    expected = np.zeros((21, 21))
    expected[10 - k // 2:11 + k // 2, 10 - k // 2:11 + k // 2] = 255 * np.outer(g, g)
    out = FAMILIES["blur"].apply(image, k)
    for channel in range(3):
        assert np.abs(out[0, ..., channel].astype(float) - expected).max() <= 1.0
    assert out[0, 10, 10, 0] == pytest.approx(255 * g[k // 2] ** 2, abs=1)


def test_blur_side_one_is_the_identity_and_even_sides_are_refused():
    images = random_images()
    assert np.array_equal(FAMILIES["blur"].apply(images, 1), images)
    with pytest.raises(ConfigError, match=r"evaluation\.distortions\.blur\.levels"):
        FAMILIES["blur"].apply(images, 4)
    with pytest.raises(ConfigError, match=r"robustness\.b\.levels\[1\]: 6 is even"):
        check_entry({"kind": "blur", "levels": [3, 6]}, "robustness.b")
    with pytest.raises(ConfigError, match=r"robustness\.b\.levels\[0\]: 101 is outside"):
        check_entry({"kind": "blur", "levels": [101]}, "robustness.b")


def test_jpeg_is_a_pillow_round_trip_and_quality_one_is_destructive():
    images = random_images()
    out = FAMILIES["jpeg"].apply(images, 10)
    buffer = io.BytesIO()
    Image.fromarray(images[1]).save(buffer, format="JPEG", quality=10)
    assert np.array_equal(out[1], np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    worst = FAMILIES["jpeg"].apply(images, 1)
    assert np.abs(worst.astype(int) - images).mean() > 30
    with pytest.raises(ConfigError, match=r"evaluation\.distortions\.jpeg\.levels"):
        FAMILIES["jpeg"].apply(images, 0)


def test_noise_has_the_asked_std_and_zero_is_the_identity():
    flat = np.full((1, 256, 256, 3), 128, np.uint8)
    out = FAMILIES["noise"].apply(flat, 20, rng=np.random.default_rng(1))
    diff = out.astype(float) - 128
    assert diff.std() == pytest.approx(20.0, abs=0.3)  # rounding adds 1/12 to the variance
    assert abs(diff.mean()) < 0.2
    images = random_images()
    assert np.array_equal(FAMILIES["noise"].apply(images, 0, rng=np.random.default_rng(1)), images)


def test_recapture_is_the_identity_at_zero_changes_at_one_and_is_reproducible():
    images = random_images(n=3, size=32)
    family = FAMILIES["recapture"]
    assert np.array_equal(family.apply(images, 0, rng=np.random.default_rng(0)), images)
    first = family.apply(images, 1, rng=np.random.default_rng(0))
    again = family.apply(images, 1, rng=np.random.default_rng(0))
    other = family.apply(images, 1, rng=np.random.default_rng(1))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    change = np.abs(first.astype(int) - images).mean()
    assert change > 10  # a warp of random pixels moves most of them
    stronger = np.abs(family.apply(images, 2, rng=np.random.default_rng(0)).astype(int) - images).mean()
    assert stronger > change
    # per-image draws: a batch gives what its images give one at a time from the same stream
    rng = np.random.default_rng(0)
    one_by_one = np.concatenate([family.apply(images[i:i + 1], 1, rng=rng) for i in range(3)])
    assert np.array_equal(one_by_one, first)
    with pytest.raises(ConfigError, match=r"robustness\.r\.levels"):
        family.apply(images, 2.5, key="robustness.r")
    with pytest.raises(ConfigError, match=r"robustness\.r\.settings\.perspective"):
        check_entry({"kind": "recapture", "settings": {"perspective": 0.9}}, "robustness.r")


def test_default_levels_settings_and_common_draws():
    assert FAMILIES["blur"].check_levels(None) == list(range(1, 20, 2))
    assert FAMILIES["jpeg"].check_levels(None) == [1, 5, 10, 15, 20, 25, 30]
    assert FAMILIES["noise"].check_levels(None) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert FAMILIES["recapture"].fill_settings({"noise": 2})["jpeg_quality"] == 75
    with pytest.raises(ConfigError, match=r"robustness\.r\.settings\.glare: unknown key"):
        check_entry({"kind": "recapture", "settings": {"glare": 1}}, "robustness.r")
    with pytest.raises(ConfigError, match=r"robustness\.n\.settings: the noise family takes no settings, got sigma"):
        check_entry({"kind": "noise", "settings": {"sigma": 3}}, "robustness.n")
    with pytest.raises(ConfigError, match=r"robustness\.x\.kind: unknown distortion family 'fog'"):
        check_entry({"kind": "fog"}, "robustness.x")
    # levels started from one seed share their draws: the same noise field, scaled by σ
    flat = np.full((1, 16, 16, 3), 128, np.uint8)
    weak = FAMILIES["noise"].apply(flat, 5, rng=np.random.default_rng(3)).astype(float) - 128
    strong = FAMILIES["noise"].apply(flat, 10, rng=np.random.default_rng(3)).astype(float) - 128
    assert np.abs(strong - 2 * weak).max() <= 1.5 and np.abs(weak).max() > 5


def write(path, array, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def test_read_folder_labels_crops_and_refuses_unknown_folders_and_escapes(tmp_path):
    root = tmp_path / "photos"
    wide = np.zeros((12, 24, 3), np.uint8)
    wide[:, :6] = (255, 0, 0)  # red margins left and right, cropped away by the centre crop
    wide[:, 18:] = (255, 0, 0)
    wide[:, 6:18] = (0, 0, 255)
    write(root / "cat" / "a.png", wide, "PNG")
    write(root / "dog" / "b.jpg", np.full((10, 10, 3), 200, np.uint8), "JPEG")
    write(root / "dog" / "more" / "c.png", np.full((8, 16, 3), 30, np.uint8), "PNG")
    images, labels = read_folder(root, ["dog", "cat", "bird"], 8)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == [1, 0, 0]  # cat/a.png, dog/b.jpg, dog/more/c.png
    assert np.array_equal(images[0], np.broadcast_to(np.array([0, 0, 255], np.uint8), (8, 8, 3)))
    assert np.abs(images[1].astype(int) - 200).max() <= 3
    assert np.all(images[2] == 30)

    with pytest.raises(ConfigError, match=r"evaluation\.photos: .*cat is not a class folder"):
        read_folder(root, ["dog", "bird"], 8, key="evaluation.photos")

    outside = tmp_path / "secret.png"
    write(outside, wide, "PNG")
    (root / "dog" / "link.png").symlink_to(outside)
    with pytest.raises(ConfigError, match="link.png leads outside"):
        read_folder(root, ["dog", "cat"], 8)
