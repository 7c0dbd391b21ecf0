"""Every architecture: one SGD step on CPU, the Classifier interface (feature map, pooled features,
channel mask), stems, published channel counts, and per-sample gradient norms."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from poisonflow import models
from poisonflow.architectures import ARCHITECTURES
from poisonflow.errors import ConfigError
from poisonflow.models import PreActBlock, build_model
from poisonflow.scores import per_sample_grad_norms, per_sample_grad_norms_loop

torch.set_num_threads(1)

WIDTH = 8
NUM_CLASSES = 5
# arch → (channels, side) of the last feature map at width 8 for 32-px images (CIFAR stem).
FEATURE_MAPS_32PX = {
    "convnet": (32, 8),
    "resnet18": (64, 4),
    "resnet34": (64, 4),
    "preact_resnet18": (64, 4),
    "vgg16": (64, 1),
    "vgg19": (64, 1),
    "mobilenetv2": (1280, 4),  # the last layer keeps 1280 channels below width 64, as published
    "densenet121": (128, 4),  # 8 + 6·4 → 16 + 12·4 → 32 + 24·4 → 64 + 16·4 (growth rate 4)
}
WITH_STEM = ["resnet18", "resnet34", "preact_resnet18", "mobilenetv2", "densenet121"]


def batch(size: int, n: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=generator),
            torch.arange(n) % NUM_CLASSES)


def test_registry_lists_every_architecture():
    assert set(ARCHITECTURES.names()) == set(FEATURE_MAPS_32PX)


def sgd_step_shapes(model, size, channels, side):
    x, y = batch(size)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        loss_after = F.cross_entropy(model(x), y)
        assert model(x).shape == (len(x), NUM_CLASSES)
        assert model.feature_map(x).shape == (len(x), channels, side, side)
        assert model.features(x).shape == (len(x), channels)
    # Every parameter takes part: it has a finite gradient, and the step moved the model as a whole.
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(before[name], p) for name, p in model.named_parameters()) > len(before) // 2
    assert float(loss_after) < float(loss.detach())  # a small step down the gradient lowers the batch loss


@pytest.mark.parametrize("arch", sorted(FEATURE_MAPS_32PX))
def test_one_sgd_step_at_32px(arch):
    channels, side = FEATURE_MAPS_32PX[arch]
    sgd_step_shapes(build_model({"arch": arch, "width": WIDTH}, NUM_CLASSES, 32, seed=0), 32, channels, side)


@pytest.mark.parametrize("arch", WITH_STEM)
def test_one_sgd_step_with_the_imagenet_stem_at_64px(arch):
    channels, _ = FEATURE_MAPS_32PX[arch]
    model = build_model({"arch": arch, "width": WIDTH, "stem": "imagenet"}, NUM_CLASSES, 64, seed=0)
    sgd_step_shapes(model, 64, channels, 2)  # total stride 32


@pytest.mark.parametrize("arch", sorted(FEATURE_MAPS_32PX))
def test_channel_mask_zeroes_channels_and_changes_logits(arch):
    model = build_model({"arch": arch, "width": WIDTH}, NUM_CLASSES, 32, seed=1)
    x, _ = batch(32, n=4, seed=2)
    with torch.no_grad():
        model.train()
        for _ in range(3):  # running statistics of real activations: at init deep nets shrink them
            model(x)
        model.eval()
        logits = model(x)
        model.channel_mask[::2] = 0.0
        masked_map = model.feature_map(x)
        masked_features = model.features(x)
        masked_logits = model(x)
    assert torch.count_nonzero(masked_map[:, ::2]) == 0 and torch.count_nonzero(masked_features[:, ::2]) == 0
    assert torch.count_nonzero(masked_map[:, 1::2]) > 0
    torch.testing.assert_close(masked_logits, masked_features @ model.fc.weight.T + model.fc.bias)
    assert (masked_logits - logits).abs().max() > 1e-4


@pytest.mark.parametrize("arch", sorted(FEATURE_MAPS_32PX))
def test_seeded_build_is_deterministic(arch):
    first = build_model({"arch": arch, "width": 4}, 3, 32, seed=7).state_dict()
    second = build_model({"arch": arch, "width": 4}, 3, 32, seed=7).state_dict()
    other = build_model({"arch": arch, "width": 4}, 3, 32, seed=8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch, reference", [
    ("resnet18", lambda: torchvision.models.resnet18()),
    ("resnet34", lambda: torchvision.models.resnet34()),
])
def test_full_width_resnets_match_torchvision(arch, reference):
    body, channels = getattr(models, arch)(width=64, image_size=224, stem="imagenet")
    network = reference()
    assert channels == network.fc.in_features == 512
    assert parameter_count(body) == parameter_count(network) - parameter_count(network.fc)


def test_full_width_densenet121_and_mobilenetv2_match_torchvision():
    body, channels = models.densenet121(width=64, image_size=224, stem="imagenet")
    network = torchvision.models.densenet121()
    assert channels == 1024 and parameter_count(body) == parameter_count(network.features)
    body, channels = models.mobilenetv2(width=64, image_size=224, stem="imagenet")
    network = torchvision.models.mobilenet_v2()
    assert channels == 1280 and parameter_count(body) == parameter_count(network.features)


@pytest.mark.parametrize("arch, convs", [("vgg16", [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]),
                                         ("vgg19", [64, 64, 128, 128] + [256] * 4 + [512] * 8)])
def test_full_width_vgg_has_the_published_layers(arch, convs):
    body, channels = getattr(models, arch)(width=64, image_size=32)
    cins = [3] + convs[:-1]
    # 3×3 conv with bias, then BatchNorm (weight and bias) per layer.
    expected = sum(cin * cout * 9 + cout + 2 * cout for cin, cout in zip(cins, convs))
    assert channels == 512 and parameter_count(body) == expected
    assert sum(isinstance(m, nn.MaxPool2d) for m in body.modules()) == 5


def test_stems():
    cifar, _ = models.resnet18(width=4, image_size=32)
    assert cifar[0].kernel_size == (3, 3) and cifar[0].stride == (1, 1)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in cifar.modules())
    imagenet, _ = models.resnet18(width=4, image_size=224)  # chosen by size: > 64 px
    assert imagenet[0].kernel_size == (7, 7) and imagenet[0].stride == (2, 2)
    assert isinstance(imagenet[3], nn.AvgPool2d) and (imagenet[3].kernel_size, imagenet[3].stride) == (3, 2)
    forced, _ = models.resnet18(width=4, image_size=224, stem="cifar")
    assert forced[0].stride == (1, 1)
    dense, _ = models.densenet121(width=4, image_size=32)
    assert dense[0].kernel_size == (3, 3) and dense[0].stride == (1, 1) and isinstance(dense[3], nn.Identity)
    mobile, _ = models.mobilenetv2(width=4, image_size=32)
    assert mobile[0][0].stride == (1, 1)
    strides = [m.stride for m in mobile.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert len(strides) == 3  # total stride 8 on CIFAR
    mobile, _ = models.mobilenetv2(width=4, image_size=224)
    assert mobile[0][0].stride == (2, 2)


@pytest.mark.parametrize("arch", sorted(FEATURE_MAPS_32PX))
def test_body_is_a_flat_sequence_of_stages(arch):
    """Stage-wise defenses (NAD) walk ``body``'s children and find stages where the resolution drops."""
    body = build_model({"arch": arch, "width": 4}, 3, 32).body.eval()
    assert isinstance(body, nn.Sequential)
    x, sides = torch.zeros(1, 3, 32, 32), []
    with torch.no_grad():
        for child in body:
            x = child(x)
            sides.append(x.shape[-1])
    assert len(set(sides)) >= 3 and len(body) >= 6


