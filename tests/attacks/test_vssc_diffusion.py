"""VSSC's ``diffusion`` insertion backend on a tiny randomly initialised Stable Diffusion pipeline
saved to a temporary folder (no network): output shape and type, one edit per generator state,
the drawn arguments reaching the editor, and the one-line errors for missing weights and bad keys."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest

KEY = "attacks.vssc.trigger.insertion.diffusion"
TINY = {"steps": 2, "resolution": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A diffusers Stable Diffusion folder with a 3-block UNet on 16×16 latents (LEDITS++ reads its
    cross-attention at a quarter of the latent size), a 2-block VAE, a 2-layer CLIP text encoder
    and a letters-only CLIP BPE tokenizer."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_sd")
    tokens = ["<|startoftext|>", "<|endoftext|>", *string.ascii_lowercase,
              *(letter + "</w>" for letter in string.ascii_lowercase)]
    vocab_dir = root / "vocab"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab_dir), model_max_length=77)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = root / "sd"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def image16() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", ["ledits_pp", "sdedit"])
def test_insert_shape_and_one_edit_per_generator_state(tiny_sd, method):
    from poisonflow.vssc import INSERTERS

    build_diffusion = INSERTERS.get("diffusion")
    inserter = build_diffusion({"weights": str(tiny_sd), "method": method, **TINY}, 16, "cpu", KEY)
    assert inserter.pipe.safety_checker is None
    image = image16()
    first = inserter.insert(image, "dog", "red flower", np.random.default_rng(1))
    again = inserter.insert(image, "dog", "red flower", np.random.default_rng(1))
    other = inserter.insert(image, "dog", "red flower", np.random.default_rng(2))
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other).mean() > 1.0  # a retry is a new edit
    # the pipeline is loaded once per process
    assert build_diffusion({"weights": str(tiny_sd), "method": method, **TINY}, 16, "cpu", KEY).pipe is inserter.pipe


class RecordingPipe:
    """Stands in for a diffusers pipeline: records its keyword arguments, returns a grey image."""

    def __init__(self):
        self.calls = []

    def invert(self, **kwargs):
        self.calls.append(("invert", kwargs))

    def __call__(self, **kwargs):
        self.calls.append(("call", kwargs))
        size = kwargs["image"].size[0] if "image" in kwargs else 32

        class Out:
            images = np.full((1, size, size, 3), 0.5, dtype=np.float32)
        return Out()


def recorded(method: str, jitter: dict, seed: int = 3):
    import torch

    from poisonflow.vssc.diffusion import DiffusionInserter, _checked_settings

    settings = _checked_settings({"method": method, "resolution": 32, "jitter": jitter}, KEY, torch.device("cpu"))
    inserter = DiffusionInserter(RecordingPipe(), settings, KEY)
    out = inserter.insert(np.zeros((8, 12, 3), np.uint8), "cat", "harness", np.random.default_rng(seed))
    drawn = inserter.draw(np.random.default_rng(seed))
    return out, inserter.pipe.calls, drawn


def test_sdedit_gets_prompt_and_jittered_arguments():
    out, calls, drawn = recorded("sdedit", {"guidance": 0.2, "strength": 0.1})
    assert out.shape == (8, 12, 3) and out.dtype == np.uint8 and (out == 128).all()
    [(name, kwargs)] = calls
    assert name == "call"
    assert kwargs["prompt"] == "a photo of a cat with a harness"
    assert kwargs["image"].size == (32, 32)
    assert 0.8 <= drawn.guidance_factor <= 1.2 and -0.1 <= drawn.strength_offset <= 0.1
    assert kwargs["guidance_scale"] == pytest.approx(7.5 * drawn.guidance_factor)
    assert kwargs["strength"] == pytest.approx(0.8 + drawn.strength_offset)
    assert kwargs["num_inference_steps"] == 50
    assert kwargs["generator"].initial_seed() == drawn.seed


def test_ledits_pp_inverts_under_source_prompt_and_adds_the_trigger_concept():
    _, calls, drawn = recorded("ledits_pp", {"guidance": 0.0, "strength": 0.0})
    (first, invert), (second, edit) = calls
    assert (first, second) == ("invert", "call")
    assert invert["source_prompt"] == "a photo of a cat" and invert["source_guidance_scale"] == 3.5
    assert (invert["num_inversion_steps"], invert["skip"], invert["height"]) == (50, 0.1, 32)
    assert drawn.guidance_factor == 1.0 and drawn.strength_offset == 0.0
    assert edit["editing_prompt"] == ["harness"]
    assert edit["edit_guidance_scale"] == [10.0] and edit["edit_threshold"] == [0.75]


@pytest.mark.parametrize("weights", [None, "/nonexistent/sd-v1-4"])
def test_missing_weights_name_the_key_and_the_composite_backend(weights):
    from poisonflow.errors import ConfigError
    from poisonflow.vssc.diffusion import build

    with pytest.raises(ConfigError) as error:
        build({"weights": weights}, 32, "cpu", KEY)
    message = str(error.value)
    assert message.startswith(f"{KEY}.weights:") and "\n" not in message
    assert "attacks.vssc.trigger.insertion.backend: composite" in message


@pytest.mark.parametrize("settings, named", [
    ({"method": "prompt_to_prompt"}, "method"),
    ({"resolution": 48}, "resolution"),
    ({"steps": 0}, "steps"),
    ({"strength": 1.5}, "strength"),
    ({"dtype": "float16"}, "dtype"),            # half precision needs CUDA
    ({"jitter": {"guidance": 2.0}}, "jitter.guidance"),
    ({"jitter": {"seed": 1}}, "jitter.seed"),
    ({"prompt": "a {animal} with a {trigger}"}, "prompt"),
    ({"guidance": 7.5}, "guidance"),
])
def test_bad_settings_name_their_key(settings, named):
    from poisonflow.errors import ConfigError
    from poisonflow.vssc.diffusion import build

    with pytest.raises(ConfigError, match=rf"^{KEY}\.{named}:"):
        build({"weights": "/nonexistent", **settings}, 32, "cpu", KEY)
