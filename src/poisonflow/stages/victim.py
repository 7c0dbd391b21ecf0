"""victim stage: train on a poisoned store → ``model.pt`` and ``metrics.json`` (acc, asr, ra, pgd_acc)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..devices import torch_device
from ..evaluate import evaluate_store_model
from ..models import build_model
from ..store import read_store
from ..trainer import save_weights, train_model
from .common import set_threads, write_json


def add_arguments(parser) -> None:
    parser.add_argument("--spec", required=True, help="the resolved trainings entry (JSON)")
    parser.add_argument("--evaluation", required=True, help="the resolved evaluation section (JSON)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--clean", required=True, help="clean store (test split: ACC)")
    parser.add_argument("--poison", required=True, help="poisoned store")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--threads", type=int, default=1)


def run(args) -> None:
    set_threads(args.threads)
    training = json.loads(args.spec)
    evaluation = json.loads(args.evaluation)
    out = Path(args.out_dir)
    clean, poisoned = read_store(args.clean), read_store(args.poison)
    images, labels = poisoned["train/images"], poisoned["train/labels"]
    device = torch_device()
    model = build_model(training["model"], len(clean.attrs["classes"]), images.shape[1], seed=args.seed)
    started = time.perf_counter()
    train_model(model, images, labels, training, seed=args.seed, device=device,
                checkpoint=out / "checkpoint.pt", history=out / "history.csv", desc="victim")
    train_seconds = time.perf_counter() - started
    metrics = evaluate_store_model(model, clean, poisoned, evaluation, device)
    save_weights(model, out / "model.pt")
    write_json({**metrics, "train_seconds": train_seconds, "device": str(device)}, out / "metrics.json")
    (out / "checkpoint.pt").unlink(missing_ok=True)
    print(f"{out}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
