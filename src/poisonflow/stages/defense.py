"""defense stage: a poisoned store and its victim → the defended model and its ``metrics.json``.

The defense itself sees no ground truth; this stage scores it afterwards: the usual metrics on
the defended model, ``rho_vul`` (poison ratio among the samples it kept) when it filters data,
and ``nder`` against the victim (seed 004's normalized defense effectiveness rating).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from ..defenses import DEFENSES, DefenseContext, SplitResult
from .common import SEED_HELP, THREADS_HELP, parse_json, read_json, set_threads, write_json


def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="defenses entry name (for messages)")
    parser.add_argument("--spec", required=True, metavar="JSON", help="the resolved defenses entry (JSON)")
    parser.add_argument("--training", required=True, metavar="JSON",
                        help="the victim's resolved trainings entry (JSON): its model and training recipe")
    parser.add_argument("--evaluation", required=True, metavar="JSON",
                        help="the resolved evaluation section (JSON): the PGD attack of pgd_acc, or null")
    parser.add_argument("--seed", type=int, required=True, help=SEED_HELP)
    parser.add_argument("--clean", required=True, metavar="STORE",
                        help="clean store: its reserve is the defender's clean data, its test split gives ACC")
    parser.add_argument("--poison", required=True, metavar="STORE",
                        help="poisoned store: the released training set and the ASR set")
    parser.add_argument("--victim-dir", required=True, metavar="DIR",
                        help="the victim's folder (model.pt, metrics.json)")
    parser.add_argument("--out-dir", required=True, metavar="DIR",
                        help="output folder: model.pt, model.json, metrics.json, training histories, and a "
                             "splitting defense's per-sample scores (scores.npz, scores.png)")
    parser.add_argument("--features", metavar="NPZ",
                        help="features.npz of the features stage on the same poisoned store (defenses that name "
                             "a features entry)")
    parser.add_argument("--split", metavar="NPZ",
                        help="split.npz of the split stage: a splitting defense's split (its own, or the one a "
                             "split-train entry trains on)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def nder(before: dict, after: dict) -> float | None:
    """[max(0, ΔASR/ASR_bd) − max(0, ΔACC/ACC_bd) + 1] / 2 with Δ = before − after."""
    if not before.get("asr") or not before.get("acc") or "asr" not in after:
        return None
    d_asr = (before["asr"] - after["asr"]) / before["asr"]
    d_acc = (before["acc"] - after["acc"]) / before["acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0


def screening_set(clean, poisoned, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clean test images and triggered ASR images in a seeded order, and which ones are triggered."""
    images = [clean["test/images"]]
    if "test/images" in poisoned:
        images.append(poisoned["test/images"])
    truth = np.concatenate([np.zeros(len(images[0]), bool)] + [np.ones(len(x), bool) for x in images[1:]])
    order = np.random.default_rng([seed, 2]).permutation(len(truth))
    return np.concatenate(images)[order], truth[order]


def detection_metrics(truth: np.ndarray, scores: np.ndarray | None, flags: np.ndarray | None) -> dict:
    """AUROC of the scores and TPR / FPR of the flags against which inputs are triggered."""
    from sklearn.metrics import roc_auc_score

    out = {}
    if not truth.any() or truth.all():
        return out
    if scores is not None:
        out["auroc"] = float(roc_auc_score(truth, np.asarray(scores, dtype=np.float64)))
    if flags is not None:
        flags = np.asarray(flags, dtype=bool)
        out["tpr"] = float(flags[truth].mean())
        out["fpr"] = float(flags[~truth].mean())
    return out


THRESHOLD_PREFIX = "threshold: "  # scores.npz: a threshold drawn on the score named after the prefix


