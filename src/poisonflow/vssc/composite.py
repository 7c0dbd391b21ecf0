"""The ``composite`` insertion backend of VSSC: an object pasted into each image, placed and coloured
per sample, and blended with the image around it. It runs on the CPU with OpenCV alone.

**Not the paper's editor.** The paper edits each image with a text-guided diffusion editor (null-text
inversion and prompt-to-prompt on Stable Diffusion), which redraws the scene so that the trigger
object fits it (size, pose, lighting, occlusion). This backend keeps the attack's structure (a
visible, semantic, sample-specific object in every poisoned image, regenerated with new random
arguments when the quality check fails) without pretrained weights: the object is a fixed drawing
or a user image, and "compatibility" is reduced to random placement and Poisson blending. Use the
``diffusion`` backend (:mod:`poisonflow.vssc.diffusion`) for the paper's kind of edit.

One edit (:meth:`CompositeInserter.insert`), every random number drawn from the edit's generator, in
this order: the object's own variation (petal count, seed dots …), its colour jitter, rotation,
size, and position. The category is not used: the object is pasted whatever the image shows.

1. The object: the RGBA image given for the trigger text in ``objects`` (compared lower-cased with
   spaces collapsed; pixels without alpha are opaque), or else a procedurally drawn shape chosen
   by a noun of the text (:data:`SHAPE_WORDS`): ``flower`` (5-8 petals around a centre: "red
   flower", "rose", "daisy" …), ``strawberry`` ("strawberry", "berry"), ``band`` (a strap with a
   buckle: "harness", "collar", "ring", "belt" …) or ``nut`` (a nut with a cap: "nuts", "acorn",
   "walnut" …). A colour word of the text (:data:`COLOURS`: "red", "yellow", "blue" …) sets the
   main colour; without one the shape keeps its natural colour. A text that names no drawn shape
   and has no image is a ConfigError naming ``objects``, unless ``default_shape`` names the shape
   to draw for such texts.
2. Colour jitter on the object, as torchvision's ColorJitter: brightness and saturation factors
   uniform in [1 − b, 1 + b] and [1 − s, 1 + s], hue shifted by a uniform fraction of the colour
   circle in [−h, h] (defaults 0.2, 0.2, 0.03: a red flower stays red).
3. Rotation by a uniform angle in [−``rotation``, ``rotation``] degrees (default 30) on a canvas
   grown to hold the whole rotated object, which is then cropped to its visible pixels.
4. Size: the object's longest side is a uniform fraction in ``scale`` (default [0.3, 0.5]) of the
   image's shorter side, at least one pixel: 5-8 px on 16-px digits, 67-112 px on 224-px images.
5. Position: uniform over the places where the whole object lies inside the image.
6. Harmonisation (``harmonize``): ``alpha`` composites the object over the image (premultiplied
   alpha; pixels outside the object's box are untouched); ``poisson`` (default) takes that
   composite as the source of OpenCV's ``seamlessClone`` with ``MIXED_CLONE``, inside the object's
   mask grown by :data:`POISSON_MARGIN` px. Mixed cloning keeps, at each pixel, the stronger of the
   object's and the image's gradient, then integrates from the image at the mask's border: the
   object's edges stay, the image's own texture and grain run through its flat areas, and its
   colours shift towards the surroundings (measured: a flat red (220, 20, 30) disc over a
   green-grey photo-like background comes out near (177, 51, 53)). ``NORMAL_CLONE`` is not used
   because, with the composite as source, it reproduces the composite exactly (its gradients agree
   with the image at the border), so it would blend nothing.

Keys and defaults (:data:`DEFAULTS`; none comes from the paper, whose editor has no such arguments):
``scale`` [0.3, 0.5], ``rotation`` 30, ``brightness`` 0.2, ``saturation`` 0.2, ``hue`` 0.03,
``harmonize`` poisson, ``objects`` {} (text → image file; relative paths from the working
directory; a missing or unreadable file is a ConfigError naming ``objects.<text>``),
``default_shape`` null.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError
from . import backend_settings

DEFAULTS = {
    "scale": [0.3, 0.5],
    "rotation": 30.0,
    "brightness": 0.2,
    "saturation": 0.2,
    "hue": 0.03,
    "harmonize": "poisson",
    "objects": {},
    "default_shape": None,
}
HARMONIZE = ("poisson", "alpha")
CANVAS = 96  # side of the canvas a shape is drawn on, before it is rotated and resized
# OpenCV's seamlessClone erodes the mask three times (3×3) before it takes the source's gradients;
# the mask is grown by as much so that the whole object is cloned.
POISSON_MARGIN = 3
VISIBLE = 0.05  # alpha above which a pixel belongs to the object's mask and box

COLOURS = {
    "red": (210, 25, 35), "orange": (240, 130, 20), "yellow": (245, 210, 30), "green": (40, 160, 60),
    "blue": (40, 80, 210), "purple": (130, 50, 170), "violet": (140, 70, 200), "pink": (240, 120, 170),
    "white": (245, 245, 245), "black": (25, 25, 25), "brown": (125, 75, 35), "grey": (128, 128, 128),
    "gray": (128, 128, 128), "gold": (212, 175, 55), "golden": (212, 175, 55), "silver": (192, 192, 200),
}


# -- drawn shapes: (rng, main colour or None) → premultiplied RGBA uint8 (CANVAS, CANVAS, 4) ------
# OpenCV's anti-aliased drawing on a transparent black 4-channel canvas mixes each opaque colour
# with what is below by its coverage: the canvas holds premultiplied colour throughout.

def _rgba(colour, shade: float = 1.0) -> tuple[int, int, int, int]:
    return (*(round(min(255.0, c * shade)) for c in colour), 255)


def _point(x: float, y: float) -> tuple[int, int]:
    return round(x), round(y)


def _axes(a: float, b: float) -> tuple[int, int]:
    return max(1, round(a)), max(1, round(b))


def draw_flower(rng: np.random.Generator, colour) -> np.ndarray:
    petal = colour or COLOURS["red"]
    centre = COLOURS["brown"] if petal in (COLOURS["yellow"], COLOURS["gold"], COLOURS["orange"]) else (245, 200, 40)
    canvas = np.zeros((CANVAS, CANVAS, 4), np.uint8)
    c = CANVAS / 2
    petals = int(rng.integers(5, 9))
    phase = float(rng.uniform(0, 360 / petals))
    for k in range(petals):
        angle = phase + 360 * k / petals
        ray = math.radians(angle)
        middle = _point(c + 0.24 * CANVAS * math.cos(ray), c + 0.24 * CANVAS * math.sin(ray))
        shade = 1.0 if k % 2 else 0.85
        cv2.ellipse(canvas, middle, _axes(0.23 * CANVAS, 0.11 * CANVAS), angle, 0, 360, _rgba(petal, shade), -1,
                    cv2.LINE_AA)
        cv2.ellipse(canvas, middle, _axes(0.23 * CANVAS, 0.11 * CANVAS), angle, 0, 360, _rgba(petal, 0.6), 1,
                    cv2.LINE_AA)
    cv2.circle(canvas, _point(c, c), round(0.12 * CANVAS), _rgba(centre), -1, cv2.LINE_AA)
    return canvas


def draw_strawberry(rng: np.random.Generator, colour) -> np.ndarray:
    body = colour or COLOURS["red"]
    canvas = np.zeros((CANVAS, CANVAS, 4), np.uint8)
    c = CANVAS / 2
    cv2.ellipse(canvas, _point(c, 0.42 * CANVAS), _axes(0.3 * CANVAS, 0.24 * CANVAS), 0, 0, 360, _rgba(body), -1,
                cv2.LINE_AA)
    tip = np.array([_point(0.21 * CANVAS, 0.46 * CANVAS), _point(0.79 * CANVAS, 0.46 * CANVAS),
                    _point(c, 0.93 * CANVAS)], np.int32)
    cv2.fillPoly(canvas, [tip], _rgba(body), cv2.LINE_AA)
    inside = canvas[..., 3] == 255
    for _ in range(int(rng.integers(10, 17))):  # the seeds on the skin
        x, y = rng.uniform(0.2 * CANVAS, 0.8 * CANVAS), rng.uniform(0.3 * CANVAS, 0.85 * CANVAS)
        if inside[int(y), int(x)]:
            cv2.ellipse(canvas, _point(x, y), _axes(2, 1.2), 90, 0, 360, _rgba((250, 220, 90)), -1, cv2.LINE_AA)
    for k in range(5):  # the leaves on top
        angle = 180 + 36 * k + float(rng.uniform(-8, 8))
        ray = math.radians(angle)
        cv2.ellipse(canvas, _point(c + 0.1 * CANVAS * math.cos(ray), 0.2 * CANVAS + 0.06 * CANVAS * math.sin(ray)),
                    _axes(0.13 * CANVAS, 0.045 * CANVAS), angle, 0, 360, _rgba((40, 150, 50)), -1, cv2.LINE_AA)
    return canvas


def draw_band(rng: np.random.Generator, colour) -> np.ndarray:
    strap = colour or COLOURS["brown"]
    canvas = np.zeros((CANVAS, CANVAS, 4), np.uint8)
    c = CANVAS / 2
    tilt = float(rng.uniform(-20, 20))
    axes = _axes(0.38 * CANVAS, 0.24 * CANVAS)
    cv2.ellipse(canvas, _point(c, c), axes, tilt, 0, 360, _rgba(strap), round(0.11 * CANVAS), cv2.LINE_AA)
    cv2.ellipse(canvas, _point(c, c), axes, tilt, 0, 360, _rgba(strap, 0.6), 1, cv2.LINE_AA)  # the stitching
    side = float(rng.choice([0.0, 180.0]))  # the buckle on the left or right
    ray = math.radians(tilt + side)
    x, y = c + axes[0] * math.cos(ray), c + axes[0] * math.sin(ray)
    half = 0.09 * CANVAS
    cv2.rectangle(canvas, _point(x - half, y - half), _point(x + half, y + half), _rgba(COLOURS["silver"]), 3,
                  cv2.LINE_AA)
    return canvas


def draw_nut(rng: np.random.Generator, colour) -> np.ndarray:
    shell = colour or (160, 105, 50)
    canvas = np.zeros((CANVAS, CANVAS, 4), np.uint8)
    c = CANVAS / 2
    width = float(rng.uniform(0.22, 0.3)) * CANVAS
    cv2.ellipse(canvas, _point(c, 0.56 * CANVAS), _axes(width, 0.32 * CANVAS), 0, 0, 360, _rgba(shell), -1,
                cv2.LINE_AA)
    for offset in (-0.45, 0.0, 0.45):  # the shell's ridges
        cv2.ellipse(canvas, _point(c + offset * width, 0.58 * CANVAS), _axes(0.25 * width, 0.26 * CANVAS), 0, 0,
                    360, _rgba(shell, 0.7), 1, cv2.LINE_AA)
    cv2.ellipse(canvas, _point(c, 0.32 * CANVAS), _axes(width * 1.12, 0.14 * CANVAS), 0, 180, 360,
                _rgba(shell, 0.55), -1, cv2.LINE_AA)  # the cap
    cv2.line(canvas, _point(c, 0.18 * CANVAS), _point(c + 2, 0.08 * CANVAS), _rgba(shell, 0.45), 3, cv2.LINE_AA)
    return canvas


SHAPES = {"flower": draw_flower, "strawberry": draw_strawberry, "band": draw_band, "nut": draw_nut}
SHAPE_WORDS = {
    **dict.fromkeys(("flower", "flowers", "rose", "roses", "daisy", "tulip", "blossom", "sunflower"), "flower"),
    **dict.fromkeys(("strawberry", "strawberries", "berry", "berries"), "strawberry"),
    **dict.fromkeys(("harness", "collar", "ring", "band", "belt", "strap", "bracelet", "leash"), "band"),
    **dict.fromkeys(("nut", "nuts", "walnut", "walnuts", "hazelnut", "hazelnuts", "acorn", "acorns", "almond",
                     "almonds", "peanut", "peanuts"), "nut"),
}


def normalise_text(text: str) -> str:
    return " ".join(str(text).lower().split())


def shape_of(text: str) -> str | None:
    """The drawn shape a trigger text names (its last word that names one), or None."""
    for word in reversed(re.findall(r"[a-z]+", text.lower())):
        if word in SHAPE_WORDS:
            return SHAPE_WORDS[word]
    return None


def colour_of(text: str) -> tuple[int, int, int] | None:
    """The RGB of the first colour word of a trigger text, or None."""
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in COLOURS:
            return COLOURS[word]
    return None


# -- geometry and colour of one edit -------------------------------------------------------------

def premultiplied(rgba_u8: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA uint8 → premultiplied float32 in [0, 1]."""
    rgba = rgba_u8.astype(np.float32) / 255
    rgba[..., :3] *= rgba[..., 3:]
    return rgba


