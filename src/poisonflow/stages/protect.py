"""protect stage: new images → unlearnable ones, sample by sample, without the rest of the dataset.

``poisonflow protect`` is the streaming counterpart of the poison stage for unlearnable-example
kinds whose protection of an image needs only that image and its class (``triggerue``). It reads

- ``--input``: a folder with one subfolder per class (any image files PIL reads; grey or palette
  images are converted to RGB), or a store (its ``--split``, default ``train``);
- the attack entry: ``--spec`` (the resolved JSON the workflow passes to ``poisonflow poison``) or
  ``--config FILE --attack NAME``; ``--seed`` (the experiment seed: it draws the class triggers);
- ``--classes``: the class names in class-id order, a text file (one per line) or a store (its
  ``classes`` attribute); default: the input store's. A folder whose name is not in the list is
  refused: a new class gets its id by appending its name to the list, so ids (and with them the
  class triggers) never depend on which other classes are present;
- ``--surrogate-dir``: the trained surrogate (``model.pt``) when the entry eliminates features on it;

and writes ``--out``: a store when the name ends in ``.zarr`` (the layout of the poison stage's
protected store: ``train/images``, ``train/labels``, ``train/poisoned``, ``train/true_labels``),
otherwise a folder of PNG files (lossless, so the perturbation survives) mirroring the input's
class folders and file names.

Images are read, protected and written in chunks of the entry's ``batch_size``, through the same
:class:`~poisonflow.unlearnable.triggerue.Protector` the poison stage uses, so the output is byte
for byte what ``poisonflow poison`` produces for the same images (with ``rate: 1``), on the same
device and thread count. Every image given is protected: ``rate`` is the batch stage's choice of
which samples of a whole dataset to protect.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..attacks import UNLEARNABLE, PoisonContext
from ..errors import ConfigError, DataSourceError
from .common import SEED_HELP, THREADS_HELP, set_threads


def read_store(path):
    """:func:`poisonflow.store.read_store`, imported on use (zarr is not needed for ``--help``)."""
    from ..store import read_store as read

    return read(path)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
STORE_SUFFIX = ".zarr"
READ_BLOCK = 1024  # samples read from an input store at once


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, metavar="PATH", help="a folder of class subfolders of images, or a store")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="output: a store if the name ends in .zarr, else a folder of PNGs")
    parser.add_argument("--spec", metavar="JSON", help="the resolved attacks entry (JSON), as passed to `poisonflow poison`")
    parser.add_argument("--config", metavar="FILE", help="a config file (instead of --spec), with --attack")
    parser.add_argument("--attack", metavar="NAME", help="the attacks entry of --config")
    parser.add_argument("--name", default=None, help="attacks entry name, for messages (with --spec)")
    parser.add_argument("--seed", type=int, required=True, help=SEED_HELP + "; draws the class triggers")
    parser.add_argument("--classes", metavar="PATH", help="class names in id order: a text file (one per line) or a store")
    parser.add_argument("--split", default="train", help="split to read from an input store (default: train)")
    parser.add_argument("--surrogate-dir", metavar="DIR", help="the entry's trained surrogate (model.pt)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


@dataclass
class Sample:
    image: np.ndarray  # uint8 (H, W, 3)
    label: int
    name: str  # output path relative to a folder output, without suffix: "<class>/<stem>"
    origin: str  # where it was read from, for messages


# --- the attack entry -----------------------------------------------------------------------


def attack_entry(args) -> tuple[dict, str]:
    """(resolved attacks entry, its config key) from --spec or --config + --attack."""
    if bool(args.spec) == bool(args.config):
        raise ConfigError("--spec: give either --spec JSON or --config FILE with --attack NAME")
    if args.spec:
        try:
            spec = json.loads(args.spec)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--spec: not valid JSON ({error})") from error
        if not isinstance(spec, dict) or "kind" not in spec:
            raise ConfigError("--spec: expected an attacks entry (a JSON object with a 'kind')")
        return spec, f"attacks.{args.name or 'attack'}"
    if not args.attack:
        raise ConfigError("--attack: --config needs the name of an attacks entry")
    from .. import config as config_module

    path = Path(args.config)
    cfg = config_module.load(path)
    if args.attack not in cfg.data["attacks"]:
        known = ", ".join(sorted(cfg.data["attacks"]))
        raise ConfigError(f"--attack: no attacks entry named '{args.attack}' in {path} (known: {known})")
    return cfg.attack(args.attack), f"attacks.{args.attack}"


def streaming_kind(spec: dict, key: str):
    """The kind's module, which must protect images one chunk at a time (``prepare``)."""
    kind = spec["kind"]
    if kind not in UNLEARNABLE:
        raise ConfigError(f"{key}.kind: '{kind}' is not an unlearnable-example kind "
                          f"(known: {', '.join(UNLEARNABLE.names())})")
    module = UNLEARNABLE.get(kind, key=f"{key}.kind")
    if "per-sample" not in UNLEARNABLE.fragment(kind).capabilities:
        raise ConfigError(f"{key}.kind: '{kind}' crafts its perturbations from the whole dataset and cannot "
                          f"protect new images one by one; use a per-sample kind such as triggerue")
    return module


