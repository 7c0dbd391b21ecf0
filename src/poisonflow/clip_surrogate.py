"""CLIP as a zero-shot surrogate classifier: logits of images against class-name prompts.

:func:`zero_shot_classifier` loads an open_clip model and returns a :class:`ZeroShotCLIP`, a
``torch.nn.Module`` that takes float images (N, 3, H, W) in [0, 1] — like every classifier of this
project — and returns (N, K) logits, one per class name: the model's logit scale times the cosine
similarity of the image embedding and the embedding of ``prompt.format(class_name)``. Resizing to
the model's input size and normalizing with its mean and std happen inside the forward pass, so
gradients reach the pixels and perturbations are bounded in pixel space.

Weights (``clip:`` keys, defaults in the schema's ``clipModel`` definition):

- ``checkpoint``: a local weights file (a state dict as open_clip saves it: ``.bin``, ``.pt``,
  ``.safetensors``) for ``model``; it is used as is.
- otherwise ``pretrained`` names open_clip weights for ``model`` (``RN50`` + ``openai`` is the
  ResNet-50 CLIP), looked up in the Hugging Face cache (``~/.cache/huggingface/hub``, or
  ``$HF_HUB_CACHE``) without touching the network;
- ``download: true`` lets open_clip download them when they are not cached (needs network).
- ``model`` may also be ``local-dir:PATH``: a folder holding ``open_clip_config.json`` and weights,
  for architectures open_clip does not ship.

Missing weights are a one-line :class:`ConfigError` that names the key and says how to point to a
checkpoint, allow the download, or use the embedded trained surrogate instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kinds import definition_settings


# What to do instead when CLIP weights are missing; appended to the error messages.
ALTERNATIVES = "or use surrogate_kind: trained (the workflow's own surrogate, no weights needed)"

# open_clip's default file names for weights in a Hugging Face repository, preferred first.
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class ZeroShotCLIP(nn.Module):
    """Images in [0, 1] → logit_scale · cos(image embedding, prompt embedding) for each class."""

    def __init__(self, clip_model: nn.Module, text_features: torch.Tensor, preprocess: dict):
        super().__init__()
        self.clip = clip_model
        self.register_buffer("text_features", text_features)  # (K, D), unit rows
        self.register_buffer("mean", torch.tensor(preprocess["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess["std"], dtype=torch.float32).view(1, -1, 1, 1))
        self.size = as_pair(preprocess["size"])
        self.interpolation = preprocess.get("interpolation", "bicubic")

    @property
    def num_classes(self) -> int:
        return int(self.text_features.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (clip_input(x, self.size, self.interpolation) - self.mean) / self.std
        image_features = F.normalize(self.clip.encode_image(pixels), dim=-1)
        logits = self.clip.logit_scale.exp() * image_features @ self.text_features.T
        bias = getattr(self.clip, "logit_bias", None)  # sigmoid-loss CLIP variants add a bias
        return logits + bias if bias is not None else logits


def as_pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def clip_input(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Differentiable CLIP resizing: shortest side to the model's size, then a centre crop.

    For square images this is one resize to the input size. Antialiasing matters only when
    shrinking (large images); it keeps the result close to CLIP's own PIL-based preprocessing.
    """
    height, width = x.shape[-2:]
    scale = max(size[0] / height, size[1] / width)
    resized = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    if resized != (height, width):
        mode = interpolation if interpolation in ("bilinear", "bicubic") else "bicubic"
        x = F.interpolate(x, size=resized, mode=mode, align_corners=False, antialias=True)
    top, left = (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


def import_open_clip(key: str, alternatives: str = ALTERNATIVES):
    try:
        import open_clip
    except ImportError as error:  # an optional dependency: pip install "poisonflow[clip]"
        raise ConfigError(f"{key}: the CLIP surrogate needs the open_clip_torch package "
                          f"(pip install 'poisonflow[clip]'), {alternatives}") from error
    return open_clip


def cached_weights(open_clip, model: str, tag: str) -> str | None:
    """The path of ``model``/``tag`` weights in the local Hugging Face cache, or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    source = open_clip.get_pretrained_cfg(model, tag).get("hf_hub", "")
    if not source:
        return None
    repo, filename = os.path.split(source)  # "org/name/" → default file names; "org/name/file" → that file
    names = HF_WEIGHT_FILES if not filename else (str(Path(filename).with_suffix(".safetensors")), filename)
    for name in names:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):  # otherwise None, or a marker for "known to be absent"
            return found
    return None


def weights_source(open_clip, clip: dict, key: str, alternatives: str = ALTERNATIVES) -> str | None:
    """What to pass as open_clip's ``pretrained``: a weights file, a tag to download, or None (local-dir)."""
    model, tag = clip["model"], clip["pretrained"]
    if model.startswith("local-dir:"):
        return None  # open_clip reads the folder's config and weights itself
    if clip["checkpoint"]:
        path = Path(clip["checkpoint"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}.checkpoint: no weights file at {path}")
        return str(path)
    if not tag:
        raise ConfigError(f"{key}.checkpoint: {model} has no weights: set {key}.checkpoint to a weights file "
                          f"or {key}.pretrained to an open_clip tag, {alternatives}")
    if model.startswith("hf-hub:") or tag not in open_clip.list_pretrained_tags_by_model(model):
        if clip["download"]:
            return tag
        raise ConfigError(f"{key}.pretrained: open_clip has no cacheable weights '{tag}' for {model}: set "
                          f"{key}.checkpoint to a weights file, {alternatives}")
    cached = cached_weights(open_clip, model, tag)
    if cached:
        return cached
    if clip["download"]:
        return tag
    raise ConfigError(f"{key}.checkpoint: open_clip {model} '{tag}' weights are not in the local cache; set "
                      f"{key}.checkpoint to a weights file, or {key}.download: true when online, {alternatives}")


def load_clip(clip: dict, key: str = "clip", device="cpu", alternatives: str = ALTERNATIVES) -> nn.Module:
    """The open_clip model named by the ``clip:`` settings, weights loaded, eval mode, frozen;
    ``alternatives`` ends the errors: what to configure instead when the weights are missing."""
    open_clip = import_open_clip(key, alternatives)
    clip = definition_settings("clipModel", clip, key)
    source = weights_source(open_clip, clip, key, alternatives)
    # A weights file stands for the tag's weights: keep the tag's activation and preprocessing.
    tag_cfg = open_clip.get_pretrained_cfg(clip["model"], clip["pretrained"]) if clip["pretrained"] else {}
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            clip["model"], pretrained=source, device=device,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"), image_resize_mode=tag_cfg.get("resize_mode"))
    except Exception as error:  # open_clip raises RuntimeError, FileNotFoundError, ValueError, KeyError...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{key}: cannot load open_clip {clip['model']} ({first_line}); set {key}.checkpoint "
                          f"to a weights file, {alternatives}") from error
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@torch.no_grad()
def prompt_features(model: nn.Module, tokenizer, classes: list[str], prompt: str, device) -> torch.Tensor:
    """(K, D) unit-norm text embeddings of ``prompt.format(name)`` for each class name."""
    tokens = tokenizer([prompt.format(name) for name in classes]).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


def zero_shot_classifier(clip: dict | None, classes: list[str], device="cpu", key: str = "clip") -> ZeroShotCLIP:
    """A :class:`ZeroShotCLIP` over ``classes`` (names, in class-id order) from the ``clip:`` settings."""
    if not classes:
        raise ConfigError(f"{key}: the CLIP surrogate needs the class names of the dataset")
    clip = definition_settings("clipModel", clip, key)
    open_clip = import_open_clip(key)
    model = load_clip(clip, key, device)
    tokenizer = open_clip.get_tokenizer(clip["model"])
    text = prompt_features(model, tokenizer, [str(name) for name in classes], clip["prompt"], device)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    return ZeroShotCLIP(model, text, preprocess).to(device).eval()
