"""ISSBA / SSBA: an invisible, sample-specific additive trigger that hides one fixed bit string in
each poisoned image with a StegaStamp encoder, then dirty-label poisoning with it (Li, Li, Wu, Li,
He and Lyu, "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021).

The encoder/decoder pair is trained once per dataset by the trigger stage from a ``generators:``
entry of this kind (:func:`train_generator`) on the released clean training set, following
BackdoorBox's ``core/attacks/ISSBA.py`` (the official repository ships only a pretrained TF
encoder for ImageNet-size images):

- **encoder** (a U-Net; every convolution "same"-padded as BackdoorBox's ``Conv2dSame``, i.e.
  d·(k−1) padding split with the smaller half first, which gives TF's output sizes, followed by a
  ReLU; nearest ×2 upsampling): the secret (minus 0.5) → Linear(secret_size → H·W·3) + ReLU →
  a 3×H×W map, concatenated with the image minus 0.5 (6 channels); down 32 (s1), 32, 64, 128,
  256 (s2); up by ×2 + 2×2 convs (128, 64, 32, 32), each concatenated with the matching down
  feature (the last also with the 6-channel input) and a 3×3 conv; a 1×1 conv to 3 channels,
  without activation, is the residual δ(x, s). The image side must be divisible by 16.
- **decoder**: a spatial transformer (3×3 s2 convs 32, 64, 128 → Linear(→128) + ReLU → the 2×3
  affine θ from a zero-initialised weight and an identity bias) resamples the image minus 0.5,
  then 3×3 convs 32 s2, 32, 64 s2, 64, 64 s2, 128 s2, 128 s2 → Linear(→512) + ReLU →
  Linear(→secret_size) logits. BackdoorBox sizes the first linear layer with H//32, which is 0
  below 32 px; here it is ceil(H/32), the real size of the feature map.
- **initialisation** (``init``): by default the official TF StegaStamp's (encoder ``he_normal``,
  decoder ``glorot_uniform``, zero biases). BackdoorBox's port keeps PyTorch's default
  initialisation (``init: pytorch``), whose signal fades through the encoder's eleven ReLU
  layers: on 16-px digits its secret loss stays at ln 2 for ~500 steps of batch 32 (measured),
  against under 100 with the official initialisation.
- **training** (through :func:`poisonflow.trainer.train_model`; labels are unused): every image
  gets its own Bernoulli(0.5) secret at every step, drawn from the trainer's seeded generator;
  x_p = clamp(x + δ(x, s), 0, 1); Adam (lr 1e-4) on encoder and decoder together, batch 32,
  20 epochs; the first ``secret_only_epochs`` minimise the secret's binary cross entropy alone,
  later ones ``residual_weight``·mean(δ²) + ``secret_weight``·BCE(dec(x_p), s). The defaults
  are sized for CIFAR-10, where the two secret-only epochs are ~3,100 steps; on a small set they
  are a few dozen, and if the decoder has not started reading the secret when the residual
  penalty starts, δ collapses towards 0 (the stage then prints a warning; raise
  ``secret_only_epochs``).

**Simplification.** BackdoorBox's objective also has 1.5·LPIPS(x, x_p) (AlexNet LPIPS, whose
pretrained weights cannot be downloaded here, and ``lpips`` is not a dependency) and 0.5·critic(x_p)
from a discriminator that stays untrained unless its WGAN option is on (off by default). Both
terms are dropped: the residual's size is held down by the L2 term alone, so triggers are less
perceptually shaped than the paper's (still small: the trigger stage's ``history_ssba.csv``
records the mean |δ| per epoch).

Poisoning: one fixed random secret of ``secret_size`` bits (seeded by the generators entry's
``seed``) for every poisoned image, x_p = clamp(x + δ(x, secret), 0, 1), rounded to uint8 by the
poison stage like every trigger; the poisoned samples are relabelled to the target (dirty-label,
rate 0.1 as in BackdoorBench; BackdoorBox uses 0.05). The ASR set is the non-target test images
encoded with the same secret. Keys and defaults: ``ssba.yaml``.
"""

from __future__ import annotations

import csv
import math
import sys
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

