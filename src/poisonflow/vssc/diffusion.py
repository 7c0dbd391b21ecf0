"""VSSC's text-guided trigger insertion on Stable Diffusion: a real image is edited so that it
shows the text trigger ("red flower") while the rest of the picture is kept.

The paper edits with null-text inversion + prompt-to-prompt (Mokady et al. 2022): the image is
inverted by DDIM with optimised null-text embeddings, then regenerated with a prompt that names
the trigger while the source prompt's cross-attention maps are injected. Neither is in diffusers'
core pipelines (both are community pipelines, ``examples/community``), so this backend uses the
closest editors that are, chosen with ``method``:

- ``ledits_pp`` (default) — ``LEditsPPPipelineStableDiffusion`` (LEDITS++, Brack et al. 2024):
  the image is inverted exactly by LEDITS++'s DPM-Solver++ form of edit-friendly DDPM inversion
  (the noise maps that reproduce it are recorded, where null-text inversion optimises embeddings
  that reproduce it), then regenerated with semantic guidance towards ``concept`` (the trigger
  text) applied only where the concept's cross-attention and noise-estimate masks point — an
  implicit mask that, like prompt-to-prompt's attention injection, leaves the rest of the image as
  it was. It adds a concept rather than swapping a source prompt for a target prompt, which is
  what VSSC's insertion needs. This is not null-text inversion + prompt-to-prompt: results differ.
- ``sdedit`` — ``StableDiffusionImg2ImgPipeline`` (SDEdit, Meng et al. 2022): the image is noised
  to ``strength`` of the schedule and denoised under ``prompt`` with classifier-free guidance. No
  inversion and no mask: the whole image is redrawn, more so at higher strength. Kept as a simpler,
  faster alternative.

(DiffEdit is in diffusers 0.42 only among the deprecated pipelines, so it is not offered.)

Every call draws, from the ``rng`` it is given, a seed for the pipeline's ``torch.Generator``
(CPU generator, so the same seed gives the same noise on any device) and the jitter of the edit's
arguments: the guidance scale (``guidance_scale`` for sdedit, ``edit_guidance_scale`` for
ledits_pp) is multiplied by a factor uniform in [1 − jitter.guidance, 1 + jitter.guidance], and
the edit strength (``strength`` for sdedit, the mask quantile ``edit_threshold`` for ledits_pp,
where a lower threshold edits a larger region) is shifted by an offset uniform in
[−jitter.strength, +jitter.strength] and kept in range. A retry of the quality check therefore
gets a new noise and new arguments, and the same generator state the same edit. The paper only says
that arguments are "randomly adjusted" on a failure; the jitter widths are this project's choice.

The image (H, W, 3) uint8 is resized (bicubic) to ``resolution`` × ``resolution`` for the pipeline
and the edit is resized back to (H, W) by area averaging; a non-square image is stretched and
stretched back.

Keys (:data:`DEFAULTS`, and where each default comes from):

- ``weights`` (required): a local folder of a diffusers Stable Diffusion pipeline
  (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
  weights as safetensors), e.g. Stable Diffusion v1.4 as used by null-text inversion. Loaded with
  ``local_files_only=True, use_safetensors=True``; nothing is downloaded. The safety checker is
  not loaded (``safety_checker=None``): it blanks images it flags, which would make poisoned
  samples black, and its weights are not needed. LEDITS++ replaces a scheduler it does not support
  (SD's PNDM) by DPM-Solver++ (SDE, second order), as its pipeline does by itself.
- ``method``: ``ledits_pp`` (see above).
- ``steps``: 50 — the number of DDIM steps of null-text inversion / prompt-to-prompt (Mokady et
  al.'s ``NUM_DDIM_STEPS = 50``), also the diffusers LEDITS++ example's ``num_inversion_steps``.
  For sdedit, the steps of the full schedule (``strength`` × steps are run).
- ``resolution``: 512, Stable Diffusion v1's training size; a multiple of 32 (LEDITS++ requires it).
- ``dtype``: ``float32``; ``float16`` / ``bfloat16`` only on a CUDA device.
- ``prompt``: ``"a photo of a {category} with a {trigger}"`` — sdedit's target prompt, the
  target-prompt form of the paper's Figure 2 (category "dog", trigger "red flower").
- ``source_prompt``: ``"a photo of a {category}"`` — ledits_pp's inversion prompt (the source
  prompt of null-text inversion; LEDITS++ guides its inversion with it at ``source_guidance_scale``).
- ``concept``: ``"{trigger}"`` — ledits_pp's editing concept (LEDITS++ adds a concept phrase, e.g.
  the diffusers example's ``"cherry blossom"``).
- ``guidance_scale``: 7.5 — sdedit's classifier-free guidance, the scale of null-text inversion /
  prompt-to-prompt (``GUIDANCE_SCALE = 7.5``) and of diffusers' img2img default.
- ``strength``: 0.8 — sdedit's noising strength, diffusers' ``StableDiffusionImg2ImgPipeline`` default.
- ``edit_guidance_scale``: 10.0, ``edit_threshold``: 0.75, ``skip``: 0.1 — the diffusers LEDITS++
  example (``pipeline_leditspp_stable_diffusion.py``, ``EXAMPLE_DOC_STRING``: ``skip=0.1``,
  ``edit_guidance_scale=10.0, edit_threshold=0.75``); ``skip`` is the fraction of the schedule's
  first (noisiest) steps left out, so a higher value changes the image less.
- ``source_guidance_scale``: 3.5 — diffusers' ``LEditsPPPipelineStableDiffusion.invert`` default.
- ``edit_warmup_steps``: 0 — diffusers' LEDITS++ default (steps before the edit guidance starts).
- ``jitter``: ``{guidance: 0.2, strength: 0.1}`` — relative guidance jitter and absolute strength
  jitter per call (this project's choice; both 0 leave only the noise seed to change).

The pipeline is loaded once per process for each (folder, method, dtype, device) and kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from . import backend_settings, fill_prompt

DEFAULTS = {
    "weights": None,
    "method": "ledits_pp",
    "steps": 50,
    "resolution": 512,
    "dtype": "float32",
    "prompt": "a photo of a {category} with a {trigger}",
    "source_prompt": "a photo of a {category}",
    "concept": "{trigger}",
    "guidance_scale": 7.5,
    "strength": 0.8,
    "edit_guidance_scale": 10.0,
    "edit_threshold": 0.75,
    "skip": 0.1,
    "source_guidance_scale": 3.5,
    "edit_warmup_steps": 0,
    "jitter": {"guidance": 0.2, "strength": 0.1},
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (low, high, integer) for each numeric key; bounds are inclusive.
RANGES = {
    "steps": (1, 1000, True),
    "resolution": (32, 2048, True),
    "guidance_scale": (0.0, 50.0, False),
    "strength": (0.01, 1.0, False),
    "edit_guidance_scale": (0.0, 100.0, False),
    "edit_threshold": (0.0, 0.99, False),
    "skip": (0.0, 0.9, False),
    "source_guidance_scale": (0.0, 50.0, False),
    "edit_warmup_steps": (0, 1000, True),
}
JITTER_RANGES = {"guidance": (0.0, 0.9, False), "strength": (0.0, 0.5, False)}


@dataclass(frozen=True)
class EditArguments:
    """One call's drawn arguments: the noise seed, the guidance-scale factor, the strength offset."""
    seed: int
    guidance_factor: float
    strength_offset: float


