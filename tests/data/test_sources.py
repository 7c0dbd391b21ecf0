import contextlib
import functools
import gzip
import hashlib
import http.server
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR10, FashionMNIST

from poisonflow.data import SOURCES, cifar, fashion_mnist, synthetic
from poisonflow.data.base import stratified_indices, subset_counts
from poisonflow.errors import ConfigError, DataSourceError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def file_md5(path: Path) -> str:
    return md5(path.read_bytes())


@pytest.fixture
def silent_server():
    """An HTTP address that accepts connections (the kernel's backlog) but never answers.

    A 5 s process-wide socket timeout stands by, so code that sets none fails the time bound of
    the test instead of hanging it.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    socket.setdefaulttimeout(5.0)
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    socket.setdefaulttimeout(None)
    server.close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_directory(folder: Path):
    """Serve ``folder`` over HTTP on a free local port; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_sources_registry_gives_modules_with_load_and_describe():
    for name in ("fashion-mnist", "cifar10", "synthetic"):
        module = SOURCES.get(name)
        assert callable(module.load) and callable(module.describe)


def test_describe_does_not_import_torch():
    # describe runs while the workflow is parsed; torch and torchvision take seconds to import.
    code = ("import sys; from poisonflow.data import cifar, fashion_mnist, synthetic; "
            "cifar.describe({'download': True}); fashion_mnist.describe({'download': True}); synthetic.describe({}); "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_file_names_match_torchvision():
    assert fashion_mnist.CLASSES == FashionMNIST.classes
    assert fashion_mnist.ARCHIVE_NAMES == [name for name, _ in FashionMNIST.resources]
    assert cifar.LAYOUT_FILES == [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [
        CIFAR10.meta["filename"]]
    assert (cifar.BASE_FOLDER, cifar.ARCHIVE_NAME) == (CIFAR10.base_folder, CIFAR10.filename)


# --- Fashion-MNIST -------------------------------------------------------------------------------

def idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 0x0803, len(images), 28, 28) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes()


def write_gz(path: Path, data: bytes, mtime: int = 0) -> None:
    path.write_bytes(gzip.compress(data, mtime=mtime))


@pytest.fixture
def fake_fashion(tmp_path):
    """A flat folder with the four archives holding 20 train / 10 test images (2 / 1 per class)."""
    rng = np.random.default_rng(7)
    contents = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(20) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(10)[::-1].copy(),
    }
    folder = tmp_path / "fashion"
    folder.mkdir()
    raw = {}
    for name, array in contents.items():
        raw[name] = idx_images(array) if "images" in name else idx_labels(array)
        write_gz(folder / f"{name}.gz", raw[name])
    return folder, contents, raw


@pytest.fixture
def trusted_fake_archives(monkeypatch, fake_fashion):
    """Make the fake archives the published ones, as far as the checksums go."""
    folder, _, _ = fake_fashion
    resources = [(name, file_md5(folder / name)) for name, _ in FashionMNIST.resources]
    monkeypatch.setattr(FashionMNIST, "resources", resources)
    return fake_fashion


