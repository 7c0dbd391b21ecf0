"""poison stage: clean store (+ scores, + surrogate) → ``results/poison/{dataset}/{attack}/seed{seed}.zarr``.

Sample i of the poisoned store is clean training sample i, possibly triggered and relabelled.
For backdoors, the test split of the poisoned store is the ASR set: the clean test images of the
non-target classes with the trigger, labelled with the target. For unlearnable examples, a
``rate`` fraction of the training images is replaced by protected ones (labels kept) and there is
no test split.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch, pandas and the modules that import them are imported inside the functions that use them,
# so that `poisonflow poison --help` starts without them
from ..attacks import ATTACKS, UNLEARNABLE, PoisonContext
from .. import targets
from ..targets import poison_budget
from ..errors import ConfigError
from ..selection import select
from .common import SEED_HELP, THREADS_HELP, parse_json, set_threads
from .trigger import load_generator

if TYPE_CHECKING:
    import torch

CHUNK = 4096


def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="attacks entry name (for messages and the store's attributes)")
    parser.add_argument("--spec", required=True, metavar="JSON", help="the resolved attacks entry (JSON)")
    parser.add_argument("--seed", type=int, required=True, help=SEED_HELP + "; draws the poisoned samples")
    parser.add_argument("--clean", required=True, metavar="STORE", help="clean store")
    parser.add_argument("--scores", metavar="CSV", help="scores CSV of the attack's surrogate (hard-sample selection)")
    parser.add_argument("--surrogate-dir", metavar="DIR", help="the attack's surrogate (model.pt), for kinds that use a model")
    parser.add_argument("--generator-dir", metavar="DIR", help="the attack's trained trigger (generator.pt), for kinds that train one")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--out", required=True, metavar="STORE", help="output store path (.zarr)")


def transform(images: np.ndarray, fn) -> np.ndarray:
    """Apply a float-image function to uint8 NHWC images in chunks; round back to uint8."""
    import torch

    from ..trainer import images_to_tensor, to_float

    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        x = to_float(images_to_tensor(images[start:start + CHUNK]))
        y = fn(x).clamp(0, 1).mul(255).round().to(torch.uint8)
        out[start:start + CHUNK] = y.permute(0, 2, 3, 1).numpy()
    return out


def transform_with_labels(images: np.ndarray, labels: torch.Tensor, fn) -> np.ndarray:
    """Like :func:`transform` for functions of (images, labels)."""
    import torch

    from ..trainer import images_to_tensor, to_float

    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        x = to_float(images_to_tensor(images[start:start + CHUNK]))
        y = fn(x, labels[start:start + CHUNK]).clamp(0, 1).mul(255).round().to(torch.uint8)
        out[start:start + CHUNK] = y.permute(0, 2, 3, 1).numpy()
    return out


def load_scores(path: str, n: int) -> dict[str, np.ndarray]:
    import pandas as pd

    table = pd.read_csv(path).sort_values("index")
    if len(table) != n or not np.array_equal(table["index"].to_numpy(), np.arange(n)):
        raise ConfigError(f"{path}: scores do not cover the {n} training samples of this dataset")
    return {column: table[column].to_numpy() for column in ("loss", "gradnorm", "forgetting")}


def poison(attack: dict, seed: int, train_images, train_labels, test_images, test_labels, num_classes: int,
           scores: dict | None = None, key: str = "attack", context: PoisonContext | None = None,
           report: dict | None = None) -> dict[str, np.ndarray]:
    """The arrays of a poisoned store for a resolved attack entry. A kind with the ``report``
    capability adds its trigger's ``report()`` (e.g. VSSC's acceptance rate) to ``report``."""
    import torch

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
    if "labelled-test" in fragment.capabilities:  # the trigger edits each test image for its true class
        asr_images = transform_with_labels(test_images[keep], torch.as_tensor(test_labels[keep]), trigger.apply_labelled)
    else:
        asr_images = transform(test_images[keep], trigger.apply)
    if "report" in fragment.capabilities and report is not None:
        report.update(trigger.report())
    return {
        "train/images": images, "train/labels": labels.astype(np.int64),
        "train/poisoned": poisoned, "train/true_labels": train_labels.astype(np.int64),
        "train/noise_mode": noise_mode, "train/cover": cover,
        "test/images": asr_images,
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
    """The attack's trained surrogate (``model.pt`` of ``surrogate_dir``), checked against its
    sidecar's digest; None without a directory."""
    if not surrogate_dir:
        return None
    from ..modelio import load_model, model_spec

    spec = model_spec(attack["surrogate_entry"]["training"]["model"], num_classes, image_size)
    return load_model(Path(surrogate_dir) / "model.pt", device, spec=spec)


def run(args) -> None:
    from ..attacks import kind_registry
    from ..devices import torch_device
    from ..provenance import record
    from ..store import read_store, write_store

    set_threads(args.threads)
    attack = parse_json(args.spec, "--spec")
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
    trigger_report: dict = {}  # what the kind reports of its generation (store attribute ``trigger_report``)
    started = time.perf_counter()  # the generation itself: after start-up, reading and model loading
    if attack["kind"] in UNLEARNABLE:
        arrays = protect(attack, args.seed, train_images, train_labels, context, key=key)
        summary = f"changed {int(arrays['train/poisoned'].sum())} of {len(train_labels)} training images"
    else:
        scores = load_scores(args.scores, len(train_labels)) if args.scores else None
        arrays = poison(attack, args.seed, train_images, train_labels, clean["test/images"], clean["test/labels"],
                        len(classes), scores, key=key, context=context, report=trigger_report)
        summary = (f"poisoned {int(arrays['train/poisoned'].sum())} of {len(train_labels)} training samples "
                   f"({attack['label_mode']}-label, selection {attack.get('selection', 'random')}); "
                   f"ASR set of {len(arrays['test/labels'])} images")
    generation_seconds = time.perf_counter() - started
    provenance = record(
        "poison", entry=attack, name=args.name, seed=args.seed, device=device,
        inputs=[args.clean, args.scores, args.surrogate_dir and Path(args.surrogate_dir) / "model.pt",
                args.generator_dir and Path(args.generator_dir) / "generator.pt"],
        code=["poisonflow.stages.poison", kind_registry(attack["kind"]).module_name(attack["kind"])])
    timing = {"generation_seconds": generation_seconds,
              "measures": "the poison/protect call: trigger building, sample selection and image generation, "
                          "without process start-up, reading the inputs or writing the store"}
    write_store(args.out, arrays, {"attack": attack, "attack_name": args.name, "seed": args.seed, "classes": classes,
                                   "timing": timing, **({"trigger_report": trigger_report} if trigger_report else {})},
                provenance=provenance)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.out}: {summary}")