def _edit_ledits_pp(pipe, image: Image.Image, prompts: dict, settings: dict, drawn: EditArguments,
                    generator: torch.Generator) -> np.ndarray:
    """LEDITS++: invert ``image`` under the source prompt, regenerate with the concept added."""
    resolution = settings["resolution"]
    pipe.invert(image=image, source_prompt=prompts["source_prompt"],
                source_guidance_scale=settings["source_guidance_scale"],
                num_inversion_steps=settings["steps"], skip=settings["skip"], generator=generator,
                height=resolution, width=resolution)
    threshold = float(np.clip(settings["edit_threshold"] + drawn.strength_offset, *RANGES["edit_threshold"][:2]))
    out = pipe(editing_prompt=[prompts["concept"]],
               edit_guidance_scale=[settings["edit_guidance_scale"] * drawn.guidance_factor],
               edit_threshold=[threshold], edit_warmup_steps=[settings["edit_warmup_steps"]],
               generator=generator, output_type="np")
    return out.images[0]


def _edit_sdedit(pipe, image: Image.Image, prompts: dict, settings: dict, drawn: EditArguments,
                 generator: torch.Generator) -> np.ndarray:
    """SDEdit: noise ``image`` to the drawn strength, denoise under the target prompt."""
    strength = float(np.clip(settings["strength"] + drawn.strength_offset, *RANGES["strength"][:2]))
    out = pipe(prompt=prompts["prompt"], image=image, strength=strength,
               num_inference_steps=settings["steps"],
               guidance_scale=settings["guidance_scale"] * drawn.guidance_factor,
               generator=generator, output_type="np")
    return out.images[0]


@dataclass(frozen=True)
class Method:
    """A diffusers pipeline class (by name) and the function that edits one image with it."""
    pipeline: str
    edit: Callable


METHODS = {
    "ledits_pp": Method("LEditsPPPipelineStableDiffusion", _edit_ledits_pp),
    "sdedit": Method("StableDiffusionImg2ImgPipeline", _edit_sdedit),
}


def _check_number(value, name: str, key: str, low, high, integer: bool):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise ConfigError(f"{key}.{name}: {value!r} is not {'an integer' if integer else 'a number'} "
                          f"in [{low}, {high}]")
    return value if integer else float(value)


