"""The ``owlvit`` quality check of VSSC: open-vocabulary detection of the category and the trigger.

The paper's quality assessment runs a dense captioner (GRiT) and accepts an edited image when its
detected objects include both the image's category object and the trigger. This backend asks the
same question of an open-vocabulary detector, OWL-ViT (or OWLv2), through transformers: each image
is queried with two texts, the category query and the trigger query, and passes when each query
has at least one predicted box whose score reaches its threshold. A detector replaces the
captioner: no caption text is generated or matched.

Scores are computed from the detector's raw output rather than with
``processor.post_process_object_detection``: the score of query q on box b is
sigmoid(logits[b, q]), and an image's score for a query is the maximum over its boxes. The
post-processing of transformers first assigns every box to its single best query, so a box could
count for the category or the trigger but never both; here each query is judged on its own. The
two detections may be the same box (a simplification: no overlap or size test).

Images are handed to the processor as PIL images; it resizes them to the detector's input size
(768 px for OWL-ViT, 960 px padded square for OWLv2), so small dataset images are upscaled.

Keys (:data:`DEFAULTS`):

- ``weights`` (required): a local folder holding a transformers OWL-ViT or OWLv2 detector and its
  processor (``save_pretrained`` of e.g. google/owlvit-base-patch32); loaded with
  ``local_files_only=True`` and ``weights_only=True`` (safetensors preferred), nothing downloaded.
- ``model_class``: ``owlvit`` (OwlViTProcessor + OwlViTForObjectDetection) or ``owlv2``
  (Owlv2Processor + Owlv2ForObjectDetection).
- ``threshold``: 0.1, the score threshold of transformers' OWL-ViT / OWLv2 post-processing and of
  the detection examples in their documentation; ``category_threshold`` / ``trigger_threshold``
  (null: ``threshold``) set one query's threshold apart. A score passes when it is ≥ the threshold.
- ``category_query`` / ``trigger_query``: "a photo of a {category}" / "a photo of a {trigger}", the
  text-query form of the OWL-ViT documentation examples ("a photo of a cat").
- ``batch_size``: 8 images per forward pass (a project choice; memory only, not results).
- ``dtype``: float32; float16 / bfloat16 for a CUDA device.

A loaded detector is kept per process (keyed by folder, class, device and dtype), so rebuilding
the check for each candidate trigger loads the weights once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from . import backend_settings, fill_prompt

DEFAULTS = {
    "weights": None,
    "model_class": "owlvit",
    "threshold": 0.1,
    "category_threshold": None,
    "trigger_threshold": None,
    "category_query": "a photo of a {category}",
    "trigger_query": "a photo of a {trigger}",
    "batch_size": 8,
    "dtype": "float32",
}

# model_class → (processor class, detector class) in transformers
MODEL_CLASSES = {
    "owlvit": ("OwlViTProcessor", "OwlViTForObjectDetection"),
    "owlv2": ("Owlv2Processor", "Owlv2ForObjectDetection"),
}
DTYPES = ("float32", "float16", "bfloat16")

_loaded: dict[tuple, tuple] = {}  # (folder, model_class, device, dtype) → (processor, model)


def query_scores(logits) -> np.ndarray:
    """(N, Q) float: per image and text query, the best box score max_b sigmoid(logits[n, b, q])
    of detector logits (N, boxes, Q)."""
    best = np.asarray(logits, dtype=np.float64).max(axis=1)
    return 1.0 / (1.0 + np.exp(-best))  # sigmoid is increasing: the max commutes with it


def passes(category_scores, trigger_scores, thresholds: tuple[float, float]) -> np.ndarray:
    """Bool (N,): the category's best score ≥ ``thresholds[0]`` and the trigger's ≥ ``thresholds[1]``."""
    category_scores = np.asarray(category_scores, dtype=np.float64)
    trigger_scores = np.asarray(trigger_scores, dtype=np.float64)
    return (category_scores >= thresholds[0]) & (trigger_scores >= thresholds[1])


def _threshold(value, name: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}.{name}: {value!r} is not a score threshold in [0, 1]")
    return float(value)


def _checked(settings: dict | None, key: str) -> dict:
    s = backend_settings(settings, DEFAULTS, key)
    if s["model_class"] not in MODEL_CLASSES:
        raise ConfigError(f"{key}.model_class: {s['model_class']!r} is not one of {', '.join(MODEL_CLASSES)}")
    if s["dtype"] not in DTYPES:
        raise ConfigError(f"{key}.dtype: {s['dtype']!r} is not one of {', '.join(DTYPES)}")
    batch = s["batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"{key}.batch_size: {batch!r} is not a positive integer")
    base = _threshold(s["threshold"], "threshold", key)
    for name in ("category_threshold", "trigger_threshold"):
        s[name] = base if s[name] is None else _threshold(s[name], name, key)
    for name, placeholder in (("category_query", "category"), ("trigger_query", "trigger")):
        if not isinstance(s[name], str):
            raise ConfigError(f"{key}.{name}: {s[name]!r} is not a text")
        fill_prompt(s[name], f"{key}.{name}", **{placeholder: "x"})  # a bad placeholder fails now
    folder = s["weights"]
    if not isinstance(folder, (str, Path)) or not (Path(folder) / "config.json").is_file():
        raise ConfigError(
            f"{key}.weights: no {s['model_class']} detector folder (config.json + weights, saved with "
            f"save_pretrained) at {folder!r}; set quality.backend: clip or none instead")
    return s


def _load(settings: dict, device, key: str):
    import torch
    import transformers

    folder = str(Path(settings["weights"]).resolve())
    cache_key = (folder, settings["model_class"], str(device), settings["dtype"])
    if cache_key not in _loaded:
        processor_name, model_name = MODEL_CLASSES[settings["model_class"]]
        try:
            processor = getattr(transformers, processor_name).from_pretrained(folder, local_files_only=True)
            model = getattr(transformers, model_name).from_pretrained(
                folder, local_files_only=True, weights_only=True, dtype=getattr(torch, settings["dtype"]))
        except (OSError, ValueError, TypeError, KeyError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(f"{key}.weights: cannot load a {settings['model_class']} detector from "
                              f"{folder} ({first_line}); set quality.backend: clip or none instead") from error
        _loaded[cache_key] = (processor, model.to(device).eval())
    return _loaded[cache_key]


class OwlVitCheck:
    """Detector-based check: ``check(images, categories, trigger)`` → bool (N,)."""

    def __init__(self, settings: dict, processor, model, key: str):
        self.settings, self.processor, self.model, self.key = settings, processor, model, key
        self.thresholds = (settings["category_threshold"], settings["trigger_threshold"])

    def scores(self, images: np.ndarray, categories: list[str], trigger: str) -> np.ndarray:
        """(N, 2) float: best box score of the category query and of the trigger query per image."""
        import torch
        from PIL import Image

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(categories) != len(images):
            raise ValueError(f"{len(categories)} categories for {len(images)} images")
        s = self.settings
        trigger_text = fill_prompt(s["trigger_query"], f"{self.key}.trigger_query", trigger=trigger)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out = np.zeros((len(images), 2), dtype=np.float64)
        for start in range(0, len(images), s["batch_size"]):
            stop = start + s["batch_size"]
            texts = [[fill_prompt(s["category_query"], f"{self.key}.category_query", category=category),
                      trigger_text] for category in categories[start:stop]]
            pictures = [Image.fromarray(image) for image in images[start:stop]]
            inputs = self.processor(text=texts, images=pictures, return_tensors="pt",
                                    padding=True, truncation=True)
            inputs = {name: value.to(device) for name, value in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.inference_mode():
                logits = self.model(**inputs).logits  # (n, boxes, 2): queries in the order of texts
            out[start:stop] = query_scores(logits.float().cpu().numpy())
        return out

    def check(self, images: np.ndarray, categories: list[str], trigger: str) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0, dtype=bool)
        scores = self.scores(images, categories, trigger)
        return passes(scores[:, 0], scores[:, 1], self.thresholds)


def build(settings: dict | None, device, key: str) -> OwlVitCheck:
    """The OWL-ViT / OWLv2 check of ``settings`` (the ``quality.owlvit`` block) on ``device``."""
    settings = _checked(settings, key)
    processor, model = _load(settings, device, key)
    return OwlVitCheck(settings, processor, model, key)
