"""Image classifiers with a width setting, built from a config ``models:`` entry.

Every model is a :class:`Classifier`: ``body`` maps normalized images to the last convolutional
feature map, ``channel_mask`` (ones by default) multiplies that map channel-wise — fine-pruning
zeroes entries of it — and ``fc`` maps the pooled features to logits. Inputs are float images in
[0, 1]; normalization is part of the model so attacks and defenses work in pixel space.

Architectures (``arch:``): ``convnet``, ``resnet18``, ``resnet34``, ``preact_resnet18``, ``vgg16``,
``vgg19`` (with BatchNorm), ``mobilenetv2``, ``densenet121``. Where torchvision has the
architecture its classes and blocks build the body; the classifier head is always global average
pooling and one linear layer (VGG's 4096-wide fully connected head and MobileNetV2's dropout are
not used, as in the CIFAR versions of these networks). ``width`` scales every channel count:
``width / 64`` times the published counts, so 64 is the published network (``convnet``: the
first stage's channels).

``stem:`` (ResNets, PreAct-ResNet, MobileNetV2, DenseNet) picks the input stem; when absent, images
of 64 px or less get the CIFAR stem and larger ones the ImageNet stem:

- ``cifar``: the stem convolution is 3×3 with stride 1 and there is no pooling (MobileNetV2 also
  keeps its second stage at stride 1, as its CIFAR version does: total stride 8);
- ``imagenet``: the published stem. For the ResNets it is a 7×7 stride-2 convolution, BatchNorm,
  ReLU and a 3×3 stride-2 *average* pooling (the supervised setup of the GSSD appendix, B.2);
  DenseNet keeps torchvision's 7×7 convolution and max-pooling; MobileNetV2 its stride-2 3×3.

Per-sample gradient norms (:func:`poisonflow.scores.per_sample_grad_norms`) support Conv2d with
groups=1, Linear and BatchNorm2d: every architecture here except ``mobilenetv2``, whose depthwise
convolutions have groups > 1 (use the per-sample loop or another surrogate for gradient-norm
selection).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from .architectures import ARCHITECTURES
from .errors import ConfigError

FULL_WIDTH = 64
STEMS = ("cifar", "imagenet")
LARGEST_CIFAR_STEM_IMAGE = 64
DEFAULTS = {"width": FULL_WIDTH}


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, channels: int, num_classes: int, mean, std):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(channels, num_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("channel_mask", torch.ones(channels))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map, after the channel mask."""
        return self.body((x - self.mean) / self.std) * self.channel_mask.view(1, -1, 1, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled) features."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------

def resolve_stem(stem: str | None, image_size: int) -> str:
    """The stem to build: the configured one, or by image size when none is configured."""
    if stem is None:
        return "cifar" if image_size <= LARGEST_CIFAR_STEM_IMAGE else "imagenet"
    return stem


def no_stem_choice(arch: str, stem: str | None) -> None:
    """Architectures without a separate stem accept no ``stem``: it would be silently ignored."""
    if stem is not None:
        raise ConfigError(f"models.stem: {arch} has no stem to choose; remove stem")


def require_image_size(arch: str, image_size: int, minimum: int, why: str) -> None:
    if image_size < minimum:
        raise ConfigError(f"models.arch: {arch} needs image_size >= {minimum} ({why}); got {image_size}")


