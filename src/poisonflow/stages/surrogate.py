"""surrogate stage: train on the clean store, keep weights and training dynamics.

Writes ``model.pt`` (final weights), ``scoring.pt`` (weights after ``score_epoch``, the model
the hard-sample scores use), each with its ``.json`` sidecar (architecture, digest, provenance),
``dynamics.npz`` (per-epoch, per-sample correctness and loss of the training forward before each
step) and ``info.json``.
"""

from __future__ import annotations

from pathlib import Path

from .common import SEED_HELP, THREADS_HELP, parse_json, set_threads, write_json


def add_arguments(parser) -> None:
    parser.add_argument("--spec", required=True, metavar="JSON",
                        help="the resolved surrogates entry (JSON), its training inline")
    parser.add_argument("--clean", required=True, metavar="STORE", help="clean store (its training split)")
    parser.add_argument("--out-dir", required=True, metavar="DIR",
                        help="output folder: model.pt, scoring.pt (+ .json sidecars), dynamics.npz, info.json")
    parser.add_argument("--seed", type=int, default=0, help=SEED_HELP + " (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def run(args) -> None:
    import numpy as np

    from ..devices import torch_device
    from ..modelio import model_spec, save_model
    from ..models import build_model
    from ..provenance import record
    from ..store import read_store
    from ..trainer import train_model

    set_threads(args.threads)
    spec = parse_json(args.spec, "--spec")
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
    provenance = record("surrogate", entry=spec, seed=args.seed, inputs=[args.clean],
                        code=["poisonflow.stages.surrogate"], device=device)
    architecture = model_spec(training["model"], len(clean.attrs["classes"]), images.shape[1])
    save_model(scoring_model, out / "scoring.pt", architecture, dict(provenance, snapshot_epoch=score_epoch))
    save_model(result.model, out / "model.pt", architecture, provenance)
    write_json({"score_epoch": score_epoch, "epochs": int(training["epochs"]),
                "final_train_acc": float(result.correct[-1].mean()), "device": str(device),
                "torch": torch.__version__}, out / "info.json", provenance=provenance)
    (out / "checkpoint.pt").unlink(missing_ok=True)
