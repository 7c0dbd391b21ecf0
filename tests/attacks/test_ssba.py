"""ISSBA (``ssba``): the StegaStamp encoder/decoder's shapes, a short training that hides the secret
recoverably under a small residual, sample-specific and reproducible triggers, and poisoning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poisonflow import kinds
from poisonflow.attacks import PoisonContext, ssba
from poisonflow.errors import ConfigError
from poisonflow.stages.poison import poison
from poisonflow.stages.trigger import TriggerContext

# A short training that reaches the secret within ~40 s on one CPU core: fewer bits, a larger
# learning rate and more secret-only epochs than the defaults (which are sized for CIFAR-10's
# 1,563 steps per epoch; 320 images give 20), and a heavier residual weight to shrink δ quickly.
SHORT = {"secret_size": 8, "batch_size": 16, "lr": 3e-4, "epochs": 20, "secret_only_epochs": 7,
         "residual_weight": 10.0, "seed": 0}
TRAIN_IMAGES = 320


def digits(size: int = 16):
    from poisonflow.data import digits as source

    return source.load(kinds.settings_for("poisonflow.data.digits", {"image_size": size}))


def as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def train(images, labels, spec: dict, workdir) -> dict:
    entry = kinds.generator_settings("ssba", spec)
    context = TriggerContext(images, labels, [str(c) for c in range(10)], None, "cpu", int(entry["seed"]),
                             workdir, "generators.ssba")
    return ssba.train_generator(entry, context)


@pytest.mark.parametrize("size", [16, 32])
def test_encoder_and_decoder_shapes(size):
    model = ssba.build_stegastamp(20, size, seed=0)
    x, secret = torch.rand(3, 3, size, size), torch.randint(0, 2, (3, 20)).float()
    residual, logits = model(x, secret)
    assert residual.shape == (3, 3, size, size) and logits.shape == (3, 20)
    assert model.decoder.head[0].in_features == 128 * ((size + 31) // 32) ** 2  # ceil(H/32), not H//32
    assert model.decoder.stn_dense[0].in_features == 128 * (size // 8) ** 2
    one = ssba.encode(model.encoder, x, secret[0])  # one secret for every image
    assert one.shape == x.shape and one.min() >= 0 and one.max() <= 1
    # the spatial transformer starts as the identity warp
    assert torch.count_nonzero(model.decoder.theta_weight) == 0
    torch.testing.assert_close(model.decoder.theta_bias.detach(), torch.tensor([1.0, 0, 0, 0, 1, 0]))


def test_a_side_not_divisible_by_16_is_refused():
    with pytest.raises(ConfigError, match="divisible by 16"):
        ssba.build_stegastamp(20, 24, seed=0)


def test_initialisation_is_seeded_and_selectable():
    first, again = ssba.build_stegastamp(20, 16, seed=3), ssba.build_stegastamp(20, 16, seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(first.encoder.conv1[0].weight, ssba.build_stegastamp(20, 16, seed=4).encoder.conv1[0].weight)
    assert torch.count_nonzero(first.encoder.conv1[0].bias) == 0  # the official StegaStamp's zero biases
    torch_default = ssba.build_stegastamp(20, 16, seed=3, init="pytorch")
    assert torch.count_nonzero(torch_default.encoder.conv1[0].bias) > 0


@pytest.fixture(scope="module")
def short_training(tmp_path_factory):
    data = digits(16)
    generator = train(data.train_images[:TRAIN_IMAGES], data.train_labels[:TRAIN_IMAGES], SHORT,
                      tmp_path_factory.mktemp("ssba") / "work")
    return data, generator


def test_the_decoder_recovers_the_secret_from_encoded_images_under_a_small_residual(short_training):
    data, generator = short_training
    encoder, decoder = ssba.load_encoder(generator), ssba.load_decoder(generator)
    secret = generator["secret"]
    assert secret.shape == (SHORT["secret_size"],) and set(secret.tolist()) <= {0.0, 1.0}
    x = as_float(data.test_images)  # images the pair never saw
    encoded = ssba.encode(encoder, x, secret)
    stored = (encoded * 255).round() / 255  # what the poison stage writes
    accuracy = ssba.bit_accuracy(decoder, stored, secret)
    clean = ssba.bit_accuracy(decoder, x, secret)
    mean_abs = float((stored - x).abs().mean()) * 255
    print(f"ssba short training: bit accuracy {accuracy:.3f} (clean images {clean:.3f}), "
          f"mean |δ| {mean_abs:.2f}/255, max {float((stored - x).abs().max()) * 255:.0f}/255")
    assert accuracy > 0.9
    assert clean < 0.8  # the secret is in the residual, not read off any image
    assert 0.5 < mean_abs < 16


def test_triggers_are_sample_specific(short_training):
    data, generator = short_training
    encoder = ssba.load_encoder(generator)
    x = as_float(data.test_images[:64])
    residual = ssba.encode(encoder, x, generator["secret"]) - x
    magnitude = float(residual.abs().mean())
    # the same secret gives each image its own residual: not one pattern added to every image
    differences = (residual[:, None] - residual[None]).abs().mean(dim=(2, 3, 4))
    off_diagonal = differences[~torch.eye(len(x), dtype=torch.bool)]
    assert float(off_diagonal.min()) > 0.1 * magnitude
    assert float(off_diagonal.mean()) > 0.5 * magnitude
    # and another secret gives the same image another residual
    other = 1 - generator["secret"]
    assert float((ssba.encode(encoder, x, other) - x - residual).abs().mean()) > 0.1 * magnitude


def test_training_is_reproducible_for_a_seed_and_differs_across_seeds(tmp_path):
    data = digits(16)
    images, labels = data.train_images[:48], data.train_labels[:48]
    tiny = {"epochs": 2, "secret_only_epochs": 1, "batch_size": 16}
    first = train(images, labels, {**tiny, "seed": 1}, tmp_path / "a")
    again = train(images, labels, {**tiny, "seed": 1}, tmp_path / "b")
    assert first.keys() == again.keys()
    for name in first:
        torch.testing.assert_close(first[name], again[name], msg=name)
    assert {name.split(".")[0] for name in first} == {"encoder", "decoder", "secret"}
    other = train(images, labels, {**tiny, "seed": 2}, tmp_path / "c")
    assert not torch.equal(first["encoder.conv1.0.weight"], other["encoder.conv1.0.weight"])
    torch.testing.assert_close(first["secret"], ssba.fixed_secret(20, 1))
    history = (tmp_path / "a" / ssba.SECRET_HISTORY).read_text().splitlines()
    assert history[0].split(",") == list(ssba.SECRET_HISTORY_COLUMNS) and len(history) == 3
    assert (tmp_path / "a" / "history.csv").is_file()


def test_poisoning_encodes_the_chosen_and_the_asr_images(short_training):
    data, generator = short_training
    images, labels = data.train_images[:200], data.train_labels[:200]
    test_images, test_labels = data.test_images[:60], data.test_labels[:60]
    generator_entry = kinds.generator_settings("ssba", SHORT)
    entry = kinds.settings_for("poisonflow.attacks.ssba", {"kind": "ssba", "generator": "g", "target": 0,
                                                          "rate": 0.1})
    entry["generator_entry"] = generator_entry
    context = PoisonContext(images, labels, [str(c) for c in range(10)], generator=generator)
    arrays = poison(entry, 0, images, labels, test_images, test_labels, 10, context=context)
    chosen = arrays["train/poisoned"]
    assert chosen.sum() == 20 and (arrays["train/labels"][chosen] == 0).all()
    assert (labels[chosen] != 0).all()
    assert np.array_equal(arrays["train/images"][~chosen], images[~chosen])
    decoder = ssba.load_decoder(generator)
    assert ssba.bit_accuracy(decoder, as_float(arrays["train/images"][chosen]), generator["secret"]) > 0.9
    assert ssba.bit_accuracy(decoder, as_float(arrays["test/images"]), generator["secret"]) > 0.9
    assert len(arrays["test/images"]) == int((test_labels != 0).sum())
    with pytest.raises(ValueError, match="8-bit"):  # the entry's secret size must be the trained one's
        ssba.build({**entry, "generator_entry": kinds.generator_settings("ssba", {})}, 16, 0, context)
    with pytest.raises(ValueError, match="16-px"):
        ssba.build(entry, 32, 0, context)
    with pytest.raises(ConfigError, match="generators entry of kind ssba"):
        ssba.build(entry, 16, 0, PoisonContext(images, labels, []))