def test_preact_block_equals_its_formula():
    torch.manual_seed(0)
    block = PreActBlock(4, 4, 1)
    block.train()
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        # Batch statistics (training mode), then the identity shortcut.
        def bn(layer, value):
            return F.batch_norm(value, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)

        inner = F.conv2d(torch.relu(bn(block.bn1, x)), block.conv1.weight, padding=1)
        expected = F.conv2d(torch.relu(bn(block.bn2, inner)), block.conv2.weight, padding=1) + x
        torch.testing.assert_close(block(x), expected)
    projecting = PreActBlock(4, 8, 2)
    assert projecting(x).shape == (3, 8, 3, 3)


@pytest.mark.parametrize("arch", ["resnet34", "preact_resnet18", "vgg16", "densenet121"])
def test_batched_grad_norms_equal_the_loop(arch):
    model = build_model({"arch": arch, "width": 4}, NUM_CLASSES, 32, seed=3)
    x, y = batch(32, n=3, seed=4)
    model.train()
    with torch.no_grad():
        model(x * 1.3)  # non-trivial running statistics
    torch.testing.assert_close(per_sample_grad_norms(model, x, y), per_sample_grad_norms_loop(model, x, y),
                               rtol=1e-4, atol=0)


def test_mobilenetv2_grad_norms_name_the_depthwise_layer():
    model = build_model({"arch": "mobilenetv2", "width": 4}, NUM_CLASSES, 32, seed=0)
    x, y = batch(32, n=2)
    with pytest.raises(ValueError, match=r"body\.1\.conv\.0\.0: .*groups=1 only"):
        per_sample_grad_norms(model, x, y)


@pytest.mark.parametrize("spec, size, message", [
    ({"arch": "vgg16", "stem": "cifar"}, 32, r"^models\.stem: vgg16 has no stem to choose"),
    ({"arch": "convnet", "stem": "imagenet"}, 32, r"^models\.stem: convnet has no stem"),
    ({"arch": "resnet18", "stem": "tiny"}, 32, r"^models\.stem: unknown stem 'tiny'"),
    ({"arch": "vgg19"}, 16, r"^models\.arch: vgg19 needs image_size >= 32"),
    ({"arch": "densenet121", "stem": "imagenet"}, 16, r"^models\.arch: densenet121 needs image_size >= 32"),
    ({"arch": "vit"}, 32, r"^models\.arch: unknown architecture 'vit'"),
])
def test_bad_model_specs_name_the_key(spec, size, message):
    with pytest.raises(ConfigError, match=message):
        build_model(dict(spec, width=4), 3, size)


def test_schema_defaults_equal_the_module_defaults_and_stems_are_checked(tiny_config, validate_config, config_schema):
    raw = tiny_config
    raw["models"]["m"] = {"arch": "densenet121"}
    assert validate_config(raw)["models"]["m"] == dict(models.DEFAULTS, arch="densenet121")
    raw["models"]["m"] = {"arch": "vgg16", "stem": "cifar"}
    with pytest.raises(ConfigError, match=r"^models\.m\.stem: 'cifar' is not one of \[\]"):
        validate_config(raw)
    raw["models"]["m"] = {"arch": "mobilenetv2", "stem": "imagenet"}
    assert validate_config(raw)["models"]["m"]["stem"] == "imagenet"
    schema_text = json.dumps(config_schema)  # every registered arch is named in the schema's description
    assert all(name in schema_text for name in ARCHITECTURES.names())
