"""Input-Aware dynamic backdoor (IAB): a trigger generated for each image by a pattern network G
and a mask network M, x_bd = x + (G(x) − x)·thr(M(x)) (Nguyen and Tran, "Input-Aware Dynamic
Backdoor Attack", NeurIPS 2020; the official code, VinAIResearch/input-aware-backdoor-attack-release,
which BackdoorBench and BackdoorBox follow).

G and M share one encoder-decoder architecture (:class:`Generator`): blocks of Conv3×3 (padding 1)
→ BatchNorm (eps 1e-5, momentum 0.05) → ReLU; ``steps`` times two blocks and a 2×2 max-pool down
(``channel_init`` channels, doubled at each step but the last), a middle block, ``steps`` times a
bilinear ×2 upsampling and two blocks up (the last without ReLU), then tanh(x)/(2+1e-7) + 0.5 ∈ [0, 1].
G has 3 output channels, M one; the mask is sharpened by thr(m) = tanh(20m − 10)/(2+1e-7) + 0.5.
CIFAR-10: ``channel_init`` 32, ``steps`` 3 (the defaults); MNIST: 16, 2.

Training (:func:`train_generator`, the trigger stage, once per dataset and generators entry), with
the trainer and its checkpoints, both stages drawing a second, independently shuffled batch x2 for
each trainer batch x1 (one permutation of the training set per epoch, augmented like x1):

1. mask pre-training, ``mask_epochs`` (25): loss = λ_norm·mean(relu(thr(M(x1)) − mask_density))
   + λ_div·mean_b(‖x1 − x2‖ / (‖thr(M(x1)) − thr(M(x2))‖ + 1e-7)) with RMS distances per image;
   Adam at 0.01, ×0.1 at epochs 10 and 20. Then M is frozen (eval mode).
2. joint training of a classifier C (``model``) and G, ``epochs`` (575, so 600 in all as in the
   official code): per batch of B, the first int(p_attack·B) samples carry their own trigger and
   the label ``target``, the next int(p_cross·B) carry the pattern and mask of x2's images and
   keep their label, the rest are clean; loss = CE(C(batch)) + λ_div·mean(‖x1 − x2'‖ / (‖G(x1) −
   G(x2')‖ + 1e-7)) over the backdoor samples x1 and as many other images x2'. C: SGD 0.01,
   momentum 0.9, weight decay 5e-4, ×0.1 at 100/200/300/400; G: Adam 0.01, betas (0.5, 0.9),
   ×0.1 at 200/300/400/500.

Poisoning (:func:`build`): G and M in eval mode stamp x + (G(x) − x)·thr(M(x)) on the chosen
samples, which the poison stage relabels (dirty-label, rate 0.1 by default), and on the ASR test
images; the noise mode (:meth:`InputAwareTrigger.noise`, ``noise_ratio`` cross samples per
poisoned sample, default p_cross/p_attack = 1) gives each image the pattern and mask of another
image of its batch and keeps its label. This is the data-poisoning use of IAB (BackdoorBench's
poisoned-set export, the papers that compare against IAB as a poisoning attack): the victim is a
fresh model trained on the poisoned set, not the jointly trained classifier.

Departures from the official code, all deliberate:

- the pipeline works in pixel space [0, 1]; the official code stamps in normalised space and feeds
  G and M normalised images (the same stamp up to the normalisation, which the first BatchNorm
  mostly absorbs);
- C and G have their own optimizers as in the paper, but the trainer builds one: the module it
  trains (:class:`JointModule`) exposes only C's parameters to it, and G is stepped by its own
  Adam after every trainer step (its state travels in the module's state dict, so the trainer's
  checkpoint resumes it). G's gradients are zeroed after each step — the official code never
  zeroes them (it accumulates them over the whole run); TrojanZoo zeroes them too;
- the diversity term pairs the backdoor images with x2[nb:2nb] even when p_cross ≠ p_attack (the
  official code needs them equal); a batch with no backdoor sample (a short last batch) has no
  diversity term instead of a NaN;
- the official transforms are crop (padding 5), rotation (±10°) and flip, in that order; here the
  trainer crops and flips and the rotation follows (the same distribution: flip and a symmetric
  rotation commute up to the angle's sign).

Keys and defaults: ``input_aware.yaml`` beside this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import triggers
from ..errors import ConfigError
from ..kinds import generator_settings, settings_for
from . import PoisonContext

EPSILON = 1e-7
KIND = "input-aware"
CHUNK = 256  # images per forward pass of G and M when stamping


# -- the networks ------------------------------------------------------------------------------

class Conv2dBlock(nn.Module):
    """Conv3×3 (padding 1) → BatchNorm (eps 1e-5, momentum 0.05) → ReLU (optional)."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        super().__init__()
        self.conv2d = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.batch_norm = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.05, affine=True)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.batch_norm(self.conv2d(x)))


