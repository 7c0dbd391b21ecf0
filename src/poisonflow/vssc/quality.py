"""Quality checks of VSSC without a detector: ``none`` (accept every edit) and ``clip`` (zero-shot CLIP).

The paper's quality assessment runs a dense captioner (GRiT) over each edited image and accepts it
when the detected objects include both the image's category object and the trigger; a failed
image is edited again with new random arguments. The ``owlvit`` backend
(:mod:`poisonflow.vssc.owlvit`) asks a detector the same question; the two here are lighter.

``none`` (:func:`build_none`, no keys): every image passes, so every image is edited once.

``clip`` (:func:`build_clip`): an open_clip model compares the edited image x with three prompts
for its category c and the trigger t. With s(x, p) the cosine similarity of the image and prompt
embeddings and τ the model's own logit scale (CLIP's learned temperature, 100 for OpenAI's
weights), two-way softmaxes give

- p_trigger = softmax(τ·[s(x, edited_prompt), s(x, category_prompt)])₀: does the image match
  "a photo of a {c} with a {t}." better than the plain "a photo of a {c}."? It passes when
  p_trigger ≥ ``threshold`` (0.5: the description with the trigger wins the comparison).
- p_category = softmax(τ·[s(x, category_prompt), s(x, trigger_prompt)])₀: is the image still
  more "a photo of a {c}." than "a photo of a {t}."? It passes when p_category ≥
  ``category_threshold`` (0.5; null skips this test). This is the paper's second condition (the
  category object is still there), which an object pasted over most of the image fails.

An image is accepted when both tests pass. The thresholds and prompt wording are this project's
choices (the paper's check is a captioner and has none); the prompts follow CLIP's "a photo of a
{}." template. Prompts are filled with :func:`poisonflow.vssc.fill_prompt` ({category}, {trigger}).

Weights, as the CLIP surrogate (:mod:`poisonflow.clip_surrogate`, whose loading functions are used):
``model`` (RN50) with ``pretrained`` (openai) read from the local Hugging Face cache, or
``checkpoint`` (a local state-dict file for ``model``), or ``model: local-dir:PATH``; ``download``
(false) lets open_clip fetch missing weights when online. Missing weights are a one-line
ConfigError naming the key. ``batch_size`` (64) images are encoded at once (memory only).
Images are resized with the model's preprocessing size (shorter side, centre crop) and normalised
with its mean and std, as :class:`poisonflow.clip_surrogate.ZeroShotCLIP` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from . import backend_settings, fill_prompt

# What to do instead when CLIP weights are missing (ends the load errors).
ALTERNATIVE = "or set quality.backend: none (no check) or owlvit"


class AcceptAll:
    """The ``none`` check: every edited image passes."""

    def check(self, images: np.ndarray, categories: list[str], trigger: str) -> np.ndarray:
        return np.ones(len(images), dtype=bool)


def build_none(settings: dict | None, device, key: str) -> AcceptAll:
    backend_settings(settings, {}, key)  # takes no keys
    return AcceptAll()


CLIP_DEFAULTS = {
    "model": "RN50",
    "pretrained": "openai",
    "checkpoint": None,
    "download": False,
    "edited_prompt": "a photo of a {category} with a {trigger}.",
    "category_prompt": "a photo of a {category}.",
    "trigger_prompt": "a photo of a {trigger}.",
    "threshold": 0.5,
    "category_threshold": 0.5,
    "batch_size": 64,
}
PROMPTS = ("edited_prompt", "category_prompt", "trigger_prompt")
WEIGHT_KEYS = ("model", "pretrained", "checkpoint", "download")


def two_way_softmax(scale: float, first, second) -> np.ndarray:
    """softmax(scale·[first, second])₀ per row: the probability of the first prompt."""
    import torch

    logits = scale * torch.stack([torch.as_tensor(first), torch.as_tensor(second)], dim=-1)
    return logits.softmax(dim=-1)[..., 0].numpy()


@dataclass
class CLIPCheck:
    model: object  # an open_clip model in eval mode
    tokenizer: object
    preprocess: dict  # open_clip's preprocessing config: size, mean, std, interpolation
    settings: dict
    device: object
    key: str
    _prompt_cache: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def encode_prompts(self, prompts: list[str]):
        """(P, D) unit-norm text embeddings (computed once per prompt)."""
        import torch
        import torch.nn.functional as F

        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                tokens = self.tokenizer(missing).to(self.device)
                features = F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()
            self._prompt_cache.update(zip(missing, features))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def encode_images(self, images: np.ndarray):
        """(N, D) unit-norm image embeddings of uint8 (N, H, W, 3) images."""
        import torch
        import torch.nn.functional as F

        from ..clip_surrogate import as_pair, clip_input

        mean = torch.tensor(self.preprocess["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        size, interpolation = as_pair(self.preprocess["size"]), self.preprocess.get("interpolation", "bicubic")
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.settings["batch_size"]):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + self.settings["batch_size"]]))
                x = chunk.to(self.device).permute(0, 3, 1, 2).float() / 255
                pixels = (clip_input(x, size, interpolation) - mean) / std
                out.append(F.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu())
        return torch.cat(out)

    def probabilities(self, images: np.ndarray, categories: list[str], trigger: str) -> dict[str, np.ndarray]:
        """p_trigger and p_category of each image (see the module's docstring)."""
        prompts = {name: [fill_prompt(self.settings[name], f"{self.key}.{name}", category=c, trigger=trigger)
                          for c in categories] for name in PROMPTS}
        image = self.encode_images(images)
        similarity = {name: (image * self.encode_prompts(texts)).sum(dim=1) for name, texts in prompts.items()}
        return {"trigger": two_way_softmax(self.scale, similarity["edited_prompt"], similarity["category_prompt"]),
                "category": two_way_softmax(self.scale, similarity["category_prompt"], similarity["trigger_prompt"])}

    def check(self, images: np.ndarray, categories: list[str], trigger: str) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0, dtype=bool)
        p = self.probabilities(images, categories, trigger)
        passed = p["trigger"] >= self.settings["threshold"]
        if self.settings["category_threshold"] is not None:
            passed &= p["category"] >= self.settings["category_threshold"]
        return passed


