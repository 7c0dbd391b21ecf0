"""victim stage: train on a poisoned store → ``model.pt`` (+ its ``model.json`` sidecar) and
``metrics.json`` (acc, asr, ra, pgd_acc), each with its provenance; ``curves.csv`` when the
evaluation asks for learning curves (:mod:`poisonflow.curves`)."""

from __future__ import annotations

import time
from pathlib import Path

from .common import SEED_HELP, THREADS_HELP, parse_json, set_threads, write_json


def add_arguments(parser) -> None:
    parser.add_argument("--spec", required=True, metavar="JSON",
                        help="the resolved trainings entry (JSON): model, epochs, optimizer, augmentation")
    parser.add_argument("--evaluation", required=True, metavar="JSON",
                        help="the resolved evaluation section (JSON): the PGD attack of pgd_acc, or null")
    parser.add_argument("--seed", type=int, required=True, help=SEED_HELP)
    parser.add_argument("--clean", required=True, metavar="STORE", help="clean store (its test split gives ACC)")
    parser.add_argument("--poison", required=True, metavar="STORE",
                        help="poisoned store: the training set, and its test split the ASR set")
    parser.add_argument("--out-dir", required=True, metavar="DIR",
                        help="output folder: model.pt, model.json, metrics.json, history.csv")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def run(args) -> None:
    from ..devices import torch_device
    from ..evaluate import evaluate_store_model
    from ..modelio import model_spec, save_model
    from ..models import build_model
    from ..provenance import record
    from ..store import read_store
    from ..trainer import train_model

    set_threads(args.threads)
    training = parse_json(args.spec, "--spec")
    evaluation = parse_json(args.evaluation, "--evaluation", kind=None)
    out = Path(args.out_dir)
    clean, poisoned = read_store(args.clean), read_store(args.poison)
    images, labels = poisoned["train/images"], poisoned["train/labels"]
    device = torch_device()
    num_classes = len(clean.attrs["classes"])
    model = build_model(training["model"], num_classes, images.shape[1], seed=args.seed)
    recorder = None
    if evaluation.get("curves"):  # A-ABL Fig. 8: per-epoch accuracy of benign and poisoned samples
        from ..curves import CurveRecorder

        recorder = CurveRecorder(out / "curves.csv", images, labels, poisoned["train/poisoned"],
                                 evaluation["curves"], args.seed, device)
    started = time.perf_counter()
    train_model(model, images, labels, training, seed=args.seed, device=device,
                checkpoint=out / "checkpoint.pt", history=out / "history.csv", desc="victim", on_epoch=recorder)
    train_seconds = time.perf_counter() - started
    metrics = evaluate_store_model(model, clean, poisoned, evaluation, device)
    provenance = record("victim", entry=training, seed=args.seed, inputs=[args.clean, args.poison],
                        code=["poisonflow.stages.victim"], device=device, extra={"evaluation": evaluation})
    save_model(model, out / "model.pt", model_spec(training["model"], num_classes, images.shape[1]), provenance)
    write_json({**metrics, "train_seconds": train_seconds, "device": str(device)}, out / "metrics.json",
               provenance=provenance)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    print(f"{out}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
