"""GTSRB (German Traffic Sign Recognition Benchmark): 39,209 train / 12,630 test real photos of
43 sign classes, 15 to 250 px on a side.

Layout (torchvision's, under ``root/gtsrb`` or directly under ``root``): ``GTSRB/Training/<class
00000..00042>/*.ppm``, ``GTSRB/Final_Test/Images/*.ppm`` and the test labels ``GT-final_test.csv``.
They come from three published archives (``GTSRB-Training_fixed.zip``,
``GTSRB_Final_Test_Images.zip``, ``GTSRB_Final_Test_GT.zip``), each checked against its published
MD5 before it is extracted: archives found in the folder are verified and extracted, and
``download: true`` fetches the missing ones from ``url`` (a folder URL; default the official one;
``file://`` is copied). The extracted images carry no checksums of their own.
Every image is converted to RGB and resized to ``image_size`` (default 32) with ``resize``
(default bilinear), one batch at a time.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataSourceError
from .archives import extract, fetch, join_url, verify_md5
from .base import DatasetArrays, subset_counts
from .imagefolder import file_split, image_files, subset_split
from .sourcing import cache_dir, image_size, one_line, resize_mode
from .streaming import DatasetStream, materialize

NATIVE_SIZE = 32
DEFAULT_RESIZE = "bilinear"
DEFAULT_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
FOLDER = "gtsrb"
TRAIN_FOLDER = Path("GTSRB/Training")
TEST_FOLDER = Path("GTSRB/Final_Test/Images")
TEST_LABELS = Path("GT-final_test.csv")
# Published archive → (MD5, the part of the layout it holds).
ARCHIVES = {
    "GTSRB-Training_fixed.zip": ("513f3c79a4c5141765e10e952eaa2478", TRAIN_FOLDER),
    "GTSRB_Final_Test_Images.zip": ("c7e4e6327067d32654124b0fe9e82185", TEST_FOLDER),
    "GTSRB_Final_Test_GT.zip": ("fe31e9c9270bbcd7b84b7f21a9d9d9e5", TEST_LABELS),
}
CLASSES = [
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
]
TRAIN_CLASS_TOTALS = np.array([
    210, 2220, 2250, 1410, 1980, 1860, 420, 1440, 1410, 1470, 2010, 1320, 2100, 2160, 780, 630, 420, 1110, 1200, 210,
    360, 330, 390, 510, 270, 1500, 600, 240, 540, 270, 450, 780, 240, 689, 420, 1200, 390, 210, 2070, 300, 360, 240,
    240])
TEST_CLASS_TOTALS = np.array([
    60, 720, 750, 450, 660, 630, 150, 450, 450, 480, 660, 420, 690, 720, 270, 210, 150, 360, 390, 60, 90, 90, 120,
    150, 90, 480, 180, 60, 150, 90, 150, 270, 60, 210, 120, 390, 120, 60, 690, 90, 90, 60, 90])


def base_folder(root: Path) -> Path:
    """``root`` itself if it holds the layout or the archives, else torchvision's ``root/gtsrb``."""
    if (root / "GTSRB").is_dir() or any((root / name).is_file() for name in ARCHIVES):
        return root
    return root / FOLDER


def missing_archives(base: Path) -> list[str]:
    """The archives whose part of the layout is absent."""
    return [name for name, (_, part) in ARCHIVES.items() if not (base / part).exists()]


def locate(spec: dict, key: str = "datasets") -> tuple[str, Path, list[str]]:
    """("read" | "extract" | "download", base folder, archives to fetch or extract)."""
    if spec.get("md5") is not None:
        raise ConfigError(f"{key}.md5: GTSRB's three archives are checked against their published MD5s; "
                          f"remove md5")
    download = bool(spec.get("download", False))
    if spec.get("root") is None and not download:
        raise DataSourceError(f"{key}.root is not set: point it at a folder holding GTSRB/ or the GTSRB "
                              f"archives, or set {key}.download: true")
    root = cache_dir(spec) / FOLDER if spec.get("root") is None else Path(spec["root"]).expanduser()
    base = base_folder(root)
    missing = missing_archives(base)
    if not missing:
        return "read", base, []
    if download:
        return "download", base, missing
    if all((base / name).is_file() for name in missing):
        return "extract", base, missing
    parts = ", ".join(str(ARCHIVES[name][1]) for name in missing)
    raise DataSourceError(f"{key}.root: {base} lacks {parts}; put {', '.join(missing)} there "
                          f"or set {key}.download: true")