def _threshold(value, name: str, key: str, optional: bool = False):
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{key}.{name}: expected a probability in [0, 1]{' or null' if optional else ''}, "
                          f"got {value!r}")
    return float(value)


def clip_settings(settings: dict | None, key: str) -> dict:
    """The ``quality.clip`` block with its defaults filled and every key checked."""
    s = backend_settings(settings, CLIP_DEFAULTS, key)
    s["threshold"] = _threshold(s["threshold"], "threshold", key)
    s["category_threshold"] = _threshold(s["category_threshold"], "category_threshold", key, optional=True)
    if isinstance(s["batch_size"], bool) or not isinstance(s["batch_size"], int) or s["batch_size"] < 1:
        raise ConfigError(f"{key}.batch_size: expected a positive integer, got {s['batch_size']!r}")
    for name in PROMPTS:
        if not isinstance(s[name], str) or not s[name].strip():
            raise ConfigError(f"{key}.{name}: expected a prompt template, got {s[name]!r}")
        fill_prompt(s[name], f"{key}.{name}", category="dog", trigger="red flower")  # placeholders checked
    return s


def build_clip(settings: dict | None, device, key: str) -> CLIPCheck:
    """The CLIP check from the ``quality.clip`` block; weights from local files only (unless ``download``)."""
    from .. import clip_surrogate

    s = clip_settings(settings, key)
    open_clip = clip_surrogate.import_open_clip(key, ALTERNATIVE)
    model = clip_surrogate.load_clip({name: s[name] for name in WEIGHT_KEYS}, key, device, alternatives=ALTERNATIVE)
    return CLIPCheck(model, open_clip.get_tokenizer(s["model"]), open_clip.get_model_preprocess_cfg(model), s,
                     device, key)