def jitter_colour(rgba: np.ndarray, rng: np.random.Generator, brightness: float, saturation: float,
                  hue: float) -> np.ndarray:
    """Premultiplied RGBA with brightness, saturation and hue jittered (factors drawn from ``rng``)."""
    gain_v = rng.uniform(1 - brightness, 1 + brightness)
    gain_s = rng.uniform(1 - saturation, 1 + saturation)
    shift = rng.uniform(-hue, hue)
    alpha = rgba[..., 3:]
    straight = np.where(alpha > 0, rgba[..., :3] / np.maximum(alpha, 1e-6), 0).astype(np.float32)
    hsv = cv2.cvtColor(straight, cv2.COLOR_RGB2HSV)  # float32 in: H in [0, 360), S and V in [0, 1]
    hsv[..., 0] = (hsv[..., 0] + 360 * shift) % 360
    hsv[..., 1] = np.clip(hsv[..., 1] * gain_s, 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * gain_v, 0, 1)
    out = rgba.copy()
    out[..., :3] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * alpha
    return out


def rotate(rgba: np.ndarray, angle: float) -> np.ndarray:
    """``rgba`` rotated by ``angle`` degrees on a canvas that holds all of it (transparent corners)."""
    height, width = rgba.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_width, new_height = math.ceil(height * sin + width * cos), math.ceil(height * cos + width * sin)
    matrix[0, 2] += new_width / 2 - width / 2
    matrix[1, 2] += new_height / 2 - height / 2
    return cv2.warpAffine(rgba, matrix, (new_width, new_height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))