CHANNELS = 3
MULTIPLE = 16  # the encoder halves the side four times and concatenates the upsampled maps back
APPLY_BATCH = 256  # images encoded at once when poisoning
PROBE_IMAGES = 256  # training images the per-epoch fixed-secret check encodes
SECRET_HISTORY = "history_ssba.csv"
INITS = ("stegastamp", "pytorch")
WEAK_BIT_ACCURACY = 0.75  # a trained pair below this fixed-secret bit accuracy is reported
SECRET_HISTORY_COLUMNS = ("epoch", "bit_accuracy", "fixed_bit_accuracy", "mean_abs_residual_255")


# -- the networks ------------------------------------------------------------------------------

class Conv2dSame(nn.Conv2d):
    """A convolution padded by d·(k−1) (smaller half first), as BackdoorBox's ``Conv2dSame``:
    output side ceil(H / stride), TF's "same" size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(cin, cout, kernel, stride=stride)
        total = kernel - 1
        self.same_padding = (total // 2, total - total // 2, total // 2, total - total // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.same_padding))


def conv_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(Conv2dSame(cin, cout, kernel, stride), nn.ReLU())


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def check_side(image_size: int, key: str = "ssba") -> None:
    if image_size % MULTIPLE:
        raise ConfigError(f"{key}: the StegaStamp encoder needs an image side divisible by {MULTIPLE}, "
                          f"got {image_size} (set the dataset's image_size)")


class StegaStampEncoder(nn.Module):
    """(secret (B, S) in {0, 1}, images (B, 3, H, W) in [0, 1]) → the residual δ (B, 3, H, W)."""

    def __init__(self, secret_size: int, image_size: int):
        super().__init__()
        check_side(image_size)
        self.image_size = image_size
        self.secret_dense = nn.Sequential(nn.Linear(secret_size, image_size * image_size * CHANNELS), nn.ReLU())
        self.conv1 = conv_relu(2 * CHANNELS, 32)
        self.conv2 = conv_relu(32, 32, stride=2)
        self.conv3 = conv_relu(32, 64, stride=2)
        self.conv4 = conv_relu(64, 128, stride=2)
        self.conv5 = conv_relu(128, 256, stride=2)
        self.up6, self.conv6 = conv_relu(256, 128, 2), conv_relu(256, 128)
        self.up7, self.conv7 = conv_relu(128, 64, 2), conv_relu(128, 64)
        self.up8, self.conv8 = conv_relu(64, 32, 2), conv_relu(64, 32)
        self.up9, self.conv9 = conv_relu(32, 32, 2), conv_relu(64 + 2 * CHANNELS, 32)
        self.residual = Conv2dSame(32, CHANNELS, 1)

    def forward(self, secret: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        side = self.image_size
        secret_map = self.secret_dense(secret - 0.5).reshape(-1, CHANNELS, side, side)
        inputs = torch.cat([secret_map.expand(len(image), -1, -1, -1), image - 0.5], dim=1)
        conv1 = self.conv1(inputs)
        conv2 = self.conv2(conv1)
        conv3 = self.conv3(conv2)
        conv4 = self.conv4(conv3)
        conv5 = self.conv5(conv4)
        conv6 = self.conv6(torch.cat([conv4, self.up6(upsample(conv5))], dim=1))
        conv7 = self.conv7(torch.cat([conv3, self.up7(upsample(conv6))], dim=1))
        conv8 = self.conv8(torch.cat([conv2, self.up8(upsample(conv7))], dim=1))
        conv9 = self.conv9(torch.cat([conv1, self.up9(upsample(conv8)), inputs], dim=1))
        return self.residual(conv9)


class StegaStampDecoder(nn.Module):
    """Images (B, 3, H, W) in [0, 1] → secret logits (B, S), after a learned affine warp."""

    def __init__(self, secret_size: int, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.stn_features = nn.Sequential(conv_relu(CHANNELS, 32, stride=2), conv_relu(32, 64, stride=2),
                                          conv_relu(64, 128, stride=2))
        self.stn_dense = nn.Sequential(nn.Linear(128 * math.ceil(image_size / 8) ** 2, 128), nn.ReLU())
        self.theta_weight = nn.Parameter(torch.zeros(128, 6))  # θ starts as the identity warp
        self.theta_bias = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
        self.features = nn.Sequential(
            conv_relu(CHANNELS, 32, stride=2), conv_relu(32, 32), conv_relu(32, 64, stride=2), conv_relu(64, 64),
            conv_relu(64, 64, stride=2), conv_relu(64, 128, stride=2), conv_relu(128, 128, stride=2))
        self.head = nn.Sequential(nn.Linear(128 * math.ceil(image_size / 32) ** 2, 512), nn.ReLU(),
                                  nn.Linear(512, secret_size))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image = image - 0.5
        stn = self.stn_dense(self.stn_features(image).flatten(1))
        theta = (stn @ self.theta_weight + self.theta_bias).view(-1, 2, 3)
        grid = F.affine_grid(theta.to(image.dtype), list(image.shape), align_corners=False)
        warped = F.grid_sample(image, grid, align_corners=False)
        return self.head(self.features(warped).flatten(1))


class StegaStamp(nn.Module):
    """The encoder and decoder trained together: (images, secrets) → (residual, secret logits)."""

    def __init__(self, secret_size: int, image_size: int):
        super().__init__()
        self.encoder = StegaStampEncoder(secret_size, image_size)
        self.decoder = StegaStampDecoder(secret_size, image_size)

    def forward(self, image: torch.Tensor, secret: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = self.encoder(secret, image)
        encoded = (image + residual).clamp(0, 1)
        return residual, self.decoder(encoded)


# Keras' truncated-normal initialisers cut at ±2σ and rescale σ by this factor to keep the variance.
TRUNCATED_STD = 0.87962566103423978


def he_normal_(weight: torch.Tensor) -> None:
    """Keras' ``he_normal``: a normal truncated at ±2σ with variance 2 / fan_in."""
    fan_in = weight[0].numel()  # Linear (out, in) and Conv2d (out, in, k, k) alike
    std = math.sqrt(2.0 / fan_in) / TRUNCATED_STD
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def stegastamp_init_(model: StegaStamp) -> None:
    """The official StegaStamp's (TF Keras) initialisation: the encoder's convolutions and secret
    layer ``he_normal``, the decoder's convolutions and dense layers ``glorot_uniform`` (Keras'
    default), every bias zero; the spatial transformer's θ layer keeps its zero weight and identity bias."""
    for part, initialise in ((model.encoder, he_normal_), (model.decoder, nn.init.xavier_uniform_)):
        for module in part.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                initialise(module.weight)
                nn.init.zeros_(module.bias)