# --- classes and inputs ---------------------------------------------------------------------


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def class_names(classes_arg: str | None, input_path: Path) -> list[str]:
    """Class names in id order from --classes (text file or store), else from the input store."""
    if classes_arg:
        path = Path(classes_arg)
        if is_store(path):
            return [str(name) for name in read_store(path).attrs.get("classes", [])]
        if not path.is_file():
            raise ConfigError(f"--classes: no class list at {path} (a text file, one name per line, or a store)")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if is_store(input_path):
        names = read_store(input_path).attrs.get("classes")
        if names:
            return [str(name) for name in names]
        raise ConfigError(f"--classes: the store {input_path} has no 'classes' attribute; give the class list")
    raise ConfigError("--classes: a folder input needs the class list in id order (a text file, one name per "
                      "line, or the dataset's store); a new class is a name appended to it")


def read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise DataSourceError(f"{path}: cannot read as an image ({error})") from error


def folder_samples(root: Path, classes: list[str]) -> Iterator[Sample]:
    """The images of ``root/<class>/`` in sorted order, one at a time, labelled by the class list."""
    if not root.is_dir():
        raise DataSourceError(f"{root}: no such folder")
    ids = {name: index for index, name in enumerate(classes)}
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        raise DataSourceError(f"{root / stray[0]}: images must be in class subfolders ({root}/<class>/)")
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in ids:
            raise ConfigError(f"--classes: class folder '{folder.name}' ({folder}) is not in the class list; "
                              f"append it to the list to give the new class an id")
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            yield Sample(read_image(path), ids[folder.name], f"{folder.name}/{path.stem}", str(path))


def store_samples(path: Path, split: str, classes: list[str]) -> Iterator[Sample]:
    """The samples of ``split`` of a store, read block by block, in store order."""
    store = read_store(path)
    images, labels = store.array(f"{split}/images"), store[f"{split}/labels"]
    if len(labels) and int(labels.max()) >= len(classes):
        raise ConfigError(f"--classes: {path} has label {int(labels.max())} but the class list has {len(classes)} names")
    width = max(6, len(str(len(labels))))
    for start in range(0, len(labels), READ_BLOCK):
        block = np.asarray(images[start:start + READ_BLOCK])
        for offset, image in enumerate(block):
            index = start + offset
            label = int(labels[index])
            yield Sample(image, label, f"{classes[label]}/{index:0{width}d}", f"{path}[{split}/images][{index}]")


def chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    iterator = iter(samples)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def stack_chunk(chunk: list[Sample]) -> np.ndarray:
    """The chunk's images as one (n, H, W, 3) array; the images must be square and of one size."""
    first = chunk[0].image.shape
    for sample in chunk:
        height, width = sample.image.shape[:2]
        if height != width:
            raise DataSourceError(f"{sample.origin}: image is {height}×{width}; the class warping fields need square images")
        if sample.image.shape != first:
            raise DataSourceError(f"{sample.origin}: size {sample.image.shape[:2]} differs from the other images "
                                  f"of its chunk {first[:2]}; use batch_size: 1 for images of mixed sizes")
    return np.stack([sample.image for sample in chunk])


# --- outputs --------------------------------------------------------------------------------