def write_sample_scores(out: Path, result, poisoned: np.ndarray, title: str) -> None:
    """A splitting defense's per-sample scores: ``scores.npz`` (each score under its name, the
    samples kept, the ground-truth poison flags, each threshold as ``threshold: {score}``) and their
    distributions, clean vs poisoned, in ``scores.png`` (and ``.pdf``)."""
    from ..checkpoint import atomic_write
    from ..figures import score_distributions

    arrays = {name: np.asarray(values) for name, values in result.sample_scores.items()}
    if result.kept is not None:
        arrays["kept"] = np.asarray(result.kept, dtype=bool)
    arrays["poisoned"] = np.asarray(poisoned, dtype=bool)
    for name, value in (result.thresholds or {}).items():
        arrays[f"{THRESHOLD_PREFIX}{name}"] = np.float64(value)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: savez would append .npz to a path
            np.savez(handle, **arrays)

    atomic_write(out / "scores.npz", write)
    score_distributions(result.sample_scores, poisoned, out / "scores.png", result.thresholds, title)


def split_metrics(kept, truth) -> dict:
    """How a split compares with ground truth (scored after it was made): ``gamma`` the kept share,
    ``rho_vul`` the poison share among the kept, ``poison_removed`` and ``clean_lost``."""
    kept, truth = np.asarray(kept, dtype=bool), np.asarray(truth, dtype=bool)
    return {"gamma": float(kept.mean()), "rho_vul": float(truth[kept].mean()) if kept.any() else 0.0,
            "poison_removed": float((~kept[truth]).mean()) if truth.any() else 0.0,
            "clean_lost": float((~kept[~truth]).mean()) if (~truth).any() else 0.0}


def read_features(path: str | None, poisoned) -> np.ndarray | None:
    """The standardized features of the released training images (``--features``), checked to
    have one row per training sample."""
    if path is None:
        return None
    from ..errors import ConfigError

    with np.load(path) as stored:
        features = np.asarray(stored["features"], dtype=np.float32)
    if features.ndim != 2 or len(features) != len(poisoned["train/labels"]):
        raise ConfigError(f"--features {path}: {features.shape} features for {len(poisoned['train/labels'])} "
                          f"training samples (computed on another store?)")
    return features


def relabel_metrics(result, poisoned) -> dict:
    """How a relabeling defense's new labels compare with the true ones (scored after it returned):
    ``relabel_accuracy`` over every relabeled sample, ``relabel_accuracy_poisoned`` over the
    poisoned ones among them (the share whose original label it restored)."""
    if result.relabeled is None or not len(result.relabeled):
        return {}
    index = np.asarray(result.relabeled, dtype=np.int64)
    correct = np.asarray(result.new_labels) == poisoned["train/true_labels"][index]
    out = {"relabel_accuracy": float(correct.mean())}
    truth = poisoned["train/poisoned"][index]
    if truth.any():
        out["relabel_accuracy_poisoned"] = float(correct[truth].mean())
    return out


def detection_of_targets(detected, poisoned) -> dict:
    """Scored after the defense returned, for a defense that names the attacked classes: the
    attacked classes are the released labels of the poisoned training samples;
    ``targets_detected`` is the share of them it named, ``false_detections`` the count of the
    classes it named that were not attacked."""
    if detected is None:
        return {}
    truth = poisoned["train/poisoned"]
    targets = set(np.unique(poisoned["train/labels"][truth]).tolist())
    named = {int(label) for label in detected}
    out = {"false_detections": float(len(named - targets))}
    if targets:
        out["targets_detected"] = float(len(named & targets) / len(targets))
    return out


def model_builder(training: dict, clean, seed: int, device):
    """A function building a fresh, untrained model of the victim's architecture for the store's
    classes and image size (a DefenseContext's ``build_model``)."""
    from ..models import build_model

    num_classes, image_size = len(clean.attrs["classes"]), clean["train/images"].shape[1]
    return lambda: build_model(training["model"], num_classes, image_size, seed=seed).to(device)


def finish_workdir(out: Path) -> None:
    """Keep each training's per-epoch history (``history-*.csv``) next to the outputs and remove the
    work directory: its checkpoints are only for resuming a killed job."""
    for history in (out / "work").glob("history-*.csv"):
        history.replace(out / history.name)
    shutil.rmtree(out / "work", ignore_errors=True)