def _checked_settings(settings: dict | None, key: str, device: torch.device) -> dict:
    """The block merged over :data:`DEFAULTS` with every key checked (errors name ``key.<name>``)."""
    merged = backend_settings(settings, DEFAULTS, key)
    if not isinstance(merged["jitter"], dict):
        raise ConfigError(f"{key}.jitter: expected a mapping with keys guidance, strength")
    merged["jitter"] = backend_settings(merged["jitter"], DEFAULTS["jitter"], f"{key}.jitter")
    for name, (low, high, integer) in RANGES.items():
        merged[name] = _check_number(merged[name], name, key, low, high, integer)
    for name, (low, high, integer) in JITTER_RANGES.items():
        merged["jitter"][name] = _check_number(merged["jitter"][name], name, f"{key}.jitter", low, high, integer)
    if merged["resolution"] % 32:
        raise ConfigError(f"{key}.resolution: {merged['resolution']} is not a multiple of 32")
    if merged["method"] not in METHODS:
        raise ConfigError(f"{key}.method: {merged['method']!r} is not one of {', '.join(METHODS)}")
    if merged["dtype"] not in DTYPES:
        raise ConfigError(f"{key}.dtype: {merged['dtype']!r} is not one of {', '.join(DTYPES)}")
    if merged["dtype"] != "float32" and device.type != "cuda":
        raise ConfigError(f"{key}.dtype: {merged['dtype']} needs a CUDA device (this job runs on "
                          f"{device.type}); use float32")
    for name in ("prompt", "source_prompt", "concept"):
        if not isinstance(merged[name], str) or not merged[name].strip():
            raise ConfigError(f"{key}.{name}: expected a non-empty prompt template")
        fill_prompt(merged[name], f"{key}.{name}", category="dog", trigger="red flower")
    return merged


def _weights_folder(weights, key: str) -> Path:
    """The pipeline folder named by ``weights``; missing → ConfigError naming the composite backend."""
    parent = key[: -len(".diffusion")] if key.endswith(".diffusion") else None
    alternative = (f"set {parent}.backend: composite" if parent else "use the composite insertion backend") \
        + " for the embedded CPU backend"
    if not weights:
        raise ConfigError(f"{key}.weights: required (a local folder of a diffusers Stable Diffusion "
                          f"pipeline); {alternative}")
    folder = Path(str(weights)).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"{key}.weights: no Stable Diffusion weights at {folder} (no model_index.json); "
                          f"{alternative}")
    return folder


@functools.lru_cache(maxsize=2)
def _load_pipeline(folder: str, pipeline: str, dtype: str, device: str):
    """The diffusers pipeline class ``pipeline`` from ``folder``, on ``device``, safety checker off."""
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(
        folder, local_files_only=True, use_safetensors=True, dtype=DTYPES[dtype],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class DiffusionInserter:
    """Edits the trigger into one image with a Stable Diffusion editor (see the module doc)."""

    def __init__(self, pipe, settings: dict, key: str):
        self.pipe = pipe
        self.settings = settings
        self.key = key
        self.method = METHODS[settings["method"]]

    def draw(self, rng: np.random.Generator) -> EditArguments:
        """This call's noise seed and argument jitter, all from ``rng`` (always three draws)."""
        jitter = self.settings["jitter"]
        seed = int(rng.integers(0, 2**63 - 1))
        factor = float(rng.uniform(1.0 - jitter["guidance"], 1.0 + jitter["guidance"]))
        offset = float(rng.uniform(-jitter["strength"], jitter["strength"]))
        return EditArguments(seed, factor, offset)

    def insert(self, image: np.ndarray, category: str, trigger: str, rng: np.random.Generator) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        resolution = self.settings["resolution"]
        prompts = {name: fill_prompt(self.settings[name], f"{self.key}.{name}", category=category, trigger=trigger)
                   for name in ("prompt", "source_prompt", "concept")}
        drawn = self.draw(rng)
        generator = torch.Generator("cpu").manual_seed(drawn.seed)
        resized = Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC)
        with torch.no_grad():
            edited = self.method.edit(self.pipe, resized, prompts, self.settings, drawn, generator)
        edited = (np.clip(np.asarray(edited, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return np.asarray(Image.fromarray(edited).resize((width, height), Image.Resampling.BOX))


def build(settings: dict | None, image_size, device, key: str) -> DiffusionInserter:
    """The inserter for the ``diffusion`` block ``settings`` (``image_size`` is not needed: every
    image is resized to ``resolution`` and back to its own size)."""
    device = torch.device(device)
    checked = _checked_settings(settings, key, device)
    folder = _weights_folder(checked["weights"], key)
    pipeline = METHODS[checked["method"]].pipeline
    try:
        pipe = _load_pipeline(str(folder.resolve()), pipeline, checked["dtype"], str(device))
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{key}.weights: cannot load a Stable Diffusion pipeline from {folder} "
                          f"({first})") from error
    return DiffusionInserter(pipe, checked, key)
