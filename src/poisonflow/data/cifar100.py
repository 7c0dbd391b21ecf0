"""CIFAR-100: 50,000 train / 10,000 test real 32×32 colour images, 100 fine classes.

Same layout, keys and checks as CIFAR-10 (see :mod:`poisonflow.data.cifar`): ``root:`` holds
``cifar-100-python/`` (files ``train``, ``test``, ``meta``, each verified by its MD5 as it is read)
or the archive ``cifar-100-python.tar.gz``; ``download: true`` fetches the archive from ``url``
(default: the official one) and checks it against ``md5`` (default: the official archive's), into
``root`` or ``{cache}/cifar100``. Labels are the fine labels, classes in the published order.
"""

from __future__ import annotations

from pathlib import Path

from .base import DatasetArrays
from .cifar import NATIVE_SIZE, CifarVariant, describe_variant, locate_variant, stream_variant
from .streaming import DatasetStream, materialize

__all__ = ["NATIVE_SIZE", "describe", "load", "stream"]

BASE_FOLDER = "cifar-100-python"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
LAYOUT_FILES = ["train", "test", "meta"]
CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]


def dataset_class():
    """torchvision's ``CIFAR100``, imported on use (``describe`` must stay light)."""
    from torchvision.datasets import CIFAR100

    return CIFAR100


CIFAR100 = CifarVariant("cifar100", dataset_class, BASE_FOLDER, ARCHIVE_NAME, tuple(LAYOUT_FILES), tuple(CLASSES),
                        (500,) * 100, (100,) * 100)


def locate(spec: dict, key: str = "datasets") -> tuple[str, Path]:
    return locate_variant(CIFAR100, spec, key)


def stream(spec: dict, key: str = "datasets") -> DatasetStream:
    return stream_variant(CIFAR100, spec, key)


def load(spec: dict, key: str = "datasets") -> DatasetArrays:
    return materialize(stream(spec, key))


def describe(spec: dict, key: str = "datasets") -> dict:
    return describe_variant(CIFAR100, spec, key)
