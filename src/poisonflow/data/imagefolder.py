"""Image folders: class subsets of large sets (ImageNet-30, ImageNet-Dogs, FOOD-11, VGGFace2-30, ...),
and the image-file reading that the GTSRB and Tiny-ImageNet sources share.

Layout: ``{root}/{train_dir}/<class folder>/**/<image>`` and, if ``test_dir`` is set,
``{root}/{test_dir}/<class folder>/**/<image>`` (jpg, jpeg, png, ppm, bmp, webp, tif; any depth).

- ``classes``: the class folders to use, in label order (default: every folder in ``train_dir``,
  sorted); ``class_names``: display names in the same order (default: the folder names).
- ``train_per_class`` / ``test_per_class``: how many images of each class to take (default: all).
  They are drawn at random with a stream seeded by ``split_seed`` and the class folder's name, so a
  class gets the same images whatever other classes are listed, and kept in file-name order.
- ``test_dir: null``: the test images are drawn from the class folders of ``train_dir`` too, disjoint
  from the training images (``test_per_class`` is then required) — for sets such as VGGFace2 whose
  test split holds other identities.
- ``image_size`` (default 224): every image is decoded, converted to RGB and resized to a square of
  this side with ``resize`` (default bilinear; aspect ratio is not kept, as in the papers).
- ``train_size`` / ``test_size``: stratified subsets on top, as for every source.
- ``url`` + ``md5`` + ``download: true``: fetch an archive holding ``{train_dir}/`` (and
  ``{test_dir}/``) at its top level, verify it, and extract it into ``root`` (default
  ``{cache}/imagefolder/<md5>``).

Images are decoded one batch at a time by the data stage, so memory stays bounded for any count.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import numpy as np

from ..kinds import settings_for
from ..errors import ConfigError, DataSourceError
from .archives import extract, fetch
from .base import DatasetArrays, stratified_indices, subset_counts
from .sourcing import cache_dir, one_line
from .streaming import DatasetStream, SplitStream, materialize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------
# Reading image files (shared with the GTSRB and Tiny-ImageNet sources)
# --------------------------------------------------------------------------------------------

# image_size always has a value: its default is in the fragment beside this module.
NATIVE_SIZE = None


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` at any depth, sorted by path; hidden entries are skipped."""
    found = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found += [Path(directory) / name for name in sorted(names)
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def resample_filter(mode: str):
    from PIL import Image

    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC}[mode]


def read_image(path: Path, size: int, mode: str) -> np.ndarray:
    """One image file as uint8 (size, size, 3): decoded, converted to RGB, resized."""
    from PIL import Image

    with Image.open(path) as image:
        # JPEGs can be decoded at 1/2, 1/4 or 1/8 scale (never below ``size``): far less work
        # for large photos that end up small.
        image.draft(None, (size, size))
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), resample_filter(mode))
    return np.asarray(rgb, dtype=np.uint8)


def read_images(paths: Sequence[Path], size: int, mode: str, key: str) -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        try:
            out[index] = read_image(path, size, mode)
        except (OSError, ValueError, SyntaxError) as error:  # PIL's decoders raise all three
            raise DataSourceError(f"{key}.root: cannot read image {path} ({one_line(error)})") from error
    return out


def file_split(paths: Sequence[Path], labels: np.ndarray, size: int, mode: str, key: str) -> SplitStream:
    """A split of image files with their labels, decoded one batch at a time."""
    paths = list(paths)

    def read(start: int, stop: int) -> np.ndarray:
        return read_images(paths[start:stop], size, mode, key)

    return SplitStream(np.asarray(labels, dtype=np.int64), size, read)


def subset_split(paths: Sequence[Path], labels: np.ndarray, size_key: str, spec: dict,
                 key: str) -> tuple[list[Path], np.ndarray]:
    """Apply the optional stratified ``train_size`` / ``test_size`` (``size_key``) to a file list."""
    labels = np.asarray(labels, dtype=np.int64)
    chosen = stratified_indices(labels, spec.get(size_key), int(spec.get("split_seed", 0)), f"{key}.{size_key}")
    return [paths[i] for i in chosen], labels[chosen]


