"""Fixtures shared by the test files: the config schema and a tiny valid config, tiny image sets,
stores and trainings, a results directory with metrics files, and local HTTP servers.

Fixtures that give helpers return functions (factories), so a test calls them with its own sizes.
Imports of poisonflow (and torch through it) happen inside the fixtures: collecting a test file
that does not use them stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import http.server
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# The smallest config the schema and the semantic checks accept: the built-in digits dataset, a
# width-4 convnet, BadNets without a defense, one seed.
TINY_CONFIG = {
    "datasets": {"digits": {"source": "digits"}},
    "models": {"m": {"arch": "convnet", "width": 4}},
    "trainings": {"t": {"model": "m"}},
    "attacks": {"a": {"kind": "badnets"}},
    "defenses": {"n": {"kind": "none"}},
    "experiments": [{"dataset": ["digits"], "attack": ["a"], "training": ["t"], "defense": ["n"], "seed": [0]}],
}

# A resolved trainings entry (model inline) that trains a width-4 convnet on 8-px images in well
# under a second per epoch on one CPU thread.
TINY_TRAINING = {
    "model": {"arch": "convnet", "width": 4},
    "epochs": 1,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "constant"},
    "augment": [],
    "adversarial": None,
}


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

@pytest.fixture
def config_schema() -> dict:
    """The config schema the workflow validates against (the base schema with every kind's
    fragment assembled in), a fresh copy."""
    from poisonflow.kinds import config_schema

    return copy.deepcopy(config_schema())


@pytest.fixture
def tiny_config() -> dict:
    """A fresh copy of :data:`TINY_CONFIG` (a raw config: not validated, defaults not filled)."""
    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture
def validate_config():
    """``validate_config(raw)``: the raw config validated by the schema, defaults filled (no
    semantic checks)."""
    from poisonflow.config import validate

    return lambda raw: validate(copy.deepcopy(raw))


@pytest.fixture
def load_config():
    """``load_config(raw)``: a :class:`poisonflow.config.Config` (validated and checked)."""
    from poisonflow.config import load

    return lambda raw: load(copy.deepcopy(raw))


@pytest.fixture
def tiny_training() -> dict:
    """A fresh copy of :data:`TINY_TRAINING`; change what a test needs (epochs, augment, width)."""
    return copy.deepcopy(TINY_TRAINING)


# --------------------------------------------------------------------------------------------
# images and stores
# --------------------------------------------------------------------------------------------

def _noise_images(n: int, size: int = 8, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return images, (np.arange(n) % classes).astype(np.int64)


@pytest.fixture
def noise_images():
    """``noise_images(n, size=8, classes=5, seed=0)``: (uint8 NHWC noise images, labels 0, 1, …
    cycling through the classes)."""
    return _noise_images


def _store_arrays(n: int = 40, size: int = 8, classes: int = 2, poisoned: int = 4, test: int = 2,
                  seed: int = 0) -> dict:
    images, labels = _noise_images(n, size, classes, seed)
    flags = np.zeros(n, bool)
    flags[:poisoned] = True
    return {"train/images": images, "train/labels": labels, "train/poisoned": flags, "train/true_labels": labels,
            "test/images": np.zeros((test, size, size, 3), np.uint8), "test/labels": np.zeros(test, np.int64)}


@pytest.fixture
def store_arrays():
    """``store_arrays(n=40, size=8, classes=2, poisoned=4, test=2, seed=0)``: the arrays of a
    poisoned store: noise images, cyclic labels, the first ``poisoned`` samples flagged
    (labels unchanged), an all-zero test split."""
    return _store_arrays


@pytest.fixture
def tiny_store(store_arrays):
    """``tiny_store(path, **store_arrays_args)``: write a complete store (classes named 'a', 'b',
    …) and return its arrays."""
    from poisonflow.store import write_store

    def write(path, **kwargs) -> dict:
        arrays = store_arrays(**kwargs)
        classes = [chr(ord("a") + i) for i in range(kwargs.get("classes", 2))]
        write_store(path, arrays, {"classes": classes})
        return arrays

    return write


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------

@pytest.fixture
def results_dir(tmp_path) -> Path:
    """An empty ``results`` directory under the test's tmp_path (not created yet)."""
    return tmp_path / "results"


@pytest.fixture
def write_metrics():
    """``write_metrics(results, metrics, dataset="digits", attack="badnets", training="quick",
    seed=0, defense="none")``: a defense job's ``metrics.json``, at the path the workflow uses."""

    def write(results: Path, metrics: dict, dataset: str = "digits", attack: str = "badnets",
              training: str = "quick", seed: int = 0, defense: str = "none") -> Path:
        path = Path(results) / "defenses" / dataset / attack / training / f"seed{seed}" / defense / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(metrics))
        return path

    return write


# --------------------------------------------------------------------------------------------
# local HTTP servers (dataset downloads)
# --------------------------------------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve_directory(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def serve_directory():
    """``with serve_directory(folder) as url``: serve ``folder`` over HTTP on a free local port;
    ``url`` is the base URL, with a trailing slash."""
    return _serve_directory


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


@pytest.fixture
def one_torch_thread():
    """One torch thread, as a job runs by default (two threads on two busy cores make small models
    and pipelines many times slower); the count is restored afterwards. Modules that want it use
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