def test_fashion_flat_folder_is_verified_staged_and_read(tmp_path, trusted_fake_archives):
    folder, contents, _ = trusted_fake_archives
    before = sorted(p.name for p in folder.iterdir())
    arrays = fashion_mnist.load({"root": str(folder), "cache": str(tmp_path / "cache")})
    assert arrays.train_images.shape == (20, 28, 28, 3) and arrays.train_images.dtype == np.uint8
    assert arrays.test_images.shape == (10, 28, 28, 3)
    assert arrays.train_labels.dtype == np.int64
    for channel in range(3):
        np.testing.assert_array_equal(arrays.train_images[..., channel], contents["train-images-idx3-ubyte"])
        np.testing.assert_array_equal(arrays.test_images[..., channel], contents["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(arrays.train_labels, np.arange(20) % 10)
    np.testing.assert_array_equal(arrays.test_labels, np.arange(10)[::-1])
    assert arrays.classes == FashionMNIST.classes
    # The root is only read; the decompressed files live in the cache.
    assert sorted(p.name for p in folder.iterdir()) == before
    staged = list((tmp_path / "cache" / "fashion-mnist").glob("*/FashionMNIST/raw/train-images-idx3-ubyte"))
    assert len(staged) == 1
    # torchvision's own layout is read as it is.
    staged_root = staged[0].parents[2]
    assert fashion_mnist.locate({"root": str(staged_root)}, "datasets") == ("torchvision", staged_root)
    again = fashion_mnist.load({"root": str(staged_root)})
    np.testing.assert_array_equal(again.test_images, arrays.test_images)


def test_fashion_download_goes_through_torchvision(tmp_path, monkeypatch, trusted_fake_archives):
    folder, contents, _ = trusted_fake_archives
    with serve_directory(folder) as base_url:
        monkeypatch.setattr(FashionMNIST, "mirrors", [base_url])
        arrays = fashion_mnist.load({"download": True, "cache": str(tmp_path / "cache")})
    downloaded = tmp_path / "cache" / "fashion-mnist"
    assert (downloaded / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
    np.testing.assert_array_equal(arrays.train_images[..., 0], contents["train-images-idx3-ubyte"])
    # Downloaded once, then read from the cache.
    spec = {"download": True, "cache": str(tmp_path / "cache")}
    assert fashion_mnist.locate(spec, "datasets") == ("torchvision", downloaded)


def test_fashion_upsamples_with_nearest_neighbour(tmp_path, trusted_fake_archives):
    folder, contents, _ = trusted_fake_archives
    arrays = fashion_mnist.load({"root": str(folder), "cache": str(tmp_path / "cache"), "image_size": 56})
    assert arrays.train_images.shape == (20, 56, 56, 3)
    original = contents["train-images-idx3-ubyte"]
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_array_equal(arrays.train_images[:, dy::2, dx::2, 1], original)


def test_fashion_stratified_subsets(tmp_path, trusted_fake_archives):
    folder, _, _ = trusted_fake_archives
    arrays = fashion_mnist.load({"root": str(folder), "cache": str(tmp_path / "cache"), "train_size": 10})
    np.testing.assert_array_equal(np.bincount(arrays.train_labels, minlength=10), np.ones(10))
    assert len(arrays.test_labels) == 10  # no test_size: the whole test set


def test_fashion_checksum_mismatch_names_the_archive(tmp_path, fake_fashion):
    folder, _, _ = fake_fashion
    cache = tmp_path / "cache"
    with pytest.raises(DataSourceError) as error:
        fashion_mnist.load({"root": str(folder), "cache": str(cache)})
    message = str(error.value)
    assert message.startswith("datasets.root:")
    assert str(folder / "train-images-idx3-ubyte.gz") in message and "MD5" in message
    assert "\n" not in message
    # Nothing unverified is left where torchvision would read it.
    assert not list(cache.rglob("*-ubyte"))


def test_fashion_recompressed_archive_passes_by_content_md5(tmp_path, monkeypatch, fake_fashion):
    folder, _, raw = fake_fashion
    published = {name: file_md5(folder / f"{name}.gz") for name in raw}
    monkeypatch.setattr(FashionMNIST, "resources", [(f"{n}.gz", m) for n, m in published.items()])
    monkeypatch.setattr(fashion_mnist, "CONTENT_MD5", {name: md5(data) for name, data in raw.items()})
    # Recompress as a repackager would: same contents, other archive bytes.
    for name, data in raw.items():
        write_gz(folder / f"{name}.gz", data, mtime=1234567)
        assert file_md5(folder / f"{name}.gz") != published[name]
    arrays = fashion_mnist.load({"root": str(folder), "cache": str(tmp_path / "cache")})
    assert arrays.train_images.shape == (20, 28, 28, 3)


def test_fashion_corrupt_gzip_names_the_archive(tmp_path, monkeypatch, fake_fashion):
    folder, _, _ = fake_fashion
    broken = folder / "train-labels-idx1-ubyte.gz"
    broken.write_bytes(gzip.compress(bytes(range(256)) * 4)[:100])  # a truncated stream
    monkeypatch.setattr(FashionMNIST, "resources", [(n, file_md5(folder / n)) for n, _ in FashionMNIST.resources])
    with pytest.raises(DataSourceError, match=rf"datasets\.root: {broken} is not a readable gzip file"):
        fashion_mnist.load({"root": str(folder), "cache": str(tmp_path / "cache")})


def test_fashion_malformed_idx_contents_are_reported(tmp_path, monkeypatch, fake_fashion):
    folder, _, _ = fake_fashion
    write_gz(folder / "t10k-labels-idx1-ubyte.gz", b"\0\0\0\0 not an idx header")
    monkeypatch.setattr(FashionMNIST, "resources", [(n, file_md5(folder / n)) for n, _ in FashionMNIST.resources])
    with pytest.raises(DataSourceError, match=r"datasets\.root: cannot read Fashion-MNIST from .*FashionMNIST/raw"):
        fashion_mnist.load({"root": str(folder), "cache": str(tmp_path / "cache")})


def test_fashion_partial_folder_names_missing_file(tmp_path, trusted_fake_archives):
    folder, _, _ = trusted_fake_archives
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataSourceError, match=r"datasets\.root: .* lacks t10k-labels-idx1-ubyte\.gz"):
        fashion_mnist.load({"root": str(folder), "cache": str(tmp_path / "cache")})


def test_fashion_without_root_suggests_the_debian_package(tmp_path):
    with pytest.raises(DataSourceError, match=r"datasets\.root is not set.*dataset-fashion-mnist"):
        fashion_mnist.load({})
    missing = tmp_path / "nowhere"
    with pytest.raises(DataSourceError, match=rf"train\.root: {missing} does not exist"):
        fashion_mnist.describe({"root": str(missing)}, key="train")


def test_fashion_stalled_download_fails_fast(tmp_path, monkeypatch, silent_server):
    monkeypatch.setattr(FashionMNIST, "mirrors", [silent_server])
    start = time.monotonic()
    with pytest.raises(DataSourceError, match=r"datasets\.download: could not fetch"):
        fashion_mnist.load({"root": str(tmp_path / "dl"), "download": True, "download_timeout": 0.3})
    assert time.monotonic() - start < 3
    assert socket.getdefaulttimeout() == 5.0  # restored


def test_fashion_describe_uses_published_class_totals(trusted_fake_archives):
    folder, _, _ = trusted_fake_archives
    described = fashion_mnist.describe({"root": str(folder), "train_size": 1000, "split_seed": 3})
    assert described["classes"] == FashionMNIST.classes
    assert described["train_counts"] == [100] * 10
    with pytest.raises(ConfigError, match=r"datasets\.train_size"):
        fashion_mnist.describe({"root": str(folder), "train_size": 70000})


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_debian_package_loads_directly(tmp_path):
    spec = {"root": str(DEBIAN_FASHION), "cache": str(tmp_path / "cache"), "train_size": 200, "test_size": 100,
            "image_size": 32}
    arrays = fashion_mnist.load(spec)
    assert arrays.train_images.shape == (200, 32, 32, 3) and arrays.train_images.dtype == np.uint8
    assert arrays.test_images.shape == (100, 32, 32, 3) and arrays.test_labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(arrays.train_labels, minlength=10), np.full(10, 20))
    np.testing.assert_array_equal(np.bincount(arrays.test_labels, minlength=10), np.full(10, 10))
    assert fashion_mnist.describe(spec)["train_counts"] == [20] * 10
    # Reference: decode the test idx file with numpy, take the same stratified subset, upsample by
    # repeating pixel rows/columns as nearest-neighbour 28 → 32 does (source index floor(i * 28 / 32)).
    with gzip.open(DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz") as handle:
        test_images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz") as handle:
        test_labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    chosen = stratified_indices(test_labels, 100, 0, "k")
    source = np.arange(32) * 28 // 32
    reference = test_images[chosen][:, source][:, :, source]
    for channel in range(3):
        np.testing.assert_array_equal(arrays.test_images[..., channel], reference)
    np.testing.assert_array_equal(arrays.test_labels, test_labels[chosen])


# --- CIFAR-10 ------------------------------------------------------------------------------------

def cifar_batch(rng: np.random.Generator, count: int, first_label: int) -> dict:
    return {"batch_label": "tiny", "labels": [(first_label + i) % 10 for i in range(count)],
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "filenames": [f"img{i}.png" for i in range(count)]}


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """cifar-10-python.tar.gz in the real layout: five train batches of 2 and a test batch of 3,
    with torchvision's expected checksums pointed at these files."""
    rng = np.random.default_rng(3)
    build = tmp_path / "build" / CIFAR10.base_folder
    build.mkdir(parents=True)
    batches = {f"data_batch_{b}": cifar_batch(rng, 2, 2 * (b - 1)) for b in range(1, 6)}
    batches["test_batch"] = cifar_batch(rng, 3, 4)
    batches["test_batch"]["data"][0] = np.repeat([10, 120, 250], 1024)  # one uniform colour image
    files = dict(batches, **{"batches.meta": {"label_names": cifar.CLASSES, "num_cases_per_batch": 2}})
    checksums = {}
    for name, content in files.items():
        (build / name).write_bytes(pickle.dumps(content, protocol=2))
        checksums[name] = file_md5(build / name)
    archive = tmp_path / "served" / CIFAR10.filename
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(build, arcname=CIFAR10.base_folder)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{b}", checksums[f"data_batch_{b}"]] for b in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", checksums["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", dict(CIFAR10.meta, md5=checksums["batches.meta"]))
    return archive, batches


def expected_hwc(data: np.ndarray) -> np.ndarray:
    """The pickled rows are the red, green and blue 32×32 planes one after another."""
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_cifar_downloads_from_url_and_reads_batches(tmp_path, tiny_cifar):
    archive, batches = tiny_cifar
    root = tmp_path / "root"
    spec = {"root": str(root), "download": True, "url": archive.as_uri(), "md5": file_md5(archive)}
    arrays = cifar.load(spec)
    assert (root / CIFAR10.filename).is_file()
    train_data = np.concatenate([batches[f"data_batch_{b}"]["data"] for b in range(1, 6)])
    np.testing.assert_array_equal(arrays.train_images, expected_hwc(train_data))
    assert arrays.train_images[1, 2, 3, 1] == train_data[1, 1024 + 2 * 32 + 3]
    np.testing.assert_array_equal(arrays.train_labels, np.arange(10))
    np.testing.assert_array_equal(arrays.test_images, expected_hwc(batches["test_batch"]["data"]))
    np.testing.assert_array_equal(arrays.test_labels, [4, 5, 6])
    assert arrays.train_labels.dtype == np.int64 and arrays.classes == cifar.CLASSES
    assert cifar.locate(spec, "datasets") == ("read", root)  # downloaded and extracted once
    # Once there, no download is needed.
    again = cifar.load({"root": str(root)})
    np.testing.assert_array_equal(again.test_images, arrays.test_images)


def test_cifar_resizes_to_image_size(tmp_path, tiny_cifar):
    archive, _ = tiny_cifar
    root = tmp_path / "root"
    root.mkdir()
    (root / CIFAR10.filename).write_bytes(archive.read_bytes())  # a local archive is extracted, not fetched
    arrays = cifar.load({"root": str(root), "md5": file_md5(archive), "image_size": 16})
    assert arrays.train_images.shape == (10, 16, 16, 3) and arrays.test_images.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(arrays.test_images[0], np.broadcast_to([10, 120, 250], (16, 16, 3)))


@pytest.fixture
def archive_urls(tiny_cifar):
    """The tiny archive as a file:// URL and as an http:// URL served from this process."""
    archive, _ = tiny_cifar
    with serve_directory(archive.parent) as base_url:
        yield {"file": archive.as_uri(), "http": base_url + archive.name}


def test_cifar_downloads_over_http_like_from_file(tmp_path, tiny_cifar, archive_urls):
    archive, batches = tiny_cifar
    loaded = {}
    for kind, url in archive_urls.items():
        root = tmp_path / kind
        loaded[kind] = cifar.load({"root": str(root), "download": True, "url": url, "md5": file_md5(archive)})
        assert file_md5(root / CIFAR10.filename) == file_md5(archive)
    np.testing.assert_array_equal(loaded["http"].train_images, loaded["file"].train_images)
    np.testing.assert_array_equal(loaded["http"].test_labels, [4, 5, 6])


@pytest.mark.parametrize("kind", ["file", "http"])
def test_cifar_archive_checksum_failure_names_the_archive(tmp_path, archive_urls, kind):
    root = tmp_path / "root"
    # No md5: the official archive's MD5 is expected, which the tiny archive does not have.
    with pytest.raises(DataSourceError, match=rf"datasets\.md5: {root / CIFAR10.filename} fails its MD5 check"):
        cifar.load({"root": str(root), "download": True, "url": archive_urls[kind]})
    assert not (root / CIFAR10.base_folder).exists()


def test_cifar_batch_checksum_failure_names_the_file(tmp_path, tiny_cifar):
    archive, _ = tiny_cifar
    root = tmp_path / "root"
    cifar.load({"root": str(root), "download": True, "url": archive.as_uri(), "md5": file_md5(archive)})
    damaged = root / CIFAR10.base_folder / "data_batch_2"
    damaged.write_bytes(damaged.read_bytes() + b"\0")
    with pytest.raises(DataSourceError, match=rf"datasets\.root: {damaged} fails its MD5 check"):
        cifar.load({"root": str(root)})


def test_cifar_missing_root_errors(tmp_path):
    with pytest.raises(DataSourceError, match=r"datasets\.root is not set"):
        cifar.load({})
    empty = tmp_path / "empty"
    with pytest.raises(DataSourceError, match=rf"data\.root: neither {empty / CIFAR10.base_folder} .*download: true"):
        cifar.describe({"root": str(empty)}, key="data")


def test_cifar_stalled_download_fails_fast(tmp_path, silent_server):
    start = time.monotonic()
    with pytest.raises(DataSourceError, match=r"datasets\.download: could not fetch"):
        cifar.load({"root": str(tmp_path / "dl"), "download": True, "url": silent_server + CIFAR10.filename,
                    "download_timeout": 0.3})
    assert time.monotonic() - start < 3
    assert socket.getdefaulttimeout() == 5.0  # restored


def test_cifar_describe_uses_published_class_totals():
    described = cifar.describe({"download": True, "train_size": 500})
    assert described["classes"] == cifar.CLASSES
    assert described["train_counts"] == [50] * 10
    assert described["train_counts"] == subset_counts(np.full(10, 5000), 500, 0, "k").tolist()


# --- synthetic -----------------------------------------------------------------------------------

def nearest_class_mean_accuracy(arrays) -> float:
    train = arrays.train_images.reshape(len(arrays.train_images), -1).astype(np.float32)
    test = arrays.test_images.reshape(len(arrays.test_images), -1).astype(np.float32)
    means = np.stack([train[arrays.train_labels == c].mean(0) for c in range(len(arrays.classes))])
    distances = ((test[:, None, :] - means[None]) ** 2).sum(-1)
    return float((distances.argmin(1) == arrays.test_labels).mean())


def test_synthetic_shapes_balance_and_determinism():
    spec = {"num_classes": 4, "train_size": 103, "test_size": 21, "image_size": 12, "seed": 5}
    arrays = synthetic.load(spec)
    assert arrays.train_images.shape == (103, 12, 12, 3) and arrays.train_images.dtype == np.uint8
    assert arrays.test_images.shape == (21, 12, 12, 3) and arrays.test_labels.dtype == np.int64
    assert arrays.classes == ["class0", "class1", "class2", "class3"]
    np.testing.assert_array_equal(np.bincount(arrays.train_labels), [26, 26, 26, 25])
    assert synthetic.describe(spec)["train_counts"] == [26, 26, 26, 25]
    again = synthetic.load(spec)
    np.testing.assert_array_equal(again.train_images, arrays.train_images)
    np.testing.assert_array_equal(again.test_labels, arrays.test_labels)
    other = synthetic.load(dict(spec, seed=6))
    assert np.abs(other.train_images.astype(int) - arrays.train_images).mean() > 10


def test_synthetic_defaults():
    assert synthetic.describe({}) == {"classes": [f"class{c}" for c in range(10)], "train_counts": [100] * 10}


def test_synthetic_shifted_windows_are_crops_of_the_prototype():
    prototypes = np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6)
    labels = np.array([1, 0, 1])
    windows = synthetic.shifted_windows(prototypes, labels, np.random.default_rng(0), 4)
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 3, 3), rng.integers(0, 3, 3)
    for i, label in enumerate(labels):
        np.testing.assert_array_equal(windows[i], prototypes[label, :, rows[i]:rows[i] + 4, cols[i]:cols[i] + 4])


