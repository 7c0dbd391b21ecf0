"""surrogate stage: train on the clean store, keep weights and training dynamics.

Writes ``model.pt`` (final weights), ``scoring.pt`` (weights after ``score_epoch``, the model
the hard-sample scores use) and ``dynamics.npz`` (per-epoch, per-sample correctness and loss of
the training forward before each step).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..devices import torch_device
from ..models import build_model
from ..store import read_store
from ..trainer import save_weights, train_model
from .common import set_threads, write_json


def add_arguments(parser) -> None:
    parser.add_argument("--spec", required=True, help="the resolved surrogates entry (JSON)")
    parser.add_argument("--clean", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)


def run(args) -> None:
    set_threads(args.threads)
    spec = json.loads(args.spec)
    training = spec["training"]
    out = Path(args.out_dir)
    clean = read_store(args.clean)
    images, labels = clean["train/images"], clean["train/labels"]
    score_epoch = min(int(spec.get("score_epoch", 10)), int(training["epochs"]))
    model = build_model(training["model"], len(clean.attrs["classes"]), images.shape[1], seed=args.seed)
    device = torch_device()
    result = train_model(model, images, labels, training, seed=args.seed, device=device,
                         checkpoint=out / "checkpoint.pt", history=out / "history.csv", record_dynamics=True,
                         snapshot_epochs=(score_epoch,), desc="surrogate")
    np.savez(out / "dynamics.tmp.npz", correct=result.correct, loss=result.loss)
    (out / "dynamics.tmp.npz").replace(out / "dynamics.npz")
    import torch

    scoring_model = build_model(training["model"], len(clean.attrs["classes"]), images.shape[1])
    scoring_model.load_state_dict(result.snapshots[score_epoch])
    save_weights(scoring_model, out / "scoring.pt")
    save_weights(result.model, out / "model.pt")
    write_json({"score_epoch": score_epoch, "epochs": int(training["epochs"]),
                "final_train_acc": float(result.correct[-1].mean()), "device": str(device),
                "torch": torch.__version__}, out / "info.json")
    (out / "checkpoint.pt").unlink(missing_ok=True)