def defender_context(clean, poisoned, **rest) -> DefenseContext:
    """What a defender has: the released training set (images and labels as released) and the
    reserve, the clean data held out of the training set before poisoning. Nothing that tells
    which training samples are poisoned: no ``train/poisoned`` or ``train/true_labels``, and no
    clean twin of any training image (the clean store's ``train/`` split is not handed over)."""
    return DefenseContext(
        train_images=poisoned["train/images"], train_labels=poisoned["train/labels"],
        reserve_images=clean["reserve/images"], reserve_labels=clean["reserve/labels"],
        num_classes=len(clean.attrs["classes"]), **rest)


def run(args) -> None:
    from ..devices import torch_device
    from ..evaluate import evaluate_store_model
    from ..modelio import load_model, model_spec, save_model
    from ..provenance import record
    from ..store import read_store

    set_threads(args.threads)
    spec = parse_json(args.spec, "--spec")
    training = parse_json(args.training, "--training")
    evaluation = parse_json(args.evaluation, "--evaluation", kind=None)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean, poisoned = read_store(args.clean), read_store(args.poison)
    num_classes = len(clean.attrs["classes"])
    image_size = clean["train/images"].shape[1]
    device = torch_device()
    architecture = model_spec(training["model"], num_classes, image_size)
    victim = load_model(Path(args.victim_dir) / "model.pt", device, spec=architecture)
    screen_images, screen_truth = screening_set(clean, poisoned, args.seed)
    context = defender_context(clean, poisoned, training=training,
                               build_model=model_builder(training, clean, args.seed, device), victim=victim,
                               seed=args.seed, device=device, workdir=out / "work", screen_images=screen_images,
                               features=read_features(args.features, poisoned),
                               features_dir=Path(args.features).parent if args.features else None,
                               split=SplitResult.load(args.split) if args.split else None)
    if evaluation.get("curves"):  # learning curves of the defense's final training, for analysis (A-ABL Fig. 10)
        from ..curves import CurveRecorder

        context.observer = CurveRecorder(out / "curves.csv", poisoned["train/images"], poisoned["train/labels"],
                                         poisoned["train/poisoned"], evaluation["curves"], args.seed, device)
    started = time.perf_counter()
    result = DEFENSES.get(spec["kind"], key=f"defenses.{args.name}.kind").run(spec, context)
    seconds = time.perf_counter() - started

    metrics = evaluate_store_model(result.model, clean, poisoned, evaluation, device)
    metrics.update(result.metrics)
    metrics["defense_seconds"] = seconds
    if result.kept is not None:  # scoring with ground truth, after the defense has finished
        metrics.update(split_metrics(result.kept, poisoned["train/poisoned"]))
    metrics.update(relabel_metrics(result, poisoned))
    metrics.update(detection_of_targets(result.metrics.get("detected_classes"), poisoned))
    if result.sample_scores:  # plotted against ground truth, after the defense has finished
        write_sample_scores(out, result, poisoned["train/poisoned"], f"{args.name}, seed {args.seed}")
    if result.input_scores is not None or result.input_flags is not None:
        metrics.update(detection_metrics(screen_truth, result.input_scores, result.input_flags))
    before = read_json(Path(args.victim_dir) / "metrics.json")
    score = nder(before, metrics) if result.model is not victim else None  # no rating for "no defense"
    if score is not None:
        metrics["nder"] = score
    provenance = record(
        "defense", entry=spec, name=args.name, seed=args.seed, device=device,
        inputs=[args.clean, args.poison, Path(args.victim_dir) / "model.pt", Path(args.victim_dir) / "metrics.json",
                *([args.features] if args.features else []), *([args.split] if args.split else [])],
        code=["poisonflow.stages.defense", DEFENSES.module_name(spec["kind"])],
        extra={"training": training, "evaluation": evaluation})
    save_model(result.model, out / "model.pt", architecture, provenance)
    write_json(metrics, out / "metrics.json", provenance=provenance)
    finish_workdir(out)
    print(f"{out}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