def test_synthetic_smooth_patterns_have_zero_mean_and_unit_std():
    patterns = synthetic.smooth_patterns(np.random.default_rng(1), 5, 20)
    assert patterns.shape == (5, 3, 20, 20)
    np.testing.assert_allclose(patterns.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(patterns.std(axis=(1, 2, 3)), 1, rtol=1e-4)
    # Smooth: neighbouring pixels differ far less than the pattern varies.
    assert np.abs(np.diff(patterns, axis=-1)).mean() < 0.3


def test_synthetic_chunks_use_their_own_seeded_streams(monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_PIXELS", 8 * 8 * 10)  # chunks of 10 images of 8×8
    spec = {"train_size": 35, "test_size": 5, "image_size": 8, "seed": 2}
    arrays = synthetic.load(spec)
    values = synthetic.settings(spec, "datasets")
    prototypes = synthetic.class_prototypes(10, 8, 2)
    third_chunk = synthetic.render_chunk(prototypes, arrays.train_labels[20:30],
                                         np.random.default_rng([2, synthetic.SPLIT_STREAMS["train"], 3]), 8)
    np.testing.assert_array_equal(arrays.train_images[20:30], third_chunk)
    assert values["train_size"] == 35 and len(arrays.train_images) == 35


def test_synthetic_classes_are_learnable_but_not_trivial():
    arrays = synthetic.load({"train_size": 500, "test_size": 200, "image_size": 16})
    accuracy = nearest_class_mean_accuracy(arrays)
    assert 0.35 < accuracy < 0.95  # chance is 0.1


def test_synthetic_rejects_bad_counts():
    with pytest.raises(ConfigError, match=r"datasets\.num_classes: 1 is less than the minimum of 2"):
        synthetic.load({"num_classes": 1})
    with pytest.raises(ConfigError, match=r"d\.train_size"):
        synthetic.describe({"train_size": 0}, key="d")