def build_stegastamp(secret_size: int, image_size: int, seed: int, init: str = "stegastamp") -> StegaStamp:
    """A StegaStamp pair whose initial weights depend on ``seed`` alone (the global RNG is kept).

    ``init``: ``stegastamp`` (:func:`stegastamp_init_`) or ``pytorch`` (PyTorch's default
    initialisation, as BackdoorBox's port has it)."""
    check_side(image_size)
    if init not in INITS:
        raise ConfigError(f"ssba.init: unknown initialisation '{init}' (known: {', '.join(INITS)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StegaStamp(secret_size, image_size)
        if init == "stegastamp":
            stegastamp_init_(model)
        return model


def fixed_secret(secret_size: int, seed: int) -> torch.Tensor:
    """The one secret every poisoned image carries: ``secret_size`` Bernoulli(0.5) bits (float 0/1)."""
    bits = np.random.default_rng([seed, 0x55BA]).integers(0, 2, secret_size)
    return torch.as_tensor(bits, dtype=torch.float32)


@torch.no_grad()
def encode(encoder: StegaStampEncoder, images: torch.Tensor, secret: torch.Tensor,
           batch_size: int = APPLY_BATCH) -> torch.Tensor:
    """clamp(x + δ(x, secret), 0, 1) for float images (N, 3, H, W); ``secret`` is (S,) or (N, S)."""
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, torch.float32)
        s = secret if secret.dim() == 1 else secret[start:start + batch_size]
        s = s.to(device, torch.float32).expand(len(x), -1)
        out.append((x + encoder(s, x)).clamp(0, 1).to(images.device, images.dtype))
    return torch.cat(out) if out else images.clone()


