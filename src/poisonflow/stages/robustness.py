"""robustness stage: a trained victim under test-time distortions, or on a folder of user images →
``results/robustness/{dataset}/{attack}/{training}/seed{seed}/{name}.json``.

A distortion entry (blur, jpeg, noise, recapture; :mod:`poisonflow.distortions`) distorts the clean
test set and the poisoned store's ASR set at each level and scores the cached victim on them: ACC
(clean test images, true labels), ASR (triggered images → the target), RA (triggered images →
their true class) and the target rate (clean images of the other classes → the target: the ASR a
distortion produces without any trigger, see :func:`clean_scores`), one row per level. The victim is not retrained: a distortion is an evaluation
axis (the VSSC paper's Fig. 4), and one job covers every level of a family.

An ``ifgsm`` / ``ifgsm-steps`` entry (:mod:`poisonflow.perturbations`) perturbs the same sets
adversarially against the victim itself, by budget or by steps (A-ABL Figs. 3 and 5).

A folder entry scores the victim on the images of a user folder (one subfolder per class name):
with ``triggered: true`` (the paper's recaptured photos and out-of-distribution images, Table 5 and
Fig. 6) ASR over the images whose true class is not the attack's target, and RA; with ``triggered:
false``, ACC. Random parts (noise, the recapture chain, the ``samples`` draw) come from the entry's
``seed`` and the victim's seed, so every victim of a seed sees the same distorted images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .common import SEED_HELP, THREADS_HELP, parse_json, set_threads, write_json


def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="robustness entry name")
    parser.add_argument("--spec", required=True, metavar="JSON", help="the robustness entry (JSON)")
    parser.add_argument("--attack-spec", required=True, metavar="JSON", help="the resolved attacks entry (JSON): its target")
    parser.add_argument("--training", required=True, metavar="JSON", help="the victim's resolved trainings entry (JSON)")
    parser.add_argument("--seed", type=int, required=True, help=SEED_HELP)
    parser.add_argument("--clean", required=True, metavar="STORE", help="clean store (its test split gives ACC)")
    parser.add_argument("--poison", required=True, metavar="STORE", help="poisoned store (its test split is the ASR set)")
    parser.add_argument("--victim-dir", required=True, metavar="DIR", help="the victim's folder (model.pt)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--out", required=True, metavar="JSON", help="output file (.json; a .csv is written beside it)")


def draw(n: int, samples: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``samples`` of ``n`` items (all of them when ``samples`` is None)."""
    if samples is None or samples >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=samples, replace=False))


@dataclass
class Evaluation:
    """What a robustness job scores a victim on: the clean test images and the ASR set (each possibly a
    seeded sample), the class names, the attack's target (None for all-to-all) and the device."""
    clean_images: np.ndarray
    clean_labels: np.ndarray
    asr_images: np.ndarray
    asr_labels: np.ndarray  # the target
    asr_true: np.ndarray
    classes: list[str]
    image_size: int
    target: int | None
    seed: int
    device: object = "cpu"
    amp: object = "auto"


def clean_scores(predictions: np.ndarray, data: Evaluation) -> dict:
    """``acc`` of predictions on the (distorted) clean test images and, for a single-target attack,
    ``target_rate``: the share of its non-target-class images predicted as the target. A distortion
    that wrecks images can push a model to predict one class for everything; when that class is the
    target, ASR rises with no trigger involved, and ``target_rate`` is that floor."""
    scores = {"acc": float(np.mean(predictions == data.clean_labels))}
    others = data.clean_labels != data.target if data.target is not None else np.zeros(0, bool)
    if others.any():
        scores["target_rate"] = float(np.mean(predictions[others] == data.target))
    return scores


def trigger_scores(predictions: np.ndarray, data: Evaluation) -> dict:
    """``asr`` and ``ra`` of predictions on the (distorted or perturbed) ASR set."""
    return {"asr": float(np.mean(predictions == data.asr_labels)), "ra": float(np.mean(predictions == data.asr_true))}


def distortion_rows(model, entry: dict, key: str, data: Evaluation) -> list[dict]:
    """ACC, ASR and RA of ``model`` at each level of a distortion entry (:mod:`poisonflow.distortions`)."""
    from .. import distortions
    from ..evaluate import predict

    family = distortions.FAMILIES[entry["kind"]]
    levels = entry.get("levels") or list(family.levels)
    rows = []
    for level in levels:
        # the same draw for the clean and triggered sets of every level: levels differ by the level only
        clean_rng, asr_rng = np.random.default_rng([data.seed, 0]), np.random.default_rng([data.seed, 1])
        clean = family.apply(data.clean_images, level, entry.get("settings"), clean_rng, key=key)
        row = {"level": level, **clean_scores(predict(model, clean, data.device, amp=data.amp), data)}
        if len(data.asr_labels):
            distorted = family.apply(data.asr_images, level, entry.get("settings"), asr_rng, key=key)
            predictions = predict(model, distorted, data.device, amp=data.amp)
            row.update(trigger_scores(predictions, data))
        rows.append(row)
    return rows


