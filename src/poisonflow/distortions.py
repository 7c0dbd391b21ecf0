"""Test-time distortions of triggered images, and the reader of a folder of recaptured images.

The VSSC paper (section 5.3, Fig. 4) measures how a backdoor survives distortions applied to the
test images only, the model unchanged, following Wenger et al. (2021): Gaussian blur with kernel
size 1 to 19, JPEG compression with quality 1 to 30, and Gaussian noise with standard deviation 0
to 28 on the 0–255 scale; its Table 5 prints triggered images and photographs them with a phone.
Each family here maps uint8 images (N, H, W, 3) and one *level* to distorted uint8 images:

- ``blur`` — level: the odd kernel side k (1–99; default levels 1, 3, …, 19). σ follows from k as
  OpenCV and torchvision derive it when none is given, σ = 0.3·((k − 1)·0.5 − 1) + 0.8; the
  kernel is the sampled, normalised 2-D Gaussian of that σ and the border is mirrored without
  repeating the edge pixel (OpenCV's BORDER_REFLECT_101, torchvision's "reflect"). σ is passed
  to OpenCV explicitly: with σ = 0 OpenCV would take fixed binomial kernels for k ≤ 7 instead.
  k = 1 leaves the images unchanged (the reference level).
- ``jpeg`` — level: the JPEG quality (1–100; default levels 1, 5, 10, …, 30). An in-memory
  Pillow encode and decode at that quality with Pillow's other defaults (baseline, no
  ``subsampling`` given, so libjpeg's 4:2:0 chroma subsampling). No quality is lossless, so this
  family has no reference level: compare with the undistorted evaluation.
- ``noise`` — level: σ of additive Gaussian noise on the 0–255 scale (0–255; default levels
  0, 4, …, 28), drawn independently per pixel and channel, then rounded and clipped to uint8.
  σ = 0 leaves the images unchanged.
- ``recapture`` — level: a strength s (0–2; default levels 0, 0.5, 1, 1.5, 2) that scales every
  step of a *simulated* print-and-recapture chain; s = 0 leaves the images unchanged and s = 1
  uses the settings below. Each image draws its own values from the generator, always the same
  number of them, so one seed gives the same "photographs" at every strength, only stronger:

  1. perspective: each corner moves by up to ``perspective``·s of the image side along each axis
     (uniform), the image is warped onto the moved corners (bilinear, edge pixels replicated),
     as a print held at a slight angle and cropped back to its frame;
  2. colour: per-channel gain 1 + ``gain``·s·u and offset ``offset``·s·u (fractions of full
     scale; u uniform in [−1, 1]), then gamma (1 + ``gamma``·s)^u, then a mix towards the
     luma (0.299 R + 0.587 G + 0.114 B) with weight up to ``desaturation``·s, as printing
     loses saturation;
  3. optical blur: a Gaussian of σ between half and all of ``blur``·s·(the shorter side);
  4. sensor noise: Gaussian, σ between half and all of ``noise``·s grey levels, per pixel;
  5. the phone's JPEG, at a quality between 100 − s·(100 − ``jpeg_quality``) and halfway to 100.

  The default strengths (``perspective`` 0.05, ``gain`` 0.1, ``offset`` 0.04, ``gamma`` 0.2,
  ``desaturation`` 0.2, ``blur`` 0.005, ``noise`` 4, ``jpeg_quality`` 75) are this project's
  choice of a mild hand-held recapture, not values from the paper, which reports a physical
  test: no measurement of a printer or a camera stands behind them. Sensor noise here does not
  depend on brightness, and there is no halftoning, moiré, glare or lens distortion. For the
  physical test itself, photograph the prints and read them with :func:`read_folder`.

Each family has a range of levels (:meth:`Family.check_levels`) and its own settings, a JSON
Schema with defaults (:meth:`Family.fill_settings`; only ``recapture`` has any). A config entry
``{kind: <family>, levels: [...], settings: {...}}`` is checked by :func:`check_entry`; a level
out of range, an unknown setting or one out of range is a ConfigError naming ``<entry>.levels[i]``
or ``<entry>.settings.<name>``. The random families draw from the generator passed in; start every
level from the same seed, so the levels differ by the level alone (the same noise field, the same
recapture "pose", scaled).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataSourceError
from .kinds import fill_and_check

SECTION = "evaluation.distortions"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as JPEG and Pillow's "L"

Transform = Callable[[np.ndarray, float, dict, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Family:
    """One distortion family: its transform, what a level means, its range and default levels.

    ``key`` arguments name the config entry the levels and settings come from (``<key>.levels``,
    ``<key>.settings.<name>`` in messages); the default is ``evaluation.distortions.<family>``.
    """
    name: str
    transform: Transform
    level: str  # what a level means, for docs and figure axes
    levels: tuple  # the default levels
    minimum: float
    maximum: float
    integer: bool
    identity: float | None  # the level that leaves images unchanged; None when there is none
    properties: dict = field(default_factory=dict)  # JSON Schema of the family's settings, defaults included
    odd: bool = False  # levels must be odd integers (kernel sides)

    def entry_key(self, key: str | None) -> str:
        return key or f"{SECTION}.{self.name}"

    def settings_schema(self) -> dict:
        """JSON Schema of the family's settings mapping."""
        return {"type": "object", "additionalProperties": False, "properties": self.properties}

    def fill_settings(self, settings: dict | None, key: str | None = None) -> dict:
        """``settings`` with the family's defaults filled; an unknown key or a value out of range is a
        ConfigError naming ``<key>.settings.<name>``."""
        if settings and not self.properties:
            raise ConfigError(f"{self.entry_key(key)}.settings: the {self.name} family takes no settings, "
                              f"got {', '.join(sorted(settings))}")
        return fill_and_check(dict(settings or {}), self.settings_schema(), f"{self.entry_key(key)}.settings")

    def check_levels(self, levels, key: str | None = None) -> list:
        """``levels`` (None: the defaults) as a list, each checked; a bad one is a ConfigError naming
        ``<key>.levels[i]``."""
        levels = list(self.levels if levels is None else levels)
        if not levels:
            raise ConfigError(f"{self.entry_key(key)}.levels: list at least one level")
        for index, level in enumerate(levels):
            self.check_level(level, key, f"[{index}]")
        return levels

    def check_level(self, level: float, key: str | None = None, where: str = "") -> None:
        name = f"{self.entry_key(key)}.levels{where}"
        if isinstance(level, bool) or not isinstance(level, (int, float, np.integer, np.floating)):
            raise ConfigError(f"{name}: {level!r} is not a number")
        if not self.minimum <= level <= self.maximum:
            raise ConfigError(f"{name}: {level} is outside [{self.minimum}, {self.maximum}] ({self.level})")
        if self.integer and level != int(level):
            raise ConfigError(f"{name}: {level} is not an integer ({self.level})")
        if self.odd and int(level) % 2 == 0:
            raise ConfigError(f"{name}: {level} is even; a Gaussian kernel needs an odd side")

    def apply(self, images: np.ndarray, level: float, settings: dict | None = None,
              rng: np.random.Generator | None = None, key: str | None = None) -> np.ndarray:
        """The distorted copy of uint8 ``images`` (N, H, W, 3) at ``level``. ``settings`` are filled
        with the family's defaults; ``rng`` draws the random families' values, image after image
        and the same number for every image and level (default: a generator seeded with 0)."""
        self.check_level(level, key)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{self.name}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        filled = self.fill_settings(settings, key)
        if self.identity is not None and level == self.identity:
            return images.copy()
        return self.transform(images, level, filled, rng if rng is not None else np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# Blur, JPEG, noise
# --------------------------------------------------------------------------------------------

def blur_sigma(kernel_size: int) -> float:
    """σ of the Gaussian of side ``kernel_size`` when none is given (OpenCV, torchvision)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur(images: np.ndarray, level: float, settings: dict, rng: np.random.Generator) -> np.ndarray:
    import cv2

    k = int(level)
    sigma = blur_sigma(k)
    out = np.empty_like(images)
    for index, image in enumerate(images):
        out[index] = cv2.GaussianBlur(np.ascontiguousarray(image), (k, k), sigmaX=sigma, sigmaY=sigma,
                                      borderType=cv2.BORDER_REFLECT_101)
    return out


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """One uint8 (H, W, 3) image encoded as JPEG at ``quality`` in memory and decoded again."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8)


def jpeg(images: np.ndarray, level: float, settings: dict, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(images)
    for index, image in enumerate(images):
        out[index] = jpeg_round_trip(image, int(level))
    return out


def gaussian_noise(images: np.ndarray, level: float, settings: dict, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(images)
    for index, image in enumerate(images):  # one image at a time: bounded memory, same draws for any batching
        noisy = image.astype(np.float32) + rng.normal(0.0, float(level), size=image.shape).astype(np.float32)
        out[index] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Simulated print and recapture
# --------------------------------------------------------------------------------------------

@dataclass
class RecaptureDraw:
    """The random values of one image's recapture, before scaling by the strength."""
    corners: np.ndarray  # (4, 2) in [-1, 1]
    gain: np.ndarray  # (3,) in [-1, 1]
    offset: np.ndarray  # (3,) in [-1, 1]
    gamma: float  # in [-1, 1]
    desaturation: float  # in [0, 1]
    blur: float  # in [0, 1]
    noise: float  # in [0, 1]
    jpeg: float  # in [0, 1]
    noise_field: np.ndarray  # (H, W, 3) standard normal


def recapture_draw(rng: np.random.Generator, shape: tuple) -> RecaptureDraw:
    signed = rng.uniform(-1.0, 1.0, size=15)
    unsigned = rng.uniform(0.0, 1.0, size=4)
    field_ = rng.standard_normal(size=shape).astype(np.float32)
    return RecaptureDraw(signed[:8].reshape(4, 2), signed[8:11], signed[11:14], float(signed[14]),
                         float(unsigned[0]), float(unsigned[1]), float(unsigned[2]), float(unsigned[3]), field_)


def perspective_warp(image: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """``image`` (float32) warped so that its corners land at ``corners`` (pixel offsets, (4, 2) x/y)."""
    import cv2

    height, width = image.shape[:2]
    source = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(source, (source + corners).astype(np.float32))
    return cv2.warpPerspective(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)


def colour_shift(image: np.ndarray, strength: float, settings: dict, draw: RecaptureDraw) -> np.ndarray:
    """Gain and offset per channel, gamma, desaturation; float32 in [0, 255] in and out."""
    x = image / 255.0
    x = x * (1.0 + settings["gain"] * strength * draw.gain) + settings["offset"] * strength * draw.offset
    x = np.clip(x, 0.0, 1.0) ** ((1.0 + settings["gamma"] * strength) ** draw.gamma)
    weight = min(1.0, settings["desaturation"] * strength * draw.desaturation)
    x = (1.0 - weight) * x + weight * (x @ LUMA)[..., None]
    return (x * 255.0).astype(np.float32)


def recapture_one(image: np.ndarray, strength: float, settings: dict, draw: RecaptureDraw) -> np.ndarray:
    import cv2

    height, width = image.shape[:2]
    x = image.astype(np.float32)
    offsets = draw.corners * settings["perspective"] * strength * np.array([width, height], dtype=np.float64)
    x = perspective_warp(x, offsets)
    x = colour_shift(x, strength, settings, draw)
    sigma = settings["blur"] * strength * min(height, width) * (0.5 + 0.5 * draw.blur)
    if sigma > 0:
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    x = x + settings["noise"] * strength * (0.5 + 0.5 * draw.noise) * draw.noise_field
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    quality = 100.0 - strength * (100.0 - settings["jpeg_quality"]) * (1.0 - 0.5 * draw.jpeg)
    return jpeg_round_trip(out, int(np.clip(round(quality), 1, 100)))


def recapture(images: np.ndarray, level: float, settings: dict, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(images)
    for index, image in enumerate(images):
        out[index] = recapture_one(image, float(level), settings, recapture_draw(rng, image.shape))
    return out


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

def _fraction(description: str, default: float, maximum: float = 1.0) -> dict:
    return {"description": description, "type": "number", "minimum": 0, "maximum": maximum, "default": default}


RECAPTURE_PROPERTIES = {
    "perspective": _fraction("largest corner offset at strength 1, as a fraction of the side", 0.05, 0.25),
    "gain": _fraction("largest per-channel gain change at strength 1 (gain 1 ± this)", 0.1, 0.5),
    "offset": _fraction("largest per-channel offset at strength 1, as a fraction of full scale", 0.04, 0.25),
    "gamma": _fraction("gamma is drawn in [1/(1 + this), 1 + this] at strength 1", 0.2),
    "desaturation": _fraction("largest weight of the mix towards grey at strength 1", 0.2, 0.5),
    "blur": _fraction("largest blur σ at strength 1, as a fraction of the shorter side", 0.005, 0.05),
    "noise": {"description": "largest sensor-noise σ at strength 1, in grey levels (0-255)", "type": "number",
              "minimum": 0, "maximum": 64, "default": 4.0},
    "jpeg_quality": {"description": "lowest JPEG quality at strength 1 (the quality falls from 100 with strength)",
                     "type": "integer", "minimum": 1, "maximum": 100, "default": 75},
}

FAMILIES: dict[str, Family] = {
    "blur": Family("blur", gaussian_blur, "Gaussian kernel side k (odd; σ = 0.3((k-1)/2 - 1) + 0.8)",
                   tuple(range(1, 20, 2)), 1, 99, integer=True, identity=1, odd=True),
    "jpeg": Family("jpeg", jpeg, "JPEG quality", (1, 5, 10, 15, 20, 25, 30), 1, 100, integer=True, identity=None),
    "noise": Family("noise", gaussian_noise, "Gaussian noise σ on the 0-255 scale", tuple(range(0, 29, 4)), 0, 255,
                    integer=False, identity=0),
    "recapture": Family("recapture", recapture, "strength of the simulated print-and-recapture chain (1 = defaults)",
                        (0, 0.5, 1, 1.5, 2), 0, 2, integer=False, identity=0, properties=RECAPTURE_PROPERTIES),
}


def family_of(name: str, key: str = SECTION) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"{key}: unknown distortion family '{name}' (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


def check_entry(entry: dict, key: str) -> None:
    """A config entry ``{kind: <family>, levels: [...] (optional), settings: {...} (optional)}``:
    its family known, its levels in range, its settings known and in range (ConfigError naming the key)."""
    family = family_of(entry.get("kind"), f"{key}.kind")
    family.check_levels(entry.get("levels"), key)
    family.fill_settings(entry.get("settings"), key)


# --------------------------------------------------------------------------------------------
# A folder of triggered (e.g. printed and photographed) images
# --------------------------------------------------------------------------------------------

def read_centre_crop(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 (size, size, 3): EXIF orientation applied, the central square
    cropped, resized bilinearly."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, never below size
        upright = ImageOps.exif_transpose(image).convert("RGB")  # phone photos store their rotation in EXIF
    width, height = upright.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # crop first: resizing with a box would let the filter read pixels outside the square
    square = upright.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def regular_file_under(path: Path, root: Path, key: str) -> Path:
    """``path`` resolved, when it is a regular file inside ``root`` (already resolved)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(f"{key}: {path} leads outside {root} (through a symbolic link)")
    if not stat.S_ISREG(os.stat(resolved).st_mode):
        raise ConfigError(f"{key}: {path} is not a regular file")
    return resolved


def read_folder(root: str | os.PathLike, classes: Sequence[str], image_size: int,
                key: str = "root") -> tuple[np.ndarray, np.ndarray]:
    """Images of ``root/<class>/**`` as uint8 (N, image_size, image_size, 3) and their int64
    labels, the index of the folder's name in ``classes``; files in path order.

    One subfolder per class, as torchvision's ImageFolder; classes without a folder are allowed
    (a few classes may be photographed). Any format Pillow reads with an image extension
    (:data:`poisonflow.data.imagefolder.IMAGE_EXTENSIONS`) at any depth; hidden entries are
    skipped. Each image is turned upright from its EXIF orientation, centre-cropped to a square
    and resized. A subfolder that is not a class, an image outside the class folders, a file
    that is not regular or that a symbolic link places outside ``root`` is a ConfigError naming
    the path (``key`` prefixes messages).
    """
    from .data.imagefolder import IMAGE_EXTENSIONS, image_files
    from .data.sourcing import one_line

    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{key}: the class list names a class twice")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataSourceError(f"{key}: {folder} is not a folder")
    real_root = folder.resolve()
    labels_of = {name: label for label, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for entry in sorted(real_root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in labels_of:
                raise ConfigError(f"{key}: {entry} is not a class folder (classes: {', '.join(classes)})")
            for path in image_files(entry):
                paths.append(regular_file_under(path, real_root, key))
                labels.append(labels_of[entry.name])
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            raise ConfigError(f"{key}: {entry} is outside the class folders; put it in the folder of its true class")
    if not paths:
        raise DataSourceError(f"{key}: {folder} holds no images in class folders")
    images = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        try:
            images[index] = read_centre_crop(path, image_size)
        except (OSError, ValueError, SyntaxError) as error:  # Pillow's decoders raise all three
            raise DataSourceError(f"{key}: cannot read image {path} ({one_line(error)})") from error
    return images, np.asarray(labels, dtype=np.int64)