class FolderSink:
    """Protected images as PNG files ``out/<class>/<stem>.png``, each written atomically."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> "FolderSink":
        self.out.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, chunk: list[Sample], protected: np.ndarray) -> None:
        from PIL import Image

        for sample, image in zip(chunk, protected):
            path = self.out / f"{sample.name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")  # (H, W, 3) uint8: RGB
            os.replace(tmp, path)


class StoreSink:
    """Protected images as a store in the poison stage's layout, built atomically chunk by chunk."""

    def __init__(self, out: Path, attrs: dict, provenance: dict | None = None):
        from ..store import StoreWriter

        self.writer = StoreWriter(out, attrs, provenance=provenance)

    def __enter__(self) -> "StoreSink":
        self.writer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.writer.__exit__(*exc)

    def write(self, chunk: list[Sample], protected: np.ndarray) -> None:
        labels = np.array([sample.label for sample in chunk], dtype=np.int64)
        self.writer.append("train/images", protected)
        self.writer.append("train/labels", labels)
        self.writer.append("train/poisoned", np.ones(len(chunk), dtype=bool))
        self.writer.append("train/true_labels", labels)


# --- the trained surrogate ------------------------------------------------------------------


def load_trained_surrogate(spec: dict, surrogate_dir: str | None, image_size: int, device, key: str):
    """The entry's trained surrogate (eval mode), its class count read from the weights; None without a dir."""
    if not surrogate_dir:
        return None
    import torch

    from ..modelio import load_model, model_spec, read_sidecar

    path = Path(surrogate_dir) / "model.pt"
    if not path.is_file():
        raise ConfigError(f"--surrogate-dir: no model.pt in {surrogate_dir}")
    entry = spec.get("surrogate_entry")
    if not entry:
        raise ConfigError(f"{key}.surrogate: the entry has no resolved surrogate (surrogate_entry); pass "
                          f"--config and --attack, or the resolved spec the workflow gives `poisonflow poison`")
    if read_sidecar(path) is not None:  # the sidecar knows the class count
        return load_model(path, device)
    state = torch.load(path, map_location="cpu", weights_only=True)  # an older file: count from the weights
    return load_model(path, device, spec=model_spec(entry["training"]["model"], int(state["fc.weight"].shape[0]),
                                                    image_size))


# --- the stage ------------------------------------------------------------------------------


def input_samples(input_path: Path, split: str, classes: list[str]) -> Iterator[Sample]:
    return store_samples(input_path, split, classes) if is_store(input_path) else folder_samples(input_path, classes)


def run(args) -> None:
    set_threads(args.threads)
    from ..devices import torch_device

    spec, key = attack_entry(args)
    module = streaming_kind(spec, key)
    input_path, out = Path(args.input), Path(args.out)
    classes = class_names(args.classes, input_path)
    samples = input_samples(input_path, args.split, classes)
    first = next(samples, None)
    if first is None:
        raise DataSourceError(f"{input_path}: no images to protect")
    samples = itertools.chain([first], samples)

    device = torch_device()
    surrogate = load_trained_surrogate(spec, args.surrogate_dir, first.image.shape[0], device, key)
    empty = np.zeros((0,) + first.image.shape, dtype=np.uint8)
    context = PoisonContext(empty, np.zeros(0, dtype=np.int64), classes, surrogate=surrogate, device=device,
                            extra={"key": key})
    protector = module.prepare(spec, context, args.seed)

    attrs = {"attack": spec, "attack_name": key.split(".", 1)[1], "seed": args.seed, "classes": classes,
             "source": str(input_path)}
    if out.name.endswith(STORE_SUFFIX):
        from ..provenance import record

        provenance = record(
            "protect", entry=spec, name=attrs["attack_name"], seed=args.seed, device=device,
            inputs=[input_path, args.surrogate_dir and Path(args.surrogate_dir) / "model.pt", args.classes],
            code=["poisonflow.stages.protect", UNLEARNABLE.module_name(spec["kind"])])
        sink = StoreSink(out, attrs, provenance)
    else:
        sink = FolderSink(out)
    count, seen = 0, set()
    with sink:
        for chunk in chunks(samples, protector.batch_size):
            images = stack_chunk(chunk)
            labels = np.array([sample.label for sample in chunk], dtype=np.int64)
            sink.write(chunk, protector.protect_chunk(images, labels))
            count += len(chunk)
            seen.update(int(label) for label in labels)
    print(f"{out}: protected {count} images of {len(seen)} classes ({spec['kind']}, seed {args.seed})")