def perturbation_rows(model, entry: dict, key: str, data: Evaluation) -> list[dict]:
    """ACC, ASR, RA and the target rate of ``model`` at each level of an ``ifgsm`` / ``ifgsm-steps``
    entry (:mod:`poisonflow.perturbations`)."""
    from ..evaluate import predictions_under
    from ..perturbations import PERTURBATIONS

    kind = PERTURBATIONS[entry["kind"]]
    settings = kind.check_entry(entry, key)
    step = None if settings["step"] is None else float(settings["step"]) / 255.0
    rows = []
    for level in entry.get("levels") or kind.levels:
        eps, steps = kind.budget(level, settings)
        predicted = predictions_under(model, data.clean_images, data.clean_labels, eps, steps, step, data.device)
        row = {"level": level, **clean_scores(predicted, data)}
        if len(data.asr_labels):
            predicted = predictions_under(model, data.asr_images, data.asr_labels, eps, steps, step, data.device)
            row.update(trigger_scores(predicted, data))
        rows.append(row)
    return rows


def check_entries(config: dict) -> None:
    """Every robustness entry's levels and settings, checked by its distortion family or perturbation
    (a folder entry needs its path; whether the folder exists is checked by its job). Run when the
    workflow is parsed; ConfigError naming ``robustness.<name>...``."""
    from .. import distortions
    from ..errors import ConfigError
    from ..perturbations import PERTURBATIONS

    for name, entry in config.get("robustness", {}).items():
        key = f"robustness.{name}"
        if entry["kind"] == "folder":
            if not entry.get("path"):
                raise ConfigError(f"{key}.path: required for kind folder")
        elif entry["kind"] in PERTURBATIONS:
            PERTURBATIONS[entry["kind"]].check_entry(entry, key)
        else:
            distortions.check_entry(entry, key)


def folder_rows(model, entry: dict, key: str, data: Evaluation) -> list[dict]:
    """One row: the victim on a user folder of images with their true classes."""
    from ..distortions import read_folder
    from ..errors import ConfigError
    from ..evaluate import predict

    images, labels = read_folder(entry["path"], data.classes, data.image_size)
    if not len(labels):
        raise ConfigError(f"{key}.path: no images under {entry['path']}")
    predictions = predict(model, images, data.device, amp=data.amp)
    row: dict = {"level": None, "images": int(len(labels))}
    if not entry["triggered"]:
        row["acc"] = float(np.mean(predictions == labels))
        return [row]
    if data.target is None:
        raise ConfigError(f"{key}.triggered: an all-to-all attack has no single target to score a folder against")
    scored = labels != data.target  # as the ASR set: images of the target class cannot show a flip
    row["asr_images"] = int(scored.sum())
    row["asr"] = float(np.mean(predictions[scored] == data.target)) if scored.any() else float("nan")
    row["ra"] = float(np.mean(predictions[scored] == labels[scored])) if scored.any() else float("nan")
    return [row]


def scorer(kind: str) -> Callable:
    """The function that scores an entry of ``kind``: a distortion family, a perturbation, a folder."""
    from .. import distortions, perturbations

    table = {"folder": folder_rows, **{name: distortion_rows for name in distortions.FAMILIES},
             **{name: perturbation_rows for name in perturbations.PERTURBATIONS}}
    return table[kind]


def run(args) -> None:
    import pandas as pd

    from ..devices import torch_device
    from ..modelio import load_model, model_spec
    from ..provenance import record
    from ..store import read_store
    from .. import targets

    set_threads(args.threads)
    entry = parse_json(args.spec, "--spec")
    attack = parse_json(args.attack_spec, "--attack-spec")
    training = parse_json(args.training, "--training")
    key = f"robustness.{args.name}"
    clean, poisoned = read_store(args.clean), read_store(args.poison)
    classes = list(clean.attrs["classes"])
    image_size = int(clean["test/images"].shape[1])
    device = torch_device()
    model = load_model(Path(args.victim_dir) / "model.pt", device,
                       spec=model_spec(training["model"], len(classes), image_size)).eval()
    seed = int(entry["seed"]) * 1_000_003 + args.seed
    rng = np.random.default_rng([seed, 2])
    test = draw(len(clean["test/labels"]), entry["samples"], rng)
    asr_set = "test/labels" in poisoned and len(poisoned["test/labels"]) > 0
    asr = draw(len(poisoned["test/labels"]), entry["samples"], rng) if asr_set else np.zeros(0, dtype=int)
    empty = np.zeros(0, dtype=np.int64)
    data = Evaluation(
        np.asarray(clean["test/images"])[test], np.asarray(clean["test/labels"])[test],
        np.asarray(poisoned["test/images"])[asr] if asr_set else np.zeros((0, image_size, image_size, 3), np.uint8),
        np.asarray(poisoned["test/labels"])[asr] if asr_set else empty,
        np.asarray(poisoned["test/true_labels"])[asr] if asr_set else empty,
        classes, image_size, None if targets.all_to_all(attack) else int(attack["target"]), seed, device,
        training.get("amp", "auto"))
    started = time.perf_counter()
    rows = scorer(entry["kind"])(model, entry, key, data)
    seconds = time.perf_counter() - started
    provenance = record("robustness", entry=entry, name=args.name, seed=args.seed, device=device,
                        inputs=[args.clean, args.poison, Path(args.victim_dir) / "model.pt"],
                        code=["poisonflow.stages.robustness", "poisonflow.distortions", "poisonflow.perturbations"])
    out = Path(args.out)
    write_json({"name": args.name, "kind": entry["kind"], "rows": rows, "seconds": seconds, "device": str(device)},
               out, provenance=provenance)
    from ..checkpoint import atomic_write

    atomic_write(out.with_suffix(".csv"), lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    print(f"{out}: {entry['kind']} at {len(rows)} level(s) in {seconds:.1f} s")