class Generator(nn.Sequential):
    """The official encoder-decoder shared by the pattern (3 outputs) and mask (1 output) networks;
    module names as in the official code (``convblock_down_0``, ``downsample_0``, …)."""

    def __init__(self, out_channels: int, channel_init: int = 32, steps: int = 3, in_channels: int = 3):
        super().__init__()
        current, following = in_channels, channel_init
        for step in range(steps):
            self.add_module(f"convblock_down_{2 * step}", Conv2dBlock(current, following))
            self.add_module(f"convblock_down_{2 * step + 1}", Conv2dBlock(following, following))
            self.add_module(f"downsample_{step}", nn.MaxPool2d(2, 2))
            if step < steps - 1:
                current, following = following, following * 2
        self.add_module("convblock_middle", Conv2dBlock(following, following))
        current, following = following, following // 2
        for step in range(steps):
            self.add_module(f"upsample_{step}", nn.Upsample(scale_factor=2, mode="bilinear"))
            self.add_module(f"convblock_up_{2 * step}", Conv2dBlock(current, current))
            last = step == steps - 1
            self.add_module(f"convblock_up_{2 * step + 1}",
                            Conv2dBlock(current, out_channels if last else following, relu=not last))
            current, following = following, following // 2
            if step == steps - 2:
                following = out_channels
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 ** self.steps or x.shape[-2] % 2 ** self.steps:
            raise ValueError(f"input-aware: image sides must be divisible by 2^steps = {2 ** self.steps}, "
                             f"got {tuple(x.shape[-2:])}")
        return torch.tanh(super().forward(x)) / (2 + EPSILON) + 0.5


def threshold(mask: torch.Tensor) -> torch.Tensor:
    """The official sharpening of the mask network's output: tanh(20m − 10)/(2+ε) + 0.5."""
    return torch.tanh(mask * 20 - 10) / (2 + EPSILON) + 0.5