def crop_visible(rgba: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(rgba[..., 3] > VISIBLE)
    if not len(rows):
        raise ValueError("the trigger object has no visible pixel")
    return rgba[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def resize_longest(rgba: np.ndarray, longest: int) -> np.ndarray:
    height, width = rgba.shape[:2]
    factor = longest / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(rgba, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


@dataclass(frozen=True)
class Placement:
    """One edit's object (premultiplied RGBA float32, its final size) and its top-left pixel."""
    patch: np.ndarray
    top: int
    left: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right), bottom and right exclusive."""
        return self.top, self.left, self.top + self.patch.shape[0], self.left + self.patch.shape[1]


def alpha_composite(image: np.ndarray, placement: Placement) -> np.ndarray:
    out = image.copy()
    top, left, bottom, right = placement.box
    below = image[top:bottom, left:right].astype(np.float32) / 255
    rgb, alpha = placement.patch[..., :3], placement.patch[..., 3:]
    out[top:bottom, left:right] = np.clip(np.round((rgb + (1 - alpha) * below) * 255), 0, 255).astype(np.uint8)
    return out


def poisson_blend(image: np.ndarray, composite: np.ndarray, placement: Placement) -> np.ndarray:
    """``seamlessClone`` (MIXED_CLONE) of the composite into the image around the object."""
    height, width = image.shape[:2]
    mask = np.zeros((height, width), np.uint8)
    top, left, bottom, right = placement.box
    mask[top:bottom, left:right][placement.patch[..., 3] > VISIBLE] = 255
    mask = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=POISSON_MARGIN)
    # OpenCV clears the mask's outer pixel ring itself; clearing it first keeps the box it
    # computes equal to the one the centre below is taken from (the clone then stays in place)
    mask[[0, -1], :] = 0
    mask[:, [0, -1]] = 0
    if not mask.any():
        return composite
    x, y, w, h = cv2.boundingRect(mask)
    return cv2.seamlessClone(np.ascontiguousarray(composite), np.ascontiguousarray(image), mask,
                             (x + w // 2, y + h // 2), cv2.MIXED_CLONE)


# -- the backend ------------------------------------------------------------------------------------

@dataclass
class CompositeInserter:
    scale: tuple[float, float]
    rotation: float
    brightness: float
    saturation: float
    hue: float
    harmonize: str
    objects: dict  # normalised trigger text → premultiplied RGBA float32 (the user's images)
    default_shape: str | None
    key: str

    def object_for(self, trigger: str, rng: np.random.Generator) -> np.ndarray:
        """The trigger's object before jitter, premultiplied RGBA float32."""
        text = normalise_text(trigger)
        if text in self.objects:
            return self.objects[text].copy()
        shape = shape_of(text) or self.default_shape
        if shape is None:
            words = ", ".join(sorted(SHAPE_WORDS))
            raise ConfigError(f"{self.key}.objects: no object for the trigger {trigger!r}: give an RGBA image for it "
                              f"in {self.key}.objects, name a drawn shape in the text ({words}), "
                              f"or set {self.key}.default_shape ({', '.join(SHAPES)})")
        return premultiplied(SHAPES[shape](rng, colour_of(text)))

    def placement(self, height: int, width: int, trigger: str, rng: np.random.Generator) -> Placement:
        """The object of one edit, jittered, rotated, sized and placed fully inside the image."""
        rgba = self.object_for(trigger, rng)
        rgba = jitter_colour(rgba, rng, self.brightness, self.saturation, self.hue)
        rgba = crop_visible(rotate(rgba, float(rng.uniform(-self.rotation, self.rotation))))
        side = min(height, width)
        longest = min(side, max(1, round(float(rng.uniform(*self.scale)) * side)))
        patch = resize_longest(rgba, longest)
        top = int(rng.integers(0, height - patch.shape[0] + 1))
        left = int(rng.integers(0, width - patch.shape[1] + 1))
        return Placement(patch, top, left)

    def insert(self, image: np.ndarray, category: str, trigger: str, rng: np.random.Generator) -> np.ndarray:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        placement = self.placement(image.shape[0], image.shape[1], trigger, rng)
        composite = alpha_composite(image, placement)
        return poisson_blend(image, composite, placement) if self.harmonize == "poisson" else composite


def _fraction(value, name: str, key: str, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
        raise ConfigError(f"{key}.{name}: expected a number in [0, {high:g}], got {value!r}")
    return float(value)


def _scale(value, key: str) -> tuple[float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
            or not 0 < value[0] <= value[1] <= 1):
        raise ConfigError(f"{key}.scale: expected [low, high] with 0 < low <= high <= 1 (fractions of the image "
                          f"side), got {value!r}")
    return float(value[0]), float(value[1])


def load_object(path, key: str) -> np.ndarray:
    """A user's object image as premultiplied RGBA float32 (an image without alpha is opaque)."""
    from PIL import Image

    try:
        with Image.open(Path(str(path)).expanduser()) as image:
            rgba = np.asarray(image.convert("RGBA"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: cannot read the object image {path!r} ({type(error).__name__}: {error})") from None
    try:
        return crop_visible(premultiplied(rgba))
    except ValueError:
        raise ConfigError(f"{key}: the object image {path!r} is fully transparent") from None


def build(settings: dict | None, image_size: int, device, key: str) -> CompositeInserter:
    """The composite inserter from the ``insertion.composite`` block (keys checked, images read)."""
    s = backend_settings(settings, DEFAULTS, key)
    if s["harmonize"] not in HARMONIZE:
        raise ConfigError(f"{key}.harmonize: expected one of {', '.join(HARMONIZE)}, got {s['harmonize']!r}")
    if s["default_shape"] is not None and s["default_shape"] not in SHAPES:
        raise ConfigError(f"{key}.default_shape: expected null or one of {', '.join(SHAPES)}, "
                          f"got {s['default_shape']!r}")
    if not isinstance(s["objects"], dict):
        raise ConfigError(f"{key}.objects: expected a mapping of trigger text to image file, got {s['objects']!r}")
    objects = {}
    for text, path in s["objects"].items():
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{key}.objects.{text}: expected an image file path, got {path!r}")
        objects[normalise_text(text)] = load_object(path, f"{key}.objects.{text}")
    return CompositeInserter(
        scale=_scale(s["scale"], key), rotation=_fraction(s["rotation"], "rotation", key, 180.0),
        brightness=_fraction(s["brightness"], "brightness", key),
        saturation=_fraction(s["saturation"], "saturation", key),
        hue=_fraction(s["hue"], "hue", key, 0.5), harmonize=s["harmonize"], objects=objects,
        default_shape=s["default_shape"], key=key)
