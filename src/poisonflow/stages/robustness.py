"""robustness stage: a trained victim under test-time distortions, or on a folder of user images →
``results/robustness/{dataset}/{attack}/{training}/seed{seed}/{name}.json``.

A distortion entry (blur, jpeg, noise, recapture; :mod:`poisonflow.distortions`) distorts the clean
test set and the poisoned store's ASR set at each level and scores the cached victim on them: ACC
(clean test images, true labels), ASR (triggered images → the target) and RA (triggered images →
their true class), one row per level. The victim is not retrained: a distortion is an evaluation
axis (the VSSC paper's Fig. 4), and one job covers every level of a family.

A folder entry scores the victim on the images of a user folder (one subfolder per class name):
with ``triggered: true`` (the paper's recaptured photos and out-of-distribution images, Table 5 and
Fig. 6) ASR over the images whose true class is not the attack's target, and RA; with ``triggered:
false``, ACC. Random parts (noise, the recapture chain, the ``samples`` draw) come from the entry's
``seed`` and the victim's seed, so every victim of a seed sees the same distorted images.
"""

from __future__ import annotations

import time
from pathlib import Path

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


def distortion_rows(model, entry: dict, clean_images, clean_labels, asr_images, asr_labels, asr_true,
                    seed: int, device, key: str, amp="auto") -> list[dict]:
    """ACC, ASR and RA of ``model`` at each level of a distortion entry."""
    from .. import distortions
    from ..evaluate import predict

    family = distortions.FAMILIES[entry["kind"]]
    levels = entry.get("levels") or list(family.levels)
    rows = []
    for level in levels:
        # the same draw for the clean and triggered sets of every level: levels differ by the level only
        clean_rng, asr_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
        clean = family.apply(clean_images, level, entry["settings"], clean_rng, key=key)
        row = {"level": level, "acc": float(np.mean(predict(model, clean, device, amp=amp) == clean_labels))}
        if len(asr_labels):
            predictions = predict(model, family.apply(asr_images, level, entry["settings"], asr_rng, key=key), device, amp=amp)
            row.update(asr=float(np.mean(predictions == asr_labels)), ra=float(np.mean(predictions == asr_true)))
        rows.append(row)
    return rows


def folder_rows(model, entry: dict, classes: list[str], image_size: int, target: int | None, device, key: str,
                amp="auto") -> list[dict]:
    """One row: the victim on a user folder of images with their true classes."""
    from ..distortions import read_folder
    from ..errors import ConfigError
    from ..evaluate import predict

    images, labels = read_folder(entry["path"], classes, image_size)
    if not len(labels):
        raise ConfigError(f"{key}.path: no images under {entry['path']}")
    predictions = predict(model, images, device, amp=amp)
    row: dict = {"level": None, "images": int(len(labels))}
    if not entry["triggered"]:
        row["acc"] = float(np.mean(predictions == labels))
        return [row]
    if target is None:
        raise ConfigError(f"{key}.triggered: an all-to-all attack has no single target to score a folder against")
    scored = labels != target  # as the ASR set: images of the target class cannot show a flip
    row["asr_images"] = int(scored.sum())
    row["asr"] = float(np.mean(predictions[scored] == target)) if scored.any() else float("nan")
    row["ra"] = float(np.mean(predictions[scored] == labels[scored])) if scored.any() else float("nan")
    return [row]


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
    amp = training.get("amp", "auto")
    seed = int(entry["seed"]) * 1_000_003 + args.seed
    started = time.perf_counter()
    if entry["kind"] == "folder":
        target = None if targets.all_to_all(attack) else int(attack["target"])
        rows = folder_rows(model, entry, classes, image_size, target, device, key, amp)
    else:
        rng = np.random.default_rng([seed, 2])
        test = draw(len(clean["test/labels"]), entry["samples"], rng)
        asr_set = "test/labels" in poisoned and len(poisoned["test/labels"]) > 0
        asr = draw(len(poisoned["test/labels"]), entry["samples"], rng) if asr_set else np.zeros(0, dtype=int)
        rows = distortion_rows(
            model, entry, np.asarray(clean["test/images"])[test], np.asarray(clean["test/labels"])[test],
            np.asarray(poisoned["test/images"])[asr] if asr_set else None,
            np.asarray(poisoned["test/labels"])[asr] if asr_set else np.zeros(0, dtype=int),
            np.asarray(poisoned["test/true_labels"])[asr] if asr_set else np.zeros(0, dtype=int),
            seed, device, key, amp)
    seconds = time.perf_counter() - started
    provenance = record("robustness", entry=entry, name=args.name, seed=args.seed, device=device,
                        inputs=[args.clean, args.poison, Path(args.victim_dir) / "model.pt"],
                        code=["poisonflow.stages.robustness", "poisonflow.distortions"])
    out = Path(args.out)
    write_json({"name": args.name, "kind": entry["kind"], "rows": rows, "seconds": seconds, "device": str(device)},
               out, provenance=provenance)
    from ..checkpoint import atomic_write

    atomic_write(out.with_suffix(".csv"), lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    print(f"{out}: {entry['kind']} at {len(rows)} level(s) in {seconds:.1f} s")
