"""data stage: a dataset source → ``results/data/{dataset}.zarr``.

The source's training split is divided into the released training set (``train/``) and the
reserve (``reserve/``): ``reserve`` × each class, drawn with ``split_seed``, held out before any
poisoning, never released, and the only clean data a defense may use. Sample i of every poisoned
store is sample i of ``train/``.

Sources that can stream (``stream(spec, key)``: folders of image files, archives of arrays) are
decoded, resized and written one store chunk at a time, with a progress bar, so memory stays
bounded whatever the dataset's size; the others are loaded whole and written the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .common import parse_json

if TYPE_CHECKING:  # the sources, the store and tqdm are imported when the stage runs, not for --help
    from ..data.streaming import DatasetStream, SplitStream
    from ..store import StoreWriter

# The reserve's random stream, apart from the subsets' (which use split_seed alone).
RESERVE_STREAM = 3


def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="datasets entry name (config keys in messages: datasets.NAME)")
    parser.add_argument("--spec", required=True, metavar="JSON",
                        help="the resolved datasets entry (JSON): source, image_size, subsets, reserve")
    parser.add_argument("--out", required=True, metavar="STORE", help="output store path (.zarr)")


def dataset_stream(source, spec: dict, key: str) -> DatasetStream:
    """The source's own stream where it has one, else its loaded arrays seen as a stream."""
    from ..data.streaming import from_arrays

    stream = getattr(source, "stream", None)
    if stream is not None:
        return stream(spec, key=key)
    return from_arrays(source.load(spec, key=key))


def write_split(writer: StoreWriter, parts: dict[str, np.ndarray], split: SplitStream, progress: bool = True) -> None:
    """Route each sample of ``split`` to the store group whose mask in ``parts`` selects it
    (``{group}/labels``, ``{group}/images``), the images one chunk-sized batch at a time."""
    from tqdm.auto import tqdm

    from ..store import samples_per_chunk

    shape = (split.image_size, split.image_size, 3)
    for name, mask in parts.items():
        writer.write(f"{name}/labels", split.labels[mask].astype(np.int64))
        writer.append(f"{name}/images", np.empty((0, *shape), dtype=np.uint8))  # exists even when empty
    desc = "/".join(parts) + " images"
    start = 0
    with tqdm(total=len(split), desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
              leave=False) as bar:
        for images in split.batches(samples_per_chunk(shape, np.uint8)):
            for name, mask in parts.items():
                writer.append(f"{name}/images", images[mask[start:start + len(images)]])
            start += len(images)
            bar.update(len(images))


def reserve_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool (N,): the reserve, ``fraction`` of each class (rounded half up), seeded."""
    from ..config import reserve_counts

    counts = reserve_counts(np.bincount(labels).tolist(), fraction)
    rng = np.random.default_rng([seed, RESERVE_STREAM])
    mask = np.zeros(len(labels), dtype=bool)
    for label, count in enumerate(counts):
        members = np.flatnonzero(labels == label)
        mask[rng.choice(members, size=count, replace=False)] = True
    return mask


def write_stream(path, stream: DatasetStream, attrs: dict, reserve: float = 0.0, seed: int = 0,
                 progress: bool = True, provenance: dict | None = None) -> None:
    """Write a clean store (``train/``, ``reserve/``, ``test/``, ``attrs``) from a stream, atomically."""
    from ..store import StoreWriter

    held_out = reserve_mask(stream.train.labels, reserve, seed)
    with StoreWriter(path, dict(attrs, classes=list(stream.classes)), provenance=provenance) as writer:
        write_split(writer, {"train": ~held_out, "reserve": held_out}, stream.train, progress)
        write_split(writer, {"test": np.ones(len(stream.test), dtype=bool)}, stream.test, progress)


def run(args) -> None:
    from ..config import reserve_counts
    from ..data import SOURCES
    from ..kinds import settings_for
    from ..provenance import record

    spec = parse_json(args.spec, "--spec")
    key = f"datasets.{args.name}"
    source = SOURCES.get(spec["source"], key=f"{key}.source")
    spec = settings_for(source.__name__, spec, key)
    stream = dataset_stream(source, spec, key)
    provenance = record("data", entry=spec, name=args.name, device="cpu",
                        code=["poisonflow.stages.data", SOURCES.module_name(spec["source"])])
    write_stream(args.out, stream, {"source": spec["source"], "dataset": spec}, spec["reserve"], spec["split_seed"],
                 provenance=provenance)
    reserved = sum(reserve_counts(np.bincount(stream.train.labels).tolist(), spec["reserve"]))
    size = stream.train.image_size
    print(f"{args.out}: {len(stream.train) - reserved} train + {reserved} reserve / {len(stream.test)} test "
          f"images, {size}x{size}, {len(stream.classes)} classes")