# --------------------------------------------------------------------------------------------
# The imagefolder source
# --------------------------------------------------------------------------------------------

@dataclass
class FolderSplits:
    train_paths: list[Path]
    train_labels: np.ndarray
    test_paths: list[Path]
    test_labels: np.ndarray
    classes: list[str]


def archive_root(spec: dict, key: str) -> Path:
    """Where a downloaded archive goes when ``root`` is unset: a cache folder named by its MD5."""
    if not spec.get("md5"):
        raise ConfigError(f"{key}.md5: set the archive's MD5 so the download can be verified")
    return cache_dir(spec) / "imagefolder" / spec["md5"]


def locate(spec: dict, key: str = "datasets") -> tuple[str, Path]:
    """("read" | "download", root), without reading any image."""
    download = bool(spec.get("download", False))
    if spec.get("root") is None and not (download and spec.get("url")):
        raise DataSourceError(f"{key}.root is not set: point it at a folder holding "
                              f"{spec['train_dir']}/<class>/ image folders, "
                              f"or set {key}.url, {key}.md5 and {key}.download: true")
    root = archive_root(spec, key) if spec.get("root") is None else Path(spec["root"]).expanduser()
    train_folder = root / spec["train_dir"]
    if train_folder.is_dir():
        return "read", root
    if download:
        if not spec.get("url"):
            raise ConfigError(f"{key}.url: set the URL of an archive holding {spec['train_dir']}/ to download")
        if not spec.get("md5"):
            raise ConfigError(f"{key}.md5: set the archive's MD5 so the download can be verified")
        return "download", root
    raise DataSourceError(f"{key}.root: {train_folder} does not exist; point {key}.root at the folder holding "
                          f"{spec['train_dir']}/, or set {key}.url, {key}.md5 and {key}.download: true")


def prepared_root(spec: dict, key: str) -> Path:
    action, root = locate(spec, key)
    if action == "download":
        archive = root / (Path(urlparse(spec["url"]).path).name or "archive")
        fetch(spec["url"], archive, spec["md5"], spec, key, md5_key=f"{key}.md5")
        extract(archive, root, key)
        if not (root / spec["train_dir"]).is_dir():
            raise DataSourceError(f"{key}.url: {archive} holds no {spec['train_dir']}/ folder at its top level")
    return root