def prepared_base(spec: dict, key: str) -> Path:
    action, base, missing = locate(spec, key)
    for name in missing:
        archive, md5 = base / name, ARCHIVES[name][0]
        if action == "download":
            fetch(join_url(spec.get("url") or DEFAULT_URL, name), archive, md5, spec, key, md5_key=f"{key}.url")
        else:
            verify_md5(archive, md5, f"{key}.root")
        extract(archive, base, key)
    return base


def class_folders(base: Path, key: str) -> list[tuple[int, Path]]:
    """(label, folder) of every ``GTSRB/Training/<5-digit class>`` folder."""
    folders = [(int(entry.name), entry) for entry in sorted((base / TRAIN_FOLDER).iterdir())
               if entry.is_dir() and entry.name.isdigit()]
    bad = [folder for label, folder in folders if label >= len(CLASSES)]
    if bad:
        raise DataSourceError(f"{key}.root: {bad[0]} is not one of the {len(CLASSES)} GTSRB classes")
    return folders


def train_samples(base: Path, key: str) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for label, folder in class_folders(base, key):
        files = image_files(folder)
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def test_samples(base: Path, key: str) -> tuple[list[Path], np.ndarray]:
    """The test images and labels listed in ``GT-final_test.csv`` (``Filename;...;ClassId``)."""
    table = base / TEST_LABELS
    try:
        with open(table, newline="") as handle:
            rows = [(row["Filename"], int(row["ClassId"])) for row in csv.DictReader(handle, delimiter=";")]
    except (OSError, KeyError, ValueError, TypeError, csv.Error) as error:
        raise DataSourceError(f"{key}.root: cannot read the test labels {table} ({one_line(error)})") from error
    bad = [label for _, label in rows if not 0 <= label < len(CLASSES)]
    if bad:
        raise DataSourceError(f"{key}.root: {table} has class {bad[0]}, outside 0..{len(CLASSES) - 1}")
    return [base / TEST_FOLDER / name for name, _ in rows], np.asarray([label for _, label in rows], dtype=np.int64)


def stream(spec: dict, key: str = "datasets") -> DatasetStream:
    size = image_size(spec, key, NATIVE_SIZE)
    mode = resize_mode(spec, key, DEFAULT_RESIZE)
    base = prepared_base(spec, key)
    train_paths, train_labels = subset_split(*train_samples(base, key), "train_size", spec, key)
    test_paths, test_labels = subset_split(*test_samples(base, key), "test_size", spec, key)
    return DatasetStream(file_split(train_paths, train_labels, size, mode, key),
                         file_split(test_paths, test_labels, size, mode, key), list(CLASSES))


def load(spec: dict, key: str = "datasets") -> DatasetArrays:
    return materialize(stream(spec, key))


def describe(spec: dict, key: str = "datasets") -> dict:
    """Class names and per-class training counts: counted from the class folders when they are
    there, else the published totals (what the verified training archive holds)."""
    action, base, _ = locate(spec, key)
    image_size(spec, key, NATIVE_SIZE)
    resize_mode(spec, key, DEFAULT_RESIZE)
    if action == "read":
        totals = np.bincount(train_samples(base, key)[1], minlength=len(CLASSES))
        test_totals = np.bincount(test_samples(base, key)[1], minlength=len(CLASSES))
    else:
        totals, test_totals = TRAIN_CLASS_TOTALS, TEST_CLASS_TOTALS
    seed = int(spec.get("split_seed", 0))
    counts = subset_counts(totals, spec.get("train_size"), seed, f"{key}.train_size")
    subset_counts(test_totals, spec.get("test_size"), seed, f"{key}.test_size")
    return {"classes": list(CLASSES), "train_counts": counts.tolist()}