def stamp(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x + (pattern − x)·mask: the pattern where the (thresholded) mask is 1."""
    return x + (pattern - x) * mask


def build_network(out_channels: int, channel_init: int, steps: int, seed: int) -> Generator:
    """A pattern (3 outputs) or mask (1 output) network with seeded initial weights (the global RNG
    left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(out_channels, channel_init, steps)


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(mean over C, H, W of (a − b)²) per image: the official diversity distances."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).sqrt()


def diversity(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """Per pair: distance of the images / (distance of their patterns or masks + 1e-7)."""
    return rms_distance(x1, x2) / (rms_distance(out1, out2) + EPSILON)


# -- training helpers --------------------------------------------------------------------------

def rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own angle, uniform in ±``degrees`` (nearest neighbour, zero fill,
    like torchvision's RandomRotation); the angles are drawn from ``generator`` on the CPU."""
    if degrees <= 0:
        return x
    from ..augment import to_device

    n = x.shape[0]
    angles = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = angles.cos(), angles.sin(), torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(to_device(theta, x.device).to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class SecondBatches:
    """The official code's second data loader: x2 batches from a permutation of the training set
    drawn independently of the trainer's (one per epoch, from the run's generator), augmented
    like the trainer's batches."""

    def __init__(self, images: np.ndarray, spec: dict):
        from ..augment import BatchAugment

        self.images = images
        self.augmenter = BatchAugment(list(spec["augment"]), {"crop_padding": int(spec["crop_padding"])})
        self.rotation = float(spec["rotation"])
        self.epoch: int | None = None
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def draw(self, count: int, ctx) -> torch.Tensor:
        from ..augment import to_device
        from ..trainer import images_to_tensor

        if ctx.epoch != self.epoch or self.position + count > len(self.order):
            self.epoch, self.position = ctx.epoch, 0
            self.order = torch.randperm(len(self.images), generator=ctx.generator)
        rows = self.order[self.position:self.position + count]
        self.position += count
        batch = to_device(images_to_tensor(self.images[rows.numpy()]), ctx.device)
        x = self.augmenter(batch, torch.zeros(count, dtype=torch.long, device=ctx.device), ctx.generator).images
        return rotate(x, self.rotation, ctx.generator)


class JointModule(nn.Module):
    """The classifier C and the pattern network G as one module for the trainer.

    The trainer builds its optimizer from ``parameters()``: here C's alone (SGD). G is stepped by
    its own Adam (:meth:`step_pattern`, called after every trainer step), whose state is this
    module's extra state, so the trainer's per-epoch checkpoint holds and resumes it with C and G.
    """

    def __init__(self, classifier: nn.Module, pattern: Generator, optimizer: dict):
        super().__init__()
        self.classifier = classifier
        self.pattern = pattern
        self.pattern_settings = optimizer
        self.pattern_optimizer = torch.optim.Adam(pattern.parameters(), lr=float(optimizer["lr"]),
                                                  betas=tuple(float(b) for b in optimizer["betas"]))

    def parameters(self, recurse: bool = True):
        return self.classifier.parameters(recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def step_pattern(self, epoch: int) -> None:
        """One Adam step of G at the learning rate of ``epoch`` (0-based; ×gamma at each milestone
        passed, as the official per-epoch MultiStepLR), then its gradients zeroed."""
        settings = self.pattern_settings
        passed = sum(1 for milestone in settings["milestones"] if int(milestone) <= epoch)
        for group in self.pattern_optimizer.param_groups:
            group["lr"] = float(settings["lr"]) * float(settings["gamma"]) ** passed
        self.pattern_optimizer.step()
        self.pattern_optimizer.zero_grad(set_to_none=True)

    def get_extra_state(self) -> dict:
        return {"pattern_optimizer": self.pattern_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.pattern_optimizer.load_state_dict(state["pattern_optimizer"])


def split_sizes(batch: int, spec: dict) -> tuple[int, int]:
    """Backdoor and cross samples of a batch: int(p_attack·B), int(p_cross·B) (the official rounding)."""
    return int(float(spec["p_attack"]) * batch), int(float(spec["p_cross"]) * batch)


def mask_objective(spec: dict, second: SecondBatches):
    """Stage 1: per image, λ_norm·mean(relu(thr(M(x1)) − density)) + λ_div·diversity of the masks."""
    from ..trainer import Objective, StepOutput

    density, lambda_norm, lambda_div = float(spec["mask_density"]), float(spec["lambda_norm"]), float(spec["lambda_div"])

    def loss(net, batch, ctx):
        x1 = rotate(batch.images, second.rotation, ctx.generator)
        x2 = second.draw(len(x1), ctx)
        with ctx.autocast():
            masks1, masks2 = threshold(net(x1)).float(), threshold(net(x2)).float()
        norm = F.relu(masks1 - density).flatten(1).mean(1)
        return StepOutput(lambda_norm * norm + lambda_div * diversity(x1, x2, masks1, masks2))

    key = {"input-aware mask": {name: spec[name] for name in
                                ("mask_density", "lambda_norm", "lambda_div", "augment", "crop_padding", "rotation")}}
    return Objective(loss, key)


def joint_objective(spec: dict, second: SecondBatches, mask: Generator):
    """Stage 2: cross entropy on backdoor, cross and clean samples + λ_div·diversity of the patterns."""
    from ..trainer import Objective, StepOutput

    target, lambda_div = int(spec["target"]), float(spec["lambda_div"])

    def loss(net, batch, ctx):
        x1, labels = rotate(batch.images, second.rotation, ctx.generator), batch.labels
        x2 = second.draw(len(x1), ctx)
        nb, nc = split_sizes(len(x1), spec)
        donors = x2[nb:nb + max(nb, nc)]
        with ctx.autocast():
            with torch.no_grad():  # M is frozen
                masks_bd, masks_cross = threshold(mask(x1[:nb])), threshold(mask(donors[:nc]))
            patterns_bd, patterns_donor = net.pattern(x1[:nb]), net.pattern(donors)
            inputs = torch.cat([stamp(x1[:nb], patterns_bd, masks_bd),
                                stamp(x1[nb:nb + nc], patterns_donor[:nc], masks_cross), x1[nb + nc:]])
            logits = net.classifier(inputs).float()
        targets = torch.cat([torch.full_like(labels[:nb], target), labels[nb:]])
        per_sample = F.cross_entropy(logits, targets, reduction="none")
        if nb > 0 and lambda_div > 0:
            per_sample = per_sample + lambda_div * diversity(x1[:nb], x2[nb:2 * nb], patterns_bd,
                                                             patterns_donor[:nb]).mean()
        return StepOutput(per_sample, logits)

    key = {"input-aware joint": {name: spec[name] for name in
                                 ("target", "p_attack", "p_cross", "lambda_div", "augment", "crop_padding", "rotation",
                                  "pattern_optimizer")}}
    return Objective(loss, key, models=(mask,))


def mask_training(spec: dict) -> dict:
    optimizer = spec["mask_optimizer"]
    return {"epochs": int(spec["mask_epochs"]), "batch_size": int(spec["batch_size"]),
            "optimizer": {"name": "adam", "lr": float(optimizer["lr"]), "weight_decay": 0.0,
                          "betas": [float(b) for b in optimizer["betas"]]},
            "schedule": {"name": "multistep", "milestones": list(optimizer["milestones"]),
                         "gamma": float(optimizer["gamma"])},
            "augment": list(spec["augment"]), "crop_padding": int(spec["crop_padding"]), "adversarial": None,
            "label_smoothing": 0.0, "compile": False}


def joint_training(spec: dict) -> dict:
    optimizer = spec["classifier_optimizer"]
    return {"epochs": int(spec["epochs"]), "batch_size": int(spec["batch_size"]),
            "optimizer": {"name": "sgd", "lr": float(optimizer["lr"]), "momentum": float(optimizer["momentum"]),
                          "weight_decay": float(optimizer["weight_decay"])},
            "schedule": {"name": "multistep", "milestones": list(optimizer["milestones"]),
                         "gamma": float(optimizer["gamma"])},
            "augment": list(spec["augment"]), "crop_padding": int(spec["crop_padding"]), "adversarial": None,
            "label_smoothing": 0.0, "compile": False}


def train_mask(spec: dict, images: np.ndarray, labels: np.ndarray, *, seed: int, device="cpu",
               workdir: Path | None = None, desc: str = "input-aware mask") -> Generator:
    """Stage 1 alone: the mask network pre-trained with the norm and diversity losses, frozen."""
    from ..trainer import train_model

    mask = build_network(1, int(spec["channel_init"]), int(spec["steps"]), seed)
    result = train_model(mask, images, labels, mask_training(spec), seed=seed, device=device,
                         checkpoint=workdir and workdir / "mask.pt", history=workdir and workdir / "history-mask.csv",
                         objective=mask_objective(spec, SecondBatches(images, spec)), desc=desc)
    mask = result.model.eval()
    mask.requires_grad_(False)
    return mask


def train_generator(spec: dict, context) -> dict[str, torch.Tensor]:
    """Train the pattern and mask networks of a ``generators:`` entry of this kind on the clean
    training set (trigger stage): mask pre-training, then joint training of a classifier and the
    pattern network. Checkpoints and ``history-mask.csv`` / ``history-joint.csv`` go to
    ``context.workdir``. Returns both networks' state dicts, prefixed ``pattern.`` and ``mask.``."""
    from ..models import build_model
    from ..trainer import train_model

    key = getattr(context, "key", f"generators.{KIND}")
    spec = generator_settings(KIND, spec, key)
    images, labels = np.asarray(context.train_images), np.asarray(context.train_labels)
    size, steps = int(images.shape[1]), int(spec["steps"])
    if size % 2 ** steps:
        raise ConfigError(f"{key}.steps: {size}-px images are not divisible by 2^{steps} = {2 ** steps}")
    num_classes = len(context.classes)
    if int(spec["target"]) >= num_classes:
        raise ConfigError(f"{key}.target: class {spec['target']} is outside the dataset's {num_classes} classes")
    seed = int(spec["seed"])
    workdir = Path(context.workdir) if context.workdir is not None else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    device = context.device
    mask = train_mask(spec, images, labels, seed=seed, device=device, workdir=workdir, desc=f"{key}: mask")

    pattern = build_network(3, int(spec["channel_init"]), steps, seed + 1)
    classifier = build_model(spec["model"], num_classes, size, seed=seed)
    joint = JointModule(classifier, pattern, spec["pattern_optimizer"])
    result = train_model(joint, images, labels, joint_training(spec), seed=seed, device=device,
                         checkpoint=workdir and workdir / "joint.pt",
                         history=workdir and workdir / "history-joint.csv",
                         objective=joint_objective(spec, SecondBatches(images, spec), mask),
                         on_batch=lambda end: joint.step_pattern(end.epoch), desc=f"{key}: joint")
    pattern = result.model.pattern.cpu().eval()
    tensors = {f"pattern.{name}": value for name, value in pattern.state_dict().items()}
    tensors.update({f"mask.{name}": value for name, value in mask.cpu().state_dict().items()})
    return {name: value.detach().cpu().clone() for name, value in tensors.items()}


# -- poisoning ---------------------------------------------------------------------------------

def part(generator: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: value for name, value in generator.items() if name.startswith(prefix)}


def architecture_of(weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(channel_init, steps) of a trained network, read from its weights."""
    first = weights.get("convblock_down_0.conv2d.weight")
    if first is None:
        raise ValueError("input-aware: the generator tensors hold no convblock_down_0 (not an input-aware generator)")
    downs = sum(1 for name in weights if name.startswith("convblock_down_") and name.endswith(".conv2d.weight"))
    return int(first.shape[0]), downs // 2


def load_networks(generator: dict, entry: dict | None = None) -> tuple[Generator, Generator]:
    """The trained pattern and mask networks (eval mode), built as the generators ``entry`` says
    (else as their weights say) and loaded from the generator's tensors."""
    weights = {prefix: part(generator, f"{prefix}.") for prefix in ("pattern", "mask")}
    channel_init, steps = architecture_of(weights["pattern"])
    if entry is not None:
        settings = generator_settings(KIND, entry)
        if (int(settings["channel_init"]), int(settings["steps"])) != (channel_init, steps):
            raise ValueError(f"input-aware: the generators entry says channel_init {settings['channel_init']}, steps "
                             f"{settings['steps']}; the trained networks have {channel_init}, {steps}: retrain them")
    networks = []
    for prefix, out_channels in (("pattern", 3), ("mask", 1)):
        network = Generator(out_channels, channel_init, steps)
        network.load_state_dict(weights[prefix])
        network.requires_grad_(False)
        networks.append(network.eval())
    return networks[0], networks[1]


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation without fixed points (one random cycle through all n ≥ 2 positions)."""
    order = torch.randperm(n, generator=generator)
    donor = torch.empty(n, dtype=torch.long)
    donor[order] = order.roll(-1)
    return donor


@dataclass
class InputAwareTrigger:
    pattern: Generator
    mask: Generator
    image_size: int
    noise_ratio: float

    @torch.no_grad()
    def patterns_and_masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G(x) and thr(M(x)) of each image, in chunks of :data:`CHUNK` images."""
        self.pattern.to(x.device)
        self.mask.to(x.device)
        patterns, masks = [], []
        for chunk in x.float().split(CHUNK):
            patterns.append(self.pattern(chunk))
            masks.append(threshold(self.mask(chunk)))
        return torch.cat(patterns).to(x.dtype), torch.cat(masks).to(x.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Each image with its own trigger: x + (G(x) − x)·thr(M(x))."""
        triggers.check_image_size(x, self.image_size, KIND)
        if len(x) == 0:
            return x.clone()
        patterns, masks = self.patterns_and_masks(x)
        return stamp(x, patterns, masks).clamp(0, 1)

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cross samples: each image with the pattern and mask of another image of the batch (a
        random derangement drawn from ``generator``); a batch of one image is returned unchanged."""
        triggers.check_image_size(x, self.image_size, KIND)
        if len(x) < 2:
            return x.clone()
        patterns, masks = self.patterns_and_masks(x)
        donor = derangement(len(x), generator).to(x.device)
        return stamp(x, patterns[donor], masks[donor]).clamp(0, 1)


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> InputAwareTrigger:
    settings = settings_for(__name__, spec)
    generator = getattr(context, "generator", None)
    if not generator:
        raise ConfigError("generator: an input-aware attack stamps the triggers of networks trained by the trigger "
                          "stage; name a generators entry of kind input-aware")
    pattern, mask = load_networks(generator, settings.get("generator_entry"))
    if image_size % 2 ** pattern.steps:
        raise ValueError(f"input-aware: {image_size}-px images are not divisible by 2^steps = {2 ** pattern.steps}")
    return InputAwareTrigger(pattern, mask, image_size, float(settings["trigger"]["noise_ratio"]))