def class_folders(spec: dict, train_folder: Path, key: str) -> list[str]:
    classes = spec.get("classes")
    if classes is None:
        classes = sorted(entry.name for entry in train_folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        if not classes:
            raise DataSourceError(f"{key}.root: {train_folder} holds no class folders")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{key}.classes: lists a class twice")
    return list(classes)


def class_names(spec: dict, folders: list[str], key: str) -> list[str]:
    names = spec.get("class_names")
    if names is None:
        return folders
    if len(names) != len(folders):
        raise ConfigError(f"{key}.class_names: {len(names)} names for {len(folders)} classes")
    return list(names)


def class_stream(spec: dict, folder: str) -> np.random.Generator:
    """The random stream that draws one class's images: seeded by ``split_seed`` and the folder name."""
    return np.random.default_rng([int(spec.get("split_seed", 0)), zlib.crc32(folder.encode())])


def class_files(folder: Path, key: str) -> list[Path]:
    if not folder.is_dir():
        raise DataSourceError(f"{key}.classes: class folder {folder} does not exist")
    files = image_files(folder)
    if not files:
        raise DataSourceError(f"{key}.classes: class folder {folder} holds no images")
    return files


def draw(files: list[Path], count: int | None, rng: np.random.Generator, count_key: str,
         folder: Path) -> list[Path]:
    """``count`` of ``files`` at random (all if None), in file order."""
    if count is None:
        return files
    if count > len(files):
        raise DataSourceError(f"{count_key}: {count} images asked of {folder}, which has {len(files)}")
    return [files[i] for i in sorted(rng.choice(len(files), size=count, replace=False))]


def split_one_folder(files: list[Path], n_train: int | None, n_test: int, rng: np.random.Generator,
                     key: str, folder: Path) -> tuple[list[Path], list[Path]]:
    """Disjoint test and training draws from one class folder (test first, so ``n_train`` does not move it)."""
    wanted = n_test + (n_train or 0)
    if wanted > len(files) or n_test >= len(files):
        raise DataSourceError(f"{key}.test_per_class: {n_test} test + {n_train or 'the other'} training images "
                              f"asked of {folder}, which has {len(files)}")
    order = rng.permutation(len(files))
    test = sorted(order[:n_test])
    train = sorted(order[n_test:] if n_train is None else order[n_test:n_test + n_train])
    return [files[i] for i in train], [files[i] for i in test]


def class_samples(spec: dict, root: Path, folder: str, key: str) -> tuple[list[Path], list[Path]]:
    """(training files, test files) of one class."""
    rng = class_stream(spec, folder)
    train_folder = root / spec["train_dir"] / folder
    files = class_files(train_folder, key)
    test_dir = spec["test_dir"]
    if test_dir is None:
        if spec.get("test_per_class") is None:
            raise ConfigError(f"{key}.test_per_class: required when test_dir is null (the test images are "
                              f"drawn from the training folders)")
        return split_one_folder(files, spec.get("train_per_class"), spec["test_per_class"], rng, key, train_folder)
    train = draw(files, spec.get("train_per_class"), rng, f"{key}.train_per_class", train_folder)
    test_folder = root / test_dir / folder
    test = draw(class_files(test_folder, key), spec.get("test_per_class"), rng, f"{key}.test_per_class",
                test_folder)
    return train, test


def folder_splits(spec: dict, root: Path, key: str) -> FolderSplits:
    folders = class_folders(spec, root / spec["train_dir"], key)
    splits = FolderSplits([], np.zeros(0, np.int64), [], np.zeros(0, np.int64), class_names(spec, folders, key))
    train_labels, test_labels = [], []
    for label, folder in enumerate(folders):
        train, test = class_samples(spec, root, folder, key)
        splits.train_paths += train
        splits.test_paths += test
        train_labels += [label] * len(train)
        test_labels += [label] * len(test)
    splits.train_labels = np.asarray(train_labels, dtype=np.int64)
    splits.test_labels = np.asarray(test_labels, dtype=np.int64)
    return splits


def stream(spec: dict, key: str = "datasets") -> DatasetStream:
    spec = settings_for(__name__, spec, key)
    size, mode = spec["image_size"], spec["resize"]
    splits = folder_splits(spec, prepared_root(spec, key), key)
    train_paths, train_labels = subset_split(splits.train_paths, splits.train_labels, "train_size", spec, key)
    test_paths, test_labels = subset_split(splits.test_paths, splits.test_labels, "test_size", spec, key)
    return DatasetStream(file_split(train_paths, train_labels, size, mode, key),
                         file_split(test_paths, test_labels, size, mode, key), splits.classes)


def load(spec: dict, key: str = "datasets") -> DatasetArrays:
    return materialize(stream(spec, key))


def describe(spec: dict, key: str = "datasets") -> dict:
    """Class names and per-class training counts.

    With ``classes`` and ``train_per_class`` both set, these come from the config alone (no
    folder is listed: a large tree on a network disk takes a while); otherwise the class folders
    are listed as ``load`` would. Before a pending download, both must be set.
    """
    spec = settings_for(__name__, spec, key)
    action, root = locate(spec, key)
    seed = int(spec.get("split_seed", 0))
    if spec.get("classes") is not None and spec.get("train_per_class") is not None:
        folders = class_folders(spec, root / spec["train_dir"], key)
        names = class_names(spec, folders, key)
        totals = np.full(len(folders), int(spec["train_per_class"]))
    elif action == "download":
        raise ConfigError(f"{key}.classes: set classes and train_per_class, so the config can be checked "
                          f"before the archive is downloaded")
    else:
        splits = folder_splits(spec, root, key)
        names = splits.classes
        totals = np.bincount(splits.train_labels, minlength=len(names))
    counts = subset_counts(totals, spec.get("train_size"), seed, f"{key}.train_size")
    return {"classes": names, "train_counts": counts.tolist()}