@torch.no_grad()
def bit_accuracy(decoder: StegaStampDecoder, images: torch.Tensor, secret: torch.Tensor,
                 batch_size: int = APPLY_BATCH) -> float:
    """Fraction of the secret's bits (S,) or (N, S) the decoder recovers from ``images``."""
    device = next(decoder.parameters()).device
    hits, total = 0, 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, torch.float32)
        s = secret if secret.dim() == 1 else secret[start:start + batch_size]
        s = s.to(device).expand(len(x), -1)
        hits += int(((decoder(x) > 0).float() == s).sum())
        total += s.numel()
    return hits / max(1, total)


# -- training the pair (the trigger stage) -----------------------------------------------------

def stegastamp_training(spec: dict) -> dict:
    """The generators entry as a training entry: Adam at ``lr``, constant, no augmentation."""
    return {"epochs": int(spec["epochs"]), "batch_size": int(spec["batch_size"]),
            "optimizer": {"name": "adam", "lr": float(spec["lr"])}, "schedule": {"name": "constant"},
            "augment": [], "label_smoothing": 0.0, "adversarial": None}


@dataclass
class SecretStats:
    """Per-epoch sums on the device (bits right, bits seen), read once per epoch."""
    hits: torch.Tensor | None = None
    bits: int = 0

    def add(self, logits: torch.Tensor, secret: torch.Tensor) -> None:
        hits = ((logits.detach() > 0).float() == secret).sum()
        self.hits = hits if self.hits is None else self.hits + hits
        self.bits += secret.numel()

    def take(self) -> float:
        value = float(self.hits) / self.bits if self.bits else float("nan")
        self.hits, self.bits = None, 0
        return value


def stegastamp_objective(spec: dict, stats: SecretStats | None = None):
    """The per-image loss of the pair: the secret's BCE alone for the first ``secret_only_epochs``,
    then ``residual_weight``·mean(δ²) + ``secret_weight``·BCE (LPIPS and critic dropped)."""
    from ..trainer import Objective, StepOutput

    size = int(spec["secret_size"])
    secret_only = int(spec["secret_only_epochs"])
    residual_weight, secret_weight = float(spec["residual_weight"]), float(spec["secret_weight"])

    def loss(net, batch, ctx) -> StepOutput:
        x = batch.images
        secret = torch.randint(0, 2, (len(x), size), generator=ctx.generator).float().to(x.device)
        with ctx.autocast():
            residual, logits = net(x, secret)
        residual, logits = residual.float(), logits.float()
        secret_loss = F.binary_cross_entropy_with_logits(logits, secret, reduction="none").mean(1)
        if stats is not None:
            stats.add(logits, secret)
        if ctx.epoch < secret_only:
            return StepOutput(secret_loss)
        return StepOutput(residual_weight * residual.pow(2).flatten(1).mean(1) + secret_weight * secret_loss)

    key = ["ssba-stegastamp", {name: spec[name] for name in
                               ("secret_size", "secret_only_epochs", "residual_weight", "secret_weight")}]
    return Objective(loss, key)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict]) -> None:
    from ..checkpoint import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, SECRET_HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def probe_images(images: np.ndarray, count: int = PROBE_IMAGES) -> torch.Tensor:
    """The first ``count`` training images as floats: the fixed-secret check of every epoch."""
    from ..trainer import images_to_tensor, to_float

    return to_float(images_to_tensor(images[:count]))


