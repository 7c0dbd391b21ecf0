"""poison stage: clean store (+ scores, + surrogate) → ``results/poison/{dataset}/{attack}/seed{seed}.zarr``.

Sample i of the poisoned store is clean training sample i, possibly triggered and relabelled.
For backdoors, the test split of the poisoned store is the ASR set: the clean test images of the
non-target classes with the trigger, labelled with the target. For unlearnable examples, a
``rate`` fraction of the training images is replaced by protected ones (labels kept) and there is
no test split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..attacks import ATTACKS, UNLEARNABLE, PoisonContext
from .. import targets
from ..targets import poison_budget
from ..errors import ConfigError
from ..selection import select
from ..devices import torch_device
from ..models import build_model
from ..store import read_store, write_store
from ..trainer import images_to_tensor, load_weights, to_float
from .common import set_threads
from .trigger import load_generator

CHUNK = 4096


def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="attacks entry name")
    parser.add_argument("--spec", required=True, help="the resolved attacks entry (JSON)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--clean", required=True, help="clean store")
    parser.add_argument("--scores", help="scores CSV of the attack's surrogate (hard-sample selection)")
    parser.add_argument("--surrogate-dir", help="the attack's surrogate (model.pt), for kinds that use a model")
    parser.add_argument("--generator-dir", help="the attack's trained trigger (generator.pt), for kinds that train one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="output store path")


def transform(images: np.ndarray, fn) -> np.ndarray:
    """Apply a float-image function to uint8 NHWC images in chunks; round back to uint8."""
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        x = to_float(images_to_tensor(images[start:start + CHUNK]))
        y = fn(x).clamp(0, 1).mul(255).round().to(torch.uint8)
        out[start:start + CHUNK] = y.permute(0, 2, 3, 1).numpy()
    return out


def transform_with_labels(images: np.ndarray, labels: torch.Tensor, fn) -> np.ndarray:
    """Like :func:`transform` for functions of (images, labels)."""
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        x = to_float(images_to_tensor(images[start:start + CHUNK]))
        y = fn(x, labels[start:start + CHUNK]).clamp(0, 1).mul(255).round().to(torch.uint8)
        out[start:start + CHUNK] = y.permute(0, 2, 3, 1).numpy()
    return out


def load_scores(path: str, n: int) -> dict[str, np.ndarray]:
    table = pd.read_csv(path).sort_values("index")
    if len(table) != n or not np.array_equal(table["index"].to_numpy(), np.arange(n)):
        raise ConfigError(f"{path}: scores do not cover the {n} training samples of this dataset")
    return {column: table[column].to_numpy() for column in ("loss", "gradnorm", "forgetting")}


def poison(attack: dict, seed: int, train_images, train_labels, test_images, test_labels, num_classes: int,
           scores: dict | None = None, key: str = "attack", context: PoisonContext | None = None) -> dict[str, np.ndarray]:
    """The arrays of a poisoned store for a resolved attack entry."""
    if not targets.all_to_all(attack) and attack["target"] >= num_classes:
        raise ConfigError(f"{key}.target: class {attack['target']} is outside the dataset's {num_classes} classes")
    _, count = poison_budget(attack, np.bincount(train_labels, minlength=num_classes).tolist())
    chosen = select(train_labels, attack, count, seed, scores, key=key)
    trigger_spec = attack.get("trigger", {})
    fragment = ATTACKS.fragment(attack["kind"], key=f"{key}.kind")
    trigger = ATTACKS.get(attack["kind"]).build(
        attack, train_images.shape[1], int(trigger_spec.get("seed", seed)), context=context)

    def training_trigger(indices: np.ndarray) -> np.ndarray:
        """The training-time trigger on these samples: poison(x, y) where the kind has one (a
        label-consistent perturbation, a partial adaptive trigger), else the test trigger."""
        if "poison" in fragment.capabilities:
            return transform_with_labels(train_images[indices], torch.as_tensor(train_labels[indices]), trigger.poison)
        return transform(train_images[indices], trigger.apply)

    images = train_images.copy()
    labels = train_labels.copy()
    images[chosen] = training_trigger(chosen)
    if attack["label_mode"] == "dirty":
        labels[chosen] = targets.relabel(train_labels[chosen], attack, num_classes)
    poisoned = np.zeros(len(labels), dtype=bool)
    poisoned[chosen] = True

    cover = np.zeros(len(labels), dtype=bool)  # trigger applied, label kept (adaptive attacks)
    if "cover" in fragment.capabilities and attack["cover_rate"] > 0:
        pool = np.flatnonzero(~poisoned)
        size = min(len(pool), int(round(attack["cover_rate"] * len(labels))))
        covered = np.sort(np.random.default_rng([seed, 2]).choice(pool, size=size, replace=False))
        images[covered] = training_trigger(covered)
        cover[covered] = True

    noise_mode = np.zeros(len(labels), dtype=bool)
    noise_ratio = float(trigger.noise_ratio) if "noise" in fragment.capabilities else 0.0  # WaNet's noise mode
    if noise_ratio > 0:
        rng = np.random.default_rng([seed, 1])
        pool = np.flatnonzero(~poisoned & ~cover)
        extra = np.sort(rng.choice(pool, size=min(len(pool), int(round(noise_ratio * count))), replace=False))
        generator = torch.Generator().manual_seed(seed)
        images[extra] = transform(train_images[extra], lambda x: trigger.noise(x, generator))
        noise_mode[extra] = True

    keep, asr_labels = targets.asr_set(test_labels, attack, num_classes)
    return {
        "train/images": images, "train/labels": labels.astype(np.int64),
        "train/poisoned": poisoned, "train/true_labels": train_labels.astype(np.int64),
        "train/noise_mode": noise_mode, "train/cover": cover,
        "test/images": transform(test_images[keep], trigger.apply),
        "test/labels": asr_labels,
        "test/true_labels": test_labels[keep].astype(np.int64),
    }


def protect(attack: dict, seed: int, train_images, train_labels, context: PoisonContext,
            key: str = "attack") -> dict[str, np.ndarray]:
    """The arrays of a store of unlearnable examples: a seeded ``rate`` fraction protected, labels kept."""
    n = len(train_labels)
    count = int(round(float(attack.get("rate", 1.0)) * n))
    if count < 1:
        raise ConfigError(f"{key}.rate: {attack.get('rate')} protects no sample")
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))
    module = UNLEARNABLE.get(attack["kind"], key=f"{key}.kind")
    protected = np.asarray(module.protect(attack, train_images[chosen], train_labels[chosen], context, seed))
    if protected.shape != train_images[chosen].shape or protected.dtype != np.uint8:
        raise ValueError(f"{attack['kind']}.protect returned {protected.shape} {protected.dtype}, "
                         f"expected {train_images[chosen].shape} uint8")
    images = train_images.copy()
    images[chosen] = protected
    poisoned = np.zeros(n, dtype=bool)  # samples whose released image differs from the clean one
    poisoned[chosen] = np.any(protected.reshape(count, -1) != train_images[chosen].reshape(count, -1), axis=1)
    return {"train/images": images, "train/labels": train_labels.astype(np.int64), "train/poisoned": poisoned,
            "train/true_labels": train_labels.astype(np.int64)}


def load_surrogate(attack: dict, surrogate_dir: str | None, num_classes: int, image_size: int, device):
    if not surrogate_dir:
        return None
    model = build_model(attack["surrogate_entry"]["training"]["model"], num_classes, image_size)
    return load_weights(model, Path(surrogate_dir) / "model.pt", device)


def run(args) -> None:
    set_threads(args.threads)
    attack = json.loads(args.spec)
    key = f"attacks.{args.name}"
    clean = read_store(args.clean)
    train_images, train_labels = clean["train/images"], clean["train/labels"]
    classes = list(clean.attrs["classes"])
    device = torch_device()
    workdir = Path(args.out).with_name(Path(args.out).name + ".work")
    context = PoisonContext(train_images, train_labels, classes, device=device, workdir=workdir,
                            surrogate=load_surrogate(attack, args.surrogate_dir, len(classes), train_images.shape[1], device),
                            extra={"key": key},
                            generator=load_generator(args.generator_dir) if args.generator_dir else None)
    if attack["kind"] in UNLEARNABLE:
        arrays = protect(attack, args.seed, train_images, train_labels, context, key=key)
        summary = f"changed {int(arrays['train/poisoned'].sum())} of {len(train_labels)} training images"
    else:
        scores = load_scores(args.scores, len(train_labels)) if args.scores else None
        arrays = poison(attack, args.seed, train_images, train_labels, clean["test/images"], clean["test/labels"],
                        len(classes), scores, key=key, context=context)
        summary = (f"poisoned {int(arrays['train/poisoned'].sum())} of {len(train_labels)} training samples "
                   f"({attack['label_mode']}-label, selection {attack.get('selection', 'random')}); "
                   f"ASR set of {len(arrays['test/labels'])} images")
    write_store(args.out, arrays, {"attack": attack, "attack_name": args.name, "seed": args.seed, "classes": classes})
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.out}: {summary}")
