"""A tiny open_clip model for the tests of the CLIP surrogate, the CLIP features and VSSC's CLIP check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def save_tiny_clip(folder: Path, name: str):
    """A tiny ResNet CLIP registered with open_clip under ``name``, seeded random weights saved to
    ``folder/tiny.pt``: (the model in eval mode, the weights file)."""
    open_clip = pytest.importorskip("open_clip")
    (folder / f"{name}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    torch.save(model.state_dict(), folder / "tiny.pt")
    return model, folder / "tiny.pt"
