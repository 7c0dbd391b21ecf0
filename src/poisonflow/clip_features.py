"""Off-the-shelf CLIP image features (the GSSD paper's Table 3 variant of its feature extractor).

:func:`load_image_encoder` builds an open_clip architecture by name and loads a local weights file
into it (a state dict: ``torch.load(weights_only=True)``, or safetensors); nothing is downloaded and
nothing in the file is executed. :func:`clip_encoder` turns the model into an encoder of float
images in [0, 1]: CLIP's resize and centre crop to the model's input size
(:func:`poisonflow.clip_surrogate.clip_input`), its mean/std normalization, ``encode_image`` (the
image embedding, not L2-normalized: the features are standardized per dimension afterwards).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .clip_surrogate import import_open_clip, as_pair, clip_input
from .errors import ConfigError


def read_state_dict(path: Path) -> dict:
    """The tensors of a weights file: safetensors, or a torch file loaded weights-only (a checkpoint
    that wraps its weights in ``state_dict`` is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def load_image_encoder(model: str, weights: str, key: str = "clip", device="cpu") -> nn.Module:
    """The open_clip ``model`` with the weights at ``weights``, in eval mode, frozen. ConfigError
    naming ``key.weights`` (or ``key.model``) when the file is missing, unreadable or does not fit."""
    open_clip = import_open_clip(key)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}.weights: no weights file at {path} (CLIP features read local weights only)")
    try:
        network = open_clip.create_model(model, pretrained=None, device="cpu")
    except Exception as error:  # open_clip raises RuntimeError for an unknown name
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{key}.model: open_clip cannot build '{model}' ({first_line})") from None
    try:
        state = read_state_dict(path)
        network.load_state_dict(state)
    except Exception as error:  # a pickle that is not weights only, a truncated file, other shapes, …
        message = " ".join(str(error).split())[:300]
        raise ConfigError(f"{key}.weights: {path} does not load into open_clip {model} "
                          f"({type(error).__name__}: {message})") from None
    network = network.to(device).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


def clip_encoder(network: nn.Module):
    """Float images (B, 3, H, W) in [0, 1] → (B, D) CLIP image embeddings, with the model's own
    preprocessing (input size, interpolation, mean and std)."""
    open_clip = import_open_clip("clip")
    preprocess = open_clip.get_model_preprocess_cfg(network)
    size = as_pair(preprocess["size"])
    interpolation = preprocess.get("interpolation", "bicubic")
    device = next(network.parameters()).device
    mean = torch.tensor(preprocess["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return network.encode_image((clip_input(x, size, interpolation) - mean) / std)

    return encode