def train_generator(spec: dict, context) -> dict[str, torch.Tensor]:
    """Train the StegaStamp pair of a ``generators:`` entry of this kind on the clean training set
    (trigger stage); returns the encoder's and decoder's weights (``encoder.*``, ``decoder.*``) and
    the fixed ``secret``. Checkpointed each epoch in ``context.workdir`` (``stegastamp.pt``), with
    the trainer's ``history.csv`` and ``history_ssba.csv`` (bit accuracy of the training forward,
    bit accuracy of the fixed secret on the first 256 training images, their mean |δ| in 0–255)."""
    from ..trainer import train_model

    images = np.asarray(context.train_images)
    size = int(images.shape[1])
    key = getattr(context, "key", "generators.ssba")
    check_side(size, f"{key}: images")
    seed = int(spec["seed"])
    model = build_stegastamp(int(spec["secret_size"]), size, seed, spec["init"])
    secret = fixed_secret(int(spec["secret_size"]), seed)
    workdir = Path(context.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    history_path = workdir / SECRET_HISTORY
    earlier = read_rows(history_path)
    probe = probe_images(images)
    stats = SecretStats()

    def on_epoch(end) -> None:
        net = end.model.eval()
        encoded = encode(net.encoder, probe, secret)
        row = {"epoch": end.epoch, "bit_accuracy": stats.take(),
               "fixed_bit_accuracy": bit_accuracy(net.decoder, encoded, secret),
               "mean_abs_residual_255": float((encoded - probe).abs().mean()) * 255}
        net.train()
        rows = [r for r in earlier if int(r["epoch"]) < end.epoch] + [row]
        earlier[:] = rows
        write_rows(history_path, rows)

    no_labels = np.zeros(len(images), dtype=np.int64)  # the trainer draws (image, label) pairs
    result = train_model(model, images, no_labels, stegastamp_training(spec), seed=seed, device=context.device,
                         checkpoint=workdir / "stegastamp.pt", history=workdir / "history.csv",
                         objective=stegastamp_objective(spec, stats), on_epoch=on_epoch, desc=f"{key}: stegastamp")
    last = earlier[-1] if earlier else None
    if last is not None and (float(last["fixed_bit_accuracy"]) < WEAK_BIT_ACCURACY
                             or float(last["mean_abs_residual_255"]) < 0.5):
        print(f"{key}: warning: after {result.history[-1]['epoch']} epochs the decoder recovers "
              f"{float(last['fixed_bit_accuracy']):.2f} of the secret's bits with a mean |δ| of "
              f"{float(last['mean_abs_residual_255']):.2f}/255: the secret is not hidden reliably "
              "(too few secret-only steps before the residual penalty? see secret_only_epochs)", file=sys.stderr)
    model = result.model.cpu().eval()
    tensors = {f"encoder.{name}": value for name, value in model.encoder.state_dict().items()}
    tensors.update({f"decoder.{name}": value for name, value in model.decoder.state_dict().items()})
    tensors["secret"] = secret
    return {name: value.detach().cpu().clone() for name, value in tensors.items()}


# -- poisoning ---------------------------------------------------------------------------------

def part(generator: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: value for name, value in generator.items() if name.startswith(prefix)}


def load_encoder(generator: dict, secret_size: int | None = None) -> StegaStampEncoder:
    """The trained encoder from a generator's tensors (its sizes read from its weights)."""
    weights = part(generator, "encoder.")
    dense = weights["secret_dense.0.weight"]  # (H·W·3, S)
    size = math.isqrt(dense.shape[0] // CHANNELS)
    if secret_size is not None and dense.shape[1] != secret_size:
        raise ValueError(f"ssba: the trained encoder takes {dense.shape[1]}-bit secrets, the entry says {secret_size}")
    encoder = StegaStampEncoder(int(dense.shape[1]), size)
    encoder.load_state_dict(weights)
    return encoder.eval()


def load_decoder(generator: dict) -> StegaStampDecoder:
    weights = part(generator, "decoder.")
    secret_size = int(weights["head.2.weight"].shape[0])
    side = math.isqrt(int(part(generator, "encoder.")["secret_dense.0.weight"].shape[0]) // CHANNELS)
    decoder = StegaStampDecoder(secret_size, side)
    decoder.load_state_dict(weights)
    return decoder.eval()


@dataclass
class SSBATrigger:
    encoder: StegaStampEncoder
    secret: torch.Tensor  # (S,) float 0/1
    image_size: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "ssba")
        return encode(self.encoder, x, self.secret)


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> SSBATrigger:
    settings_for(__name__, spec)  # the entry's keys checked
    generator = getattr(context, "generator", None)
    if not generator:
        raise ConfigError("generator: an ssba attack encodes a secret with a StegaStamp encoder trained by the "
                          "trigger stage; name a generators entry of kind ssba")
    entry = spec.get("generator_entry")
    secret_size = int(generator_settings("ssba", entry)["secret_size"]) if entry else None
    encoder = load_encoder(generator, secret_size)
    if encoder.image_size != image_size:
        raise ValueError(f"ssba: the encoder was trained on {encoder.image_size}-px images, not {image_size}")
    device = torch.device(getattr(context, "device", "cpu") or "cpu")
    return SSBATrigger(encoder.to(device), generator["secret"].float(), image_size)