def scaled(channels: int, width: int) -> int:
    """A published channel count scaled by ``width / 64`` (at least 1)."""
    return max(1, channels * width // FULL_WIDTH)


def init_convs(module: nn.Module) -> None:
    """He initialisation of every convolution (fan-out, ReLU), BatchNorm at identity, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------------------------
# ConvNet
# --------------------------------------------------------------------------------------------

def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def convnet(width: int = 16, image_size: int = 32, stem: str | None = None) -> tuple[nn.Module, int]:
    """A plain 6-conv VGG-style net (three stages of two convs, widths w, 2w, 4w)."""
    no_stem_choice("convnet", stem)
    layers: list[nn.Module] = []
    cin = 3
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        layers += _conv_bn_relu(cin, cout) + _conv_bn_relu(cout, cout)
        if stage < 2:
            layers.append(nn.MaxPool2d(2))
        cin = cout
    return nn.Sequential(*layers), cin


# --------------------------------------------------------------------------------------------
# ResNet and PreAct-ResNet
# --------------------------------------------------------------------------------------------

def resnet_stem(stem: str, width: int, activated: bool = True) -> list[nn.Module]:
    """CIFAR: one 3×3 stride-1 conv; ImageNet: 7×7 stride-2 conv, BN, ReLU, 3×3 stride-2 average pooling.

    ``activated`` adds BN + ReLU after the CIFAR conv (plain ResNets; pre-activation blocks start
    with their own BN + ReLU).
    """
    if stem == "imagenet":
        return [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.AvgPool2d(3, 2, 1)]
    conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    return [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)] if activated else [conv]


def _stage_plan(blocks: list[int], width: int):
    """(input channels, output channels, stride) of every residual block; stage widths w, 2w, 4w, 8w."""
    cin = width
    for stage, count in enumerate(blocks):
        cout = width * 2**stage
        for index in range(count):
            yield cin, cout, (2 if stage > 0 and index == 0 else 1)
            cin = cout


def _resnet(blocks: list[int], width: int, image_size: int, stem: str | None) -> tuple[nn.Module, int]:
    """ResNet from torchvision's BasicBlock with stage widths w, 2w, 4w, 8w."""
    layers: list[nn.Module] = resnet_stem(resolve_stem(stem, image_size), width)
    cout = width
    for cin, cout, stride in _stage_plan(blocks, width):
        downsample = None
        if stride != 1 or cin != cout:
            downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        layers.append(BasicBlock(cin, cout, stride, downsample))
    body = nn.Sequential(*layers)
    init_convs(body)
    return body, cout


def resnet18(width: int = 64, image_size: int = 32, stem: str | None = None) -> tuple[nn.Module, int]:
    return _resnet([2, 2, 2, 2], width, image_size, stem)


def resnet34(width: int = 64, image_size: int = 32, stem: str | None = None) -> tuple[nn.Module, int]:
    return _resnet([3, 4, 6, 3], width, image_size, stem)


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN → ReLU → conv3×3 → BN → ReLU → conv3×3, plus the shortcut.

    A projecting shortcut (1×1 conv) takes the pre-activated input, as in the pre-activation
    ResNet paper. No operation is in place: per-sample gradient norms read each layer's input
    after the forward pass.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


def preact_resnet18(width: int = 64, image_size: int = 32, stem: str | None = None) -> tuple[nn.Module, int]:
    """PreAct-ResNet-18: pre-activation blocks [2, 2, 2, 2], then a final BN + ReLU so the last
    feature map is post-activation (what fine-pruning ranks channels by)."""
    layers: list[nn.Module] = resnet_stem(resolve_stem(stem, image_size), width, activated=False)
    cout = width
    for cin, cout, stride in _stage_plan([2, 2, 2, 2], width):
        layers.append(PreActBlock(cin, cout, stride))
    layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    body = nn.Sequential(*layers)
    init_convs(body)
    return body, cout


# --------------------------------------------------------------------------------------------
# VGG (torchvision's layer builder)
# --------------------------------------------------------------------------------------------

VGG_CONFIGS = {"vgg16": "D", "vgg19": "E"}
VGG_POOLINGS = 5


def _vgg(arch: str, width: int, image_size: int, stem: str | None) -> tuple[nn.Module, int]:
    """torchvision's VGG feature layers with BatchNorm, channel counts scaled by ``width / 64``."""
    from torchvision.models.vgg import cfgs, make_layers

    no_stem_choice(arch, stem)
    require_image_size(arch, image_size, 2**VGG_POOLINGS, f"{VGG_POOLINGS} 2x2 max-poolings")
    config = [entry if entry == "M" else scaled(entry, width) for entry in cfgs[VGG_CONFIGS[arch]]]
    body = make_layers(config, batch_norm=True)
    init_convs(body)
    return body, config[-2]


def vgg16(width: int = 64, image_size: int = 32, stem: str | None = None) -> tuple[nn.Module, int]:
    return _vgg("vgg16", width, image_size, stem)


def vgg19(width: int = 64, image_size: int = 32, stem: str | None = None) -> tuple[nn.Module, int]:
    return _vgg("vgg19", width, image_size, stem)


# --------------------------------------------------------------------------------------------
# MobileNetV2 and DenseNet-121 (torchvision's classes)
# --------------------------------------------------------------------------------------------

# The published inverted-residual stages: expansion t, channels c, repeats n, first stride s.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))
CIFAR_STRIDE_ONE_STAGE = 1  # the CIFAR version keeps the (6, 24, 2, 2) stage at stride 1


def mobilenetv2(width: int = 64, image_size: int = 32, stem: str | None = None) -> tuple[nn.Module, int]:
    """torchvision's MobileNetV2 features with ``width_mult = width / 64`` (channels rounded to
    multiples of 8 as published; the last layer keeps 1280 channels below width 64)."""
    from torchvision.models import MobileNetV2

    cifar = resolve_stem(stem, image_size) == "cifar"
    stages = [list(stage) for stage in MOBILENET_V2_STAGES]
    if cifar:
        stages[CIFAR_STRIDE_ONE_STAGE][3] = 1
    network = MobileNetV2(num_classes=1, width_mult=width / FULL_WIDTH, inverted_residual_setting=stages)
    if cifar:
        network.features[0][0].stride = (1, 1)  # the 3×3 stem conv (padding 1) at stride 1
    return network.features, network.last_channel


DENSENET121_BLOCKS = (6, 12, 24, 16)
DENSENET_TRANSITIONS = 3


def densenet121(width: int = 64, image_size: int = 32, stem: str | None = None) -> tuple[nn.Module, int]:
    """torchvision's DenseNet-121 features (growth rate ``width / 2``, ``width`` initial channels),
    then the final ReLU that its forward applies before pooling."""
    from torchvision.models import DenseNet

    stem = resolve_stem(stem, image_size)
    reduction = 2**DENSENET_TRANSITIONS * (4 if stem == "imagenet" else 1)
    require_image_size("densenet121", image_size, reduction, f"{stem} stem and {DENSENET_TRANSITIONS} 2x2 "
                                                              f"average poolings")
    network = DenseNet(growth_rate=max(1, width // 2), block_config=DENSENET121_BLOCKS, num_init_features=width,
                       num_classes=1)
    if stem == "cifar":
        network.features.conv0 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(network.features.conv0.weight)  # as torchvision initialises its convs
        network.features.pool0 = nn.Identity()
    # Flat, like every body here: stage-wise defenses (NAD) walk the body's children.
    return nn.Sequential(*network.features.children(), nn.ReLU(inplace=True)), network.classifier.in_features


# --------------------------------------------------------------------------------------------
# Building a model from a config entry
# --------------------------------------------------------------------------------------------

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.25, 0.25, 0.25)


def build_model(spec: dict, num_classes: int, image_size: int, seed: int | None = None) -> Classifier:
    """Build the model of a resolved ``models:`` entry (keys ``arch``, ``width``, optional ``stem``,
    ``mean``/``std``).

    With ``seed``, the initial weights depend on the seed alone (the global RNG is left as it was).
    """
    factory = ARCHITECTURES.get(spec["arch"], key="models.arch")
    stem = spec.get("stem")
    if stem is not None and stem not in STEMS:
        raise ConfigError(f"models.stem: unknown stem '{stem}' (known: {', '.join(STEMS)})")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        body, channels = factory(width=int(spec.get("width", DEFAULTS["width"])), image_size=image_size, stem=stem)
        return Classifier(body, channels, num_classes, spec.get("mean", DEFAULT_MEAN), spec.get("std", DEFAULT_STD))


@torch.no_grad()
def stage_ends(body: nn.Module, image_shape: tuple[int, int]) -> list[int]:
    """Indices of the body's children that end a resolution stage (the spatial size changes after them)."""
    if not isinstance(body, nn.Sequential):
        raise TypeError(f"model.body must be an nn.Sequential to find its stages, got {type(body).__name__}")
    parameter = next(body.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = body.training
    body.eval()  # the probe must not move BatchNorm running statistics
    try:
        x = torch.zeros(1, 3, *image_shape, device=device)
        sizes = []
        for child in body:
            x = child(x)
            sizes.append(tuple(x.shape[-2:]))
    finally:
        body.train(was_training)
    return [i for i, size in enumerate(sizes) if i == len(sizes) - 1 or sizes[i + 1] != size]
