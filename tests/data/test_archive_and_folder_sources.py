"""The papers' dataset sources (CIFAR-100, SVHN, GTSRB, Tiny-ImageNet, image folders), each against
small archives or folders built here, fetched through the real download code (a local HTTP server
or a file:// URL) with a checksum failure; the chunked store writer; the streaming data stage."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import io
import json
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from torchvision.datasets import CIFAR100, SVHN

from poisonflow import store as store_module
from poisonflow.config import validate
from poisonflow.data import SOURCES, cifar100, gtsrb, imagefolder, svhn, tiny_imagenet
from poisonflow.data.base import stratified_indices
from poisonflow.data.sourcing import DEFAULT_DOWNLOAD_TIMEOUT
from poisonflow.data.streaming import SplitStream, DatasetStream
from poisonflow.errors import ConfigError, DataSourceError, StoreError
from poisonflow.stages import data as data_stage
from poisonflow.store import StoreWriter, read_store, samples_per_chunk, write_store



def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_directory(folder: Path):
    """Serve ``folder`` over HTTP on a free local port; yields the base URL (with a trailing slash)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_server():
    """An address that accepts connections but never answers (a 5 s default timeout stands by)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    socket.setdefaulttimeout(5.0)
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    socket.setdefaulttimeout(None)
    server.close()


def uniform_image(colour, size) -> Image.Image:
    return Image.new("RGB", size, tuple(int(c) for c in colour))


def test_registry_and_cheap_describe():
    for name in ("cifar100", "svhn", "gtsrb", "tiny-imagenet", "imagefolder"):
        module = SOURCES.get(name)
        assert callable(module.load) and callable(module.describe) and callable(module.stream)
    # describe runs while the workflow is parsed: no torch, no torchvision.
    code = ("import sys; from poisonflow.data import cifar100, svhn, gtsrb, tiny_imagenet, imagefolder; "
            "cifar100.describe({'download': True}); svhn.describe({'download': True}); "
            "gtsrb.describe({'download': True}); tiny_imagenet.describe({'download': True}); "
            "imagefolder.describe({'download': True, 'url': 'http://x/a.tar', 'md5': 'a' * 32, "
            "'classes': ['a', 'b'], 'train_per_class': 3}); "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_names_match_torchvision():
    assert (cifar100.BASE_FOLDER, cifar100.ARCHIVE_NAME) == (CIFAR100.base_folder, CIFAR100.filename)
    assert cifar100.LAYOUT_FILES == [n for n, _ in CIFAR100.train_list + CIFAR100.test_list] + [CIFAR100.meta["filename"]]
    assert svhn.FILE_NAMES == {split: SVHN.split_list[split][1] for split in svhn.SPLITS}


def test_published_class_totals():
    assert len(cifar100.CLASSES) == 100 and cifar100.CLASSES == sorted(cifar100.CLASSES)
    assert (svhn.TRAIN_CLASS_TOTALS.sum(), svhn.TEST_CLASS_TOTALS.sum()) == (73257, 26032)
    assert len(gtsrb.CLASSES) == len(gtsrb.TRAIN_CLASS_TOTALS) == len(gtsrb.TEST_CLASS_TOTALS) == 43
    assert (gtsrb.TRAIN_CLASS_TOTALS.sum(), gtsrb.TEST_CLASS_TOTALS.sum()) == (39209, 12630)
    assert len(tiny_imagenet.WNIDS) == 200 and tiny_imagenet.WNIDS == sorted(set(tiny_imagenet.WNIDS))
    described = tiny_imagenet.describe({"download": True, "train_size": 2000})
    assert described["classes"] == tiny_imagenet.WNIDS and described["train_counts"] == [10] * 200
    assert svhn.describe({"download": True})["train_counts"] == svhn.TRAIN_CLASS_TOTALS.tolist()
    assert gtsrb.describe({"download": True})["train_counts"][33] == 689


def test_schema_fills_only_the_shared_dataset_defaults():
    raw = {"datasets": {"f": {"source": "imagefolder", "root": "/x"}}, "models": {"m": {"arch": "convnet"}},
           "trainings": {"t": {"model": "m"}}, "attacks": {"a": {"kind": "badnets"}}, "defenses": {"n": {"kind": "none"}},
           "experiments": [{"dataset": ["f"], "attack": ["a"], "training": ["t"], "defense": ["n"], "seed": [0]}]}
    entry = validate(raw)["datasets"]["f"]
    # Each source's defaults come from its fragment (imagefolder.yaml): other sources' resolved
    # entries do not carry them.
    assert entry == {"source": "imagefolder", "root": "/x", "download": False, "split_seed": 0, "reserve": 0.05,
                     "download_timeout": DEFAULT_DOWNLOAD_TIMEOUT, "train_dir": "train", "test_dir": "val",
                     "image_size": 224, "resize": "bilinear"}
    raw["datasets"]["f"] = {"source": "digits"}
    assert validate(raw)["datasets"]["f"] == {"source": "digits", "split_seed": 0, "reserve": 0.05}


# --- store writer --------------------------------------------------------------------------------

def test_samples_per_chunk_bounds_chunk_bytes():
    assert samples_per_chunk((32, 32, 3), np.uint8) == 1024
    assert samples_per_chunk((224, 224, 3), np.uint8) == (16 << 20) // (224 * 224 * 3) == 111
    assert samples_per_chunk((), np.int64) == 1024


def test_store_writer_appends_batches_like_one_write(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2500, 4, 4, 3), dtype=np.uint8)
    with StoreWriter(tmp_path / "s.zarr", {"classes": ["a"]}) as writer:
        for start in range(0, 2500, 1024):
            writer.append("train/images", images[start:start + 1024])
        writer.write("train/labels", np.arange(2500))
        assert writer.length("train/images") == 2500
        assert not (tmp_path / "s.zarr").exists()  # nothing in place before the end
    store = read_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store["train/images"], images)
    assert store.attrs == {"classes": ["a"], "complete": True}
    assert store.array("train/images").chunks == (1024, 4, 4, 3)
    assert not list(tmp_path.glob(".s.zarr.tmp-*"))


def test_store_writer_failure_keeps_the_old_store(tmp_path):
    write_store(tmp_path / "s.zarr", {"a": np.ones(3, np.int64)}, {})
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(tmp_path / "s.zarr") as writer:
            writer.append("a", np.zeros(5, np.int64))
            raise RuntimeError("boom")
    np.testing.assert_array_equal(read_store(tmp_path / "s.zarr")["a"], [1, 1, 1])
    assert not list(tmp_path.glob(".s.zarr.tmp-*"))


def test_store_writer_rejects_mismatched_batches(tmp_path):
    with pytest.raises(StoreError, match=r"s\.zarr: array 'x': cannot append a uint8 batch of shape \(2, 5\)"):
        with StoreWriter(tmp_path / "s.zarr") as writer:
            writer.append("x", np.zeros((2, 4), np.uint8))
            writer.append("x", np.zeros((2, 5), np.uint8))
    with pytest.raises(StoreError, match="array 'y' is written twice"):
        with StoreWriter(tmp_path / "t.zarr") as writer:
            writer.write("y", np.zeros(2))
            writer.write("y", np.zeros(2))
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "t.zarr").exists()


# --- the streaming data stage ---------------------------------------------------------------------

def counting_split(count: int, size: int, calls: list) -> SplitStream:
    """A split whose image i is filled with i % 251; records every read."""
    def read(start, stop):
        calls.append((start, stop))
        values = (np.arange(start, stop) % 251).astype(np.uint8)
        return np.broadcast_to(values[:, None, None, None], (stop - start, size, size, 3)).copy()

    return SplitStream(np.arange(count) % 3, size, read)


def test_data_stage_writes_one_chunk_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 10 * 8 * 8 * 3)  # 10 images of 8×8 per chunk
    calls = []
    stream = DatasetStream(counting_split(35, 8, calls), counting_split(4, 8, []), ["a", "b", "c"])
    data_stage.write_stream(tmp_path / "d.zarr", stream, {"source": "test"}, progress=False)
    assert calls == [(0, 10), (10, 20), (20, 30), (30, 35)]
    store = read_store(tmp_path / "d.zarr")
    np.testing.assert_array_equal(store["train/images"][:, 0, 0, 0], np.arange(35) % 251)
    np.testing.assert_array_equal(store["train/labels"], np.arange(35) % 3)
    assert store["test/images"].shape == (4, 8, 8, 3) and store.attrs["classes"] == ["a", "b", "c"]
    assert store.array("train/images").chunks[0] == 10


def test_data_stage_memory_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 1 << 18)  # 85 images of 32×32 per batch
    total_bytes = 4000 * 32 * 32 * 3  # 12 MB of images
    stream = DatasetStream(counting_split(4000, 32, []), counting_split(10, 32, []), ["a", "b", "c"])
    tracemalloc.start()
    try:
        data_stage.write_stream(tmp_path / "d.zarr", stream, {}, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total_bytes / 4
    assert read_store(tmp_path / "d.zarr")["train/images"].shape == (4000, 32, 32, 3)


def test_data_stage_runs_a_streaming_source(tmp_path, image_tree):
    spec = {"source": "imagefolder", "root": str(image_tree), "image_size": 8, "classes": ["dog", "cat"]}
    args = argparse.Namespace(name="pets", spec=json.dumps(spec), out=str(tmp_path / "pets.zarr"))
    data_stage.run(args)
    store = read_store(tmp_path / "pets.zarr")
    expected = imagefolder.load(spec)
    np.testing.assert_array_equal(store["train/images"], expected.train_images)
    np.testing.assert_array_equal(store["test/labels"], expected.test_labels)
    assert store.attrs["classes"] == ["dog", "cat"] and store.attrs["source"] == "imagefolder"


# --- CIFAR-100 -----------------------------------------------------------------------------------

@pytest.fixture
def tiny_cifar100(tmp_path, monkeypatch):
    """cifar-100-python.tar.gz in the real layout (6 train, 3 test images), checksums pointed at it."""
    rng = np.random.default_rng(5)
    build = tmp_path / "build" / CIFAR100.base_folder
    build.mkdir(parents=True)
    splits = {
        "train": {"fine_labels": [0, 99, 5, 0, 99, 5], "coarse_labels": [0] * 6,
                  "data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "filenames": [f"t{i}" for i in range(6)]},
        "test": {"fine_labels": [7, 8, 9], "coarse_labels": [1] * 3,
                 "data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "filenames": ["a", "b", "c"]},
    }
    splits["test"]["data"][1] = np.repeat([3, 140, 255], 1024)  # one uniform colour
    files = dict(splits, meta={"fine_label_names": cifar100.CLASSES, "coarse_label_names": [f"s{i}" for i in range(20)]})
    checksums = {}
    for name, content in files.items():
        (build / name).write_bytes(pickle.dumps(content, protocol=2))
        checksums[name] = file_md5(build / name)
    archive = tmp_path / "served" / CIFAR100.filename
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(build, arcname=CIFAR100.base_folder)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", checksums["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", checksums["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", dict(CIFAR100.meta, md5=checksums["meta"]))
    return archive, splits


def hwc(data: np.ndarray, size: int = 32) -> np.ndarray:
    return data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)


def test_cifar100_downloads_over_http_and_file_urls(tmp_path, tiny_cifar100):
    archive, splits = tiny_cifar100
    loaded = {}
    with serve_directory(archive.parent) as base_url:
        for kind, url in (("http", base_url + archive.name), ("file", archive.as_uri())):
            root = tmp_path / kind
            loaded[kind] = cifar100.load({"root": str(root), "download": True, "url": url, "md5": file_md5(archive)})
            assert cifar100.locate({"root": str(root)}, "datasets") == ("read", root)
    arrays = loaded["http"]
    np.testing.assert_array_equal(arrays.train_images, hwc(splits["train"]["data"]))
    np.testing.assert_array_equal(arrays.train_labels, [0, 99, 5, 0, 99, 5])
    np.testing.assert_array_equal(arrays.test_labels, [7, 8, 9])
    assert arrays.classes == cifar100.CLASSES and arrays.train_labels.dtype == np.int64
    np.testing.assert_array_equal(loaded["file"].test_images, arrays.test_images)


def test_cifar100_resizes_and_subsets(tmp_path, tiny_cifar100):
    archive, splits = tiny_cifar100
    root = tmp_path / "root"
    root.mkdir()
    (root / archive.name).write_bytes(archive.read_bytes())  # a local archive: verified, then extracted
    arrays = cifar100.load({"root": str(root), "md5": file_md5(archive), "image_size": 16, "train_size": 3,
                            "split_seed": 1})
    labels = np.array(splits["train"]["fine_labels"])
    chosen = stratified_indices(labels, 3, 1, "k")
    np.testing.assert_array_equal(arrays.train_labels, labels[chosen])
    assert sorted(arrays.train_labels) == [0, 5, 99] and arrays.train_images.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(arrays.test_images[1], np.broadcast_to([3, 140, 255], (16, 16, 3)))


def test_cifar100_checksum_failures_name_the_file(tmp_path, tiny_cifar100):
    archive, _ = tiny_cifar100
    root = tmp_path / "root"
    with pytest.raises(DataSourceError, match=rf"^datasets\.md5: {root / archive.name} fails its MD5 check"):
        cifar100.load({"root": str(root), "download": True, "url": archive.as_uri()})  # the official MD5
    assert not (root / CIFAR100.base_folder).exists()
    cifar100.load({"root": str(root), "download": True, "url": archive.as_uri(), "md5": file_md5(archive)})
    damaged = root / CIFAR100.base_folder / "meta"
    damaged.write_bytes(damaged.read_bytes() + b"\0")
    with pytest.raises(DataSourceError, match=rf"^datasets\.root: {damaged} fails its MD5 check"):
        cifar100.load({"root": str(root)})


def test_cifar100_describe_and_missing_root(tmp_path):
    assert cifar100.describe({"download": True, "train_size": 1000})["train_counts"] == [10] * 100
    with pytest.raises(DataSourceError, match=r"^c\.root is not set.*cifar-100-python"):
        cifar100.describe({}, key="c")


# --- SVHN ----------------------------------------------------------------------------------------

@pytest.fixture
def tiny_svhn(tmp_path, monkeypatch):
    """train_32x32.mat (5 images) and test_32x32.mat (3) with the published layout: X is
    (32, 32, 3, N), y is (N, 1) with the digit 0 labelled 10."""
    rng = np.random.default_rng(9)
    folder = tmp_path / "svhn-served"
    folder.mkdir()
    contents = {"train": (rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8), np.array([[10], [1], [2], [10], [9]])),
                "test": (rng.integers(0, 256, (32, 32, 3, 3), dtype=np.uint8), np.array([[3], [10], [4]]))}
    split_list = dict(SVHN.split_list)
    for split, (images, labels) in contents.items():
        path = folder / svhn.FILE_NAMES[split]
        scipy.io.savemat(path, {"X": images, "y": labels.astype(np.uint8)})
        split_list[split] = [split_list[split][0], path.name, file_md5(path)]
    monkeypatch.setattr(SVHN, "split_list", split_list)
    return folder, contents


def test_svhn_downloads_from_a_mirror_and_maps_ten_to_zero(tmp_path, tiny_svhn):
    folder, contents = tiny_svhn
    with serve_directory(folder) as base_url:
        arrays = svhn.load({"download": True, "url": base_url, "cache": str(tmp_path / "cache")})
    root = tmp_path / "cache" / "svhn"
    assert sorted(p.name for p in root.iterdir()) == ["test_32x32.mat", "train_32x32.mat"]
    np.testing.assert_array_equal(arrays.train_labels, [0, 1, 2, 0, 9])
    np.testing.assert_array_equal(arrays.test_labels, [3, 0, 4])
    np.testing.assert_array_equal(arrays.train_images, contents["train"][0].transpose(3, 0, 1, 2))
    assert arrays.train_images[4, 5, 6, 2] == contents["train"][0][5, 6, 2, 4]
    assert arrays.classes == [str(d) for d in range(10)]
    again = svhn.load({"root": str(root), "image_size": 16})  # read in place, no download
    assert again.test_images.shape == (3, 16, 16, 3)


def test_svhn_checksum_failures_name_the_file(tmp_path, tiny_svhn):
    folder, _ = tiny_svhn
    (folder / "test_32x32.mat").write_bytes((folder / "test_32x32.mat").read_bytes() + b"\0")
    root = tmp_path / "root"
    with pytest.raises(DataSourceError, match=rf"^datasets\.url: {root / 'test_32x32.mat'} fails its MD5 check"):
        svhn.load({"root": str(root), "download": True, "url": folder.as_uri()})
    with pytest.raises(DataSourceError, match=rf"^datasets\.root: {folder / 'test_32x32.mat'} fails its MD5 check"):
        svhn.load({"root": str(folder)})


def test_svhn_key_errors(tmp_path, silent_server):
    with pytest.raises(DataSourceError, match=r"^s\.root: .* lacks train_32x32\.mat, test_32x32\.mat; set s\.download"):
        svhn.describe({"root": str(tmp_path)}, key="s")
    with pytest.raises(ConfigError, match=r"^datasets\.md5: SVHN's two files"):
        svhn.describe({"root": str(tmp_path), "md5": "x"})
    start = time.monotonic()
    with pytest.raises(DataSourceError, match=r"^datasets\.download: could not fetch .*offline\?"):
        svhn.load({"root": str(tmp_path / "dl"), "download": True, "url": silent_server, "download_timeout": 0.3})
    assert time.monotonic() - start < 3


# --- GTSRB ---------------------------------------------------------------------------------------

GTSRB_TRAIN = {0: [(30, 40), (25, 25)], 2: [(8, 8), (50, 31), (16, 20)], 42: [(12, 18)]}
GTSRB_TEST = [("00000.ppm", (20, 20), 2), ("00001.ppm", (33, 17), 42), ("00002.ppm", (9, 9), 0)]


def colour_of(label: int, index: int) -> tuple[int, int, int]:
    return (label * 5 + 1, 200 - index * 30, 77)


@pytest.fixture
def tiny_gtsrb(tmp_path, monkeypatch):
    """The three GTSRB archives, images of several sizes, each one uniform colour."""
    folder = tmp_path / "gtsrb-served"
    folder.mkdir()

    def ppm(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PPM")
        return buffer.getvalue()

    with zipfile.ZipFile(folder / "GTSRB-Training_fixed.zip", "w") as archive:
        for label, sizes in GTSRB_TRAIN.items():
            for index, size in enumerate(sizes):
                name = f"GTSRB/Training/{label:05d}/00000_{index:05d}.ppm"
                archive.writestr(name, ppm(uniform_image(colour_of(label, index), size)))
            archive.writestr(f"GTSRB/Training/{label:05d}/GT-{label:05d}.csv", "Filename;ClassId\n")
    with zipfile.ZipFile(folder / "GTSRB_Final_Test_Images.zip", "w") as archive:
        for index, (name, size, label) in enumerate(GTSRB_TEST):
            archive.writestr(f"GTSRB/Final_Test/Images/{name}", ppm(uniform_image(colour_of(label, index), size)))
    rows = "".join(f"{name};{w};{h};0;0;{w};{h};{label}\n" for name, (w, h), label in GTSRB_TEST)
    with zipfile.ZipFile(folder / "GTSRB_Final_Test_GT.zip", "w") as archive:
        archive.writestr("GT-final_test.csv", "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n" + rows)
    monkeypatch.setattr(gtsrb, "ARCHIVES", {name: (file_md5(folder / name), part)
                                            for name, (_, part) in gtsrb.ARCHIVES.items()})
    return folder


def test_gtsrb_downloads_extracts_and_resizes(tmp_path, tiny_gtsrb):
    root = tmp_path / "root"
    with serve_directory(tiny_gtsrb) as base_url:
        arrays = gtsrb.load({"root": str(root), "download": True, "url": base_url, "image_size": 8})
    base = root / "gtsrb"
    assert (base / "GTSRB" / "Training" / "00042").is_dir() and (base / "GT-final_test.csv").is_file()
    assert gtsrb.locate({"root": str(root)}) == ("read", base, [])
    expected_labels = [label for label, sizes in GTSRB_TRAIN.items() for _ in sizes]
    np.testing.assert_array_equal(arrays.train_labels, expected_labels)
    np.testing.assert_array_equal(arrays.test_labels, [2, 42, 0])
    assert arrays.train_images.shape == (6, 8, 8, 3) and arrays.classes == gtsrb.CLASSES
    colours = [colour_of(label, index) for label, sizes in GTSRB_TRAIN.items() for index in range(len(sizes))]
    for image, colour in zip(arrays.train_images, colours):
        np.testing.assert_array_equal(image, np.broadcast_to(colour, (8, 8, 3)))
    np.testing.assert_array_equal(arrays.test_images[1], np.broadcast_to(colour_of(42, 1), (8, 8, 3)))
    counts = gtsrb.describe({"root": str(root)})["train_counts"]
    assert counts[0] == 2 and counts[2] == 3 and counts[42] == 1 and sum(counts) == 6


def test_gtsrb_local_archives_are_verified_before_extraction(tmp_path, tiny_gtsrb):
    root = tmp_path / "root"
    root.mkdir()
    for archive in tiny_gtsrb.iterdir():
        (root / archive.name).write_bytes(archive.read_bytes())
    assert gtsrb.locate({"root": str(root)})[0] == "extract"
    damaged = root / "GTSRB_Final_Test_GT.zip"
    damaged.write_bytes(damaged.read_bytes() + b"\0")
    with pytest.raises(DataSourceError, match=rf"^datasets\.root: {damaged} fails its MD5 check"):
        gtsrb.load({"root": str(root)})
    assert not (root / gtsrb.TEST_LABELS).exists()
    damaged.write_bytes((tiny_gtsrb / damaged.name).read_bytes())
    assert len(gtsrb.load({"root": str(root), "image_size": 4}).test_labels) == 3


def test_gtsrb_served_archive_with_a_wrong_checksum(tmp_path, tiny_gtsrb):
    served = tiny_gtsrb / "GTSRB-Training_fixed.zip"
    served.write_bytes(served.read_bytes() + b"\0")
    root = tmp_path / "root"
    with serve_directory(tiny_gtsrb) as base_url:
        with pytest.raises(DataSourceError, match=r"^datasets\.url: .*GTSRB-Training_fixed\.zip fails its MD5"):
            gtsrb.load({"root": str(root), "download": True, "url": base_url})
    assert not (root / "gtsrb" / gtsrb.TRAIN_FOLDER).exists()


def test_gtsrb_errors_name_keys(tmp_path):
    with pytest.raises(DataSourceError, match=r"^g\.root: .* lacks GTSRB/Training, .*set g\.download: true"):
        gtsrb.describe({"root": str(tmp_path)}, key="g")
    with pytest.raises(ConfigError, match=r"^datasets\.md5:"):
        gtsrb.describe({"download": True, "md5": "x"})


# --- Tiny-ImageNet -------------------------------------------------------------------------------

TINY_WNIDS = ["n03", "n01", "n02"]  # wnids.txt is not sorted; labels follow the sorted order


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def tiny_imagenet_zip(tmp_path):
    """tiny-imagenet-200.zip with 3 classes × 2 training images and 4 validation images (one grey)."""
    archive = tmp_path / "served" / tiny_imagenet.ARCHIVE_NAME
    archive.parent.mkdir()
    top = tiny_imagenet.FOLDER
    annotations = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n03"), ("val_2.JPEG", "n01"), ("val_3.JPEG", "n02")]
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr(f"{top}/wnids.txt", "\n".join(TINY_WNIDS) + "\n")
        out.writestr(f"{top}/words.txt", "n01\tone\nn02\ttwo\nn03\tthree\n")
        for wnid in TINY_WNIDS:
            for index in range(2):
                out.writestr(f"{top}/train/{wnid}/images/{wnid}_{index}.JPEG",
                             jpeg(uniform_image((int(wnid[-1]) * 60, index * 100, 30), (64, 64))))
            out.writestr(f"{top}/train/{wnid}/{wnid}_boxes.txt", "")
        for index, (name, wnid) in enumerate(annotations):
            image = Image.new("L", (64, 64), 90) if index == 3 else uniform_image((10, int(wnid[-1]) * 70, 5), (64, 64))
            out.writestr(f"{top}/val/images/{name}", jpeg(image))
        out.writestr(f"{top}/val/val_annotations.txt", "".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in annotations))
    return archive


def decoded(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_tiny_imagenet_downloads_and_reads(tmp_path, tiny_imagenet_zip):
    md5 = file_md5(tiny_imagenet_zip)
    with serve_directory(tiny_imagenet_zip.parent) as base_url:
        arrays = tiny_imagenet.load({"download": True, "url": base_url + tiny_imagenet_zip.name, "md5": md5,
                                     "cache": str(tmp_path / "cache")})
    folder = tmp_path / "cache" / "tiny-imagenet" / tiny_imagenet.FOLDER
    assert arrays.classes == ["n01", "n02", "n03"]
    np.testing.assert_array_equal(arrays.train_labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(arrays.test_labels, [1, 2, 0, 1])
    np.testing.assert_array_equal(arrays.train_images[5], decoded(folder / "train" / "n03" / "images" / "n03_1.JPEG"))
    np.testing.assert_array_equal(arrays.test_images[2], decoded(folder / "val" / "images" / "val_2.JPEG"))
    grey = arrays.test_images[3]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # The extracted folder can be the root itself; subsets and resizing as for every source.
    small = tiny_imagenet.load({"root": str(folder), "image_size": 32, "train_size": 3})
    assert small.train_images.shape == (3, 32, 32, 3) and sorted(small.train_labels) == [0, 1, 2]
    assert tiny_imagenet.describe({"root": str(folder)}) == {"classes": ["n01", "n02", "n03"], "train_counts": [2, 2, 2]}


def test_tiny_imagenet_checksums(tmp_path, tiny_imagenet_zip):
    root = tmp_path / "root"
    with pytest.raises(DataSourceError, match=rf"^datasets\.md5: {root / tiny_imagenet.ARCHIVE_NAME} fails its MD5"):
        tiny_imagenet.load({"root": str(root), "download": True, "url": tiny_imagenet_zip.as_uri()})
    assert not (root / tiny_imagenet.FOLDER).exists()
    # A local archive (no download) is verified, then extracted.
    assert tiny_imagenet.locate({"root": str(root)}) == ("extract", root)
    arrays = tiny_imagenet.load({"root": str(root), "md5": file_md5(tiny_imagenet_zip)})
    assert len(arrays.train_labels) == 6 and (root / tiny_imagenet.FOLDER / "wnids.txt").is_file()


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DataSourceError, match=r"^t\.root: neither a complete .*tiny-imagenet-200.*set t\.download"):
        tiny_imagenet.describe({"root": str(tmp_path)}, key="t")
    with pytest.raises(DataSourceError, match=r"^datasets\.root is not set"):
        tiny_imagenet.load({})


# --- image folders -------------------------------------------------------------------------------

TREE = {"train": {"cat": 5, "dog": 4, "bird": 3}, "val": {"cat": 2, "dog": 2, "bird": 1}}


def tree_colour(split: str, name: str, index: int) -> tuple[int, int, int]:
    return (len(name) * 40, index * 20 + (100 if split == "val" else 0), sorted(TREE["train"]).index(name) * 60)


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """root/{train,val}/{cat,dog,bird}/NN.png: uniform colours, sizes varying by image."""
    root = tmp_path / "tree"
    for split, classes in TREE.items():
        for name, count in classes.items():
            folder = root / split / name / ("nested" if name == "bird" else "")
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                uniform_image(tree_colour(split, name, index), (20 + index * 7, 30 - index)).save(folder / f"{index:02d}.png")
            (folder / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_reads_classes_in_config_order(image_tree):
    arrays = imagefolder.load({"root": str(image_tree), "classes": ["dog", "bird"], "class_names": ["Dog", "Bird"],
                               "image_size": 8})
    assert arrays.classes == ["Dog", "Bird"]
    np.testing.assert_array_equal(arrays.train_labels, [0] * 4 + [1] * 3)
    np.testing.assert_array_equal(arrays.test_labels, [0, 0, 1])
    expected = [tree_colour("train", "dog", i) for i in range(4)] + [tree_colour("train", "bird", i) for i in range(3)]
    for image, colour in zip(arrays.train_images, expected):
        np.testing.assert_array_equal(image, np.broadcast_to(colour, (8, 8, 3)))
    everything = imagefolder.describe({"root": str(image_tree)})
    assert everything == {"classes": ["bird", "cat", "dog"], "train_counts": [3, 5, 4]}


def colours_of(images: np.ndarray) -> list[tuple]:
    return [tuple(int(v) for v in image[0, 0]) for image in images]


def test_imagefolder_per_class_draws(image_tree):
    spec = {"root": str(image_tree), "classes": ["cat", "dog"], "train_per_class": 3, "test_per_class": 1,
            "image_size": 4, "split_seed": 3}
    arrays = imagefolder.load(spec)
    np.testing.assert_array_equal(arrays.train_labels, [0, 0, 0, 1, 1, 1])
    cat_colours = colours_of(arrays.train_images[:3])
    assert set(cat_colours) <= {tree_colour("train", "cat", i) for i in range(5)} and len(set(cat_colours)) == 3
    assert cat_colours == sorted(cat_colours, key=lambda c: c[1])  # kept in file order
    # A class's draw depends on its folder and the seed, not on the other classes listed.
    alone = imagefolder.load(dict(spec, classes=["cat", "bird"]))
    assert colours_of(alone.train_images[:3]) == cat_colours
    other_seed = imagefolder.load(dict(spec, split_seed=4, classes=["cat", "bird"]))
    assert len(other_seed.train_images) == 6
    assert imagefolder.describe(spec) == {"classes": ["cat", "dog"], "train_counts": [3, 3]}


def test_imagefolder_test_split_drawn_from_training_folders(image_tree):
    spec = {"root": str(image_tree), "test_dir": None, "test_per_class": 2, "train_per_class": 2, "image_size": 4,
            "classes": ["cat", "dog"]}
    arrays = imagefolder.load(spec)
    np.testing.assert_array_equal(arrays.test_labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(arrays.train_labels, [0, 0, 1, 1])
    for label in (0, 1):
        train = set(colours_of(arrays.train_images[arrays.train_labels == label]))
        test = set(colours_of(arrays.test_images[arrays.test_labels == label]))
        assert len(train) == 2 and len(test) == 2 and not train & test
    rest = imagefolder.load({k: v for k, v in spec.items() if k != "train_per_class"})
    np.testing.assert_array_equal(np.bincount(rest.train_labels), [3, 2])  # 5 − 2 cats, 4 − 2 dogs


@pytest.mark.parametrize("change, error, message", [
    ({"train_per_class": 9}, DataSourceError, r"^datasets\.train_per_class: 9 images asked of .*train/bird, which has 3"),
    ({"classes": ["cat", "cow"]}, DataSourceError, r"^datasets\.classes: class folder .*train/cow does not exist"),
    ({"test_dir": None}, ConfigError, r"^datasets\.test_per_class: required when test_dir is null"),
    ({"class_names": ["x"]}, ConfigError, r"^datasets\.class_names: 1 names for 3 classes"),
    ({"train_dir": "training"}, DataSourceError, r"^datasets\.root: .*tree/training does not exist"),
])
def test_imagefolder_errors_name_keys(image_tree, change, error, message):
    with pytest.raises(error, match=message):
        imagefolder.load(dict({"root": str(image_tree), "image_size": 4}, **change))


def test_imagefolder_unreadable_image_is_named(image_tree):
    broken = image_tree / "train" / "dog" / "02.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataSourceError, match=rf"^datasets\.root: cannot read image {broken}"):
        imagefolder.load({"root": str(image_tree), "image_size": 4})


def test_imagefolder_archive_download(tmp_path, image_tree):
    archive = tmp_path / "served" / "pets.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "val"):
            tar.add(image_tree / split, arcname=split)
    md5 = file_md5(archive)
    spec = {"download": True, "md5": md5, "cache": str(tmp_path / "cache"), "image_size": 4,
            "classes": ["cat", "dog"], "train_per_class": 2}
    # Checked before the download: classes and counts come from the config.
    assert imagefolder.describe(dict(spec, url="http://127.0.0.1:9/pets.tar.gz")) == {
        "classes": ["cat", "dog"], "train_counts": [2, 2]}
    with serve_directory(archive.parent) as base_url:
        arrays = imagefolder.load(dict(spec, url=base_url + archive.name))
    assert (tmp_path / "cache" / "imagefolder" / md5 / "train" / "cat").is_dir()
    np.testing.assert_array_equal(arrays.train_labels, [0, 0, 1, 1])
    with pytest.raises(DataSourceError, match=r"^datasets\.md5: .*other/pets\.tar\.gz fails its MD5 check"):
        imagefolder.load(dict(spec, url=archive.as_uri(), root=str(tmp_path / "other"), md5="0" * 32))
    with pytest.raises(ConfigError, match=r"^datasets\.classes: set classes and train_per_class"):
        imagefolder.describe({"download": True, "md5": md5, "url": archive.as_uri(), "cache": str(tmp_path / "c2")})
    with pytest.raises(ConfigError, match=r"^datasets\.md5: set the archive's MD5"):
        imagefolder.load({"download": True, "url": archive.as_uri(), "root": str(tmp_path / "r3")})
