"""features stage: one ``features:`` entry on one poisoned store → standardized features of its
released training set (and, for SimCLR, the trained backbone).

It reads ``train/images`` of the poisoned store and nothing else: no labels (SimCLR is
self-supervised), no ``train/poisoned`` flags, no clean twins, no reserve — what the defender of
GSSD or DBD has. Per extractor:

- ``simclr``: SimCLR trained through the trainer (:mod:`poisonflow.simclr`), checkpointed every
  epoch (a killed job resumes), then ``backbone.pt`` (+ ``backbone.json`` sidecar: a
  :class:`~poisonflow.models.Classifier` that :func:`poisonflow.modelio.load_model` rebuilds; its
  ``fc`` is untrained) and ``history.csv`` (NT-Xent per epoch);
- ``clip``: open_clip image features from local weights (:mod:`poisonflow.clip_features`).

Both write ``features.npz`` (``features`` float32 (N, D), each dimension standardized to mean 0
and unbiased std 1 over the N released training images, sample i ↔ store sample i; ``mean`` and
``std`` (D,), float32, the raw features' statistics used) and ``info.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import SEED_HELP, THREADS_HELP, parse_json, set_threads, write_json

CODE = ["poisonflow.stages.features"]


def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="the features entry's name (for messages and provenance)")
    parser.add_argument("--spec", required=True, metavar="JSON",
                        help="the resolved features entry (JSON), its model inline")
    parser.add_argument("--poison", required=True, metavar="STORE",
                        help="poisoned store: only its released training images are read")
    parser.add_argument("--out-dir", required=True, metavar="DIR",
                        help="output folder: features.npz, info.json (simclr: backbone.pt + .json, history.csv)")
    parser.add_argument("--seed", type=int, default=0, help=SEED_HELP + " (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def simclr_features(spec: dict, images, classes: int, args, out: Path, device, provenance: dict) -> tuple:
    """Train SimCLR on ``images``; write the backbone; return (raw features, info)."""
    import numpy as np

    from ..embeddings import embed_images
    from ..modelio import model_spec, save_model
    from ..simclr import backbone_encoder, build_simclr, settings_of, simclr_objective, simclr_training
    from ..trainer import train_model

    settings = settings_of(spec)
    image_size = int(images.shape[1])
    net = build_simclr(settings["model"], classes, image_size, settings["projection_dim"], args.seed)
    # labels are not used by the objective: zeros keep them out of the run (and of its checkpoint digest)
    result = train_model(net, images, np.zeros(len(images), dtype=np.int64), simclr_training(settings),
                         seed=args.seed, device=device, checkpoint=out / "checkpoint.pt",
                         history=out / "history.csv", desc=f"features {args.name}",
                         objective=simclr_objective(settings))
    backbone = result.model.backbone
    save_model(backbone, out / "backbone.pt", model_spec(settings["model"], classes, image_size), provenance)
    raw = embed_images(backbone_encoder(backbone), images, device, int(settings["batch_size"]),
                       desc=f"features {args.name}: extract")
    info = {"epochs": int(settings["epochs"]), "final_loss": result.history[-1]["loss"],
            "first_loss": result.history[0]["loss"], "train_seconds": float(sum(result.epoch_seconds)),
            "backbone": "backbone.pt"}
    return raw, info


def clip_features(spec: dict, images, classes: int, args, out: Path, device, provenance: dict) -> tuple:
    """Embed ``images`` with open_clip from local weights; return (raw features, info)."""
    from ..clip_features import clip_encoder, load_image_encoder
    from ..embeddings import embed_images

    network = load_image_encoder(spec["model"], spec["weights"], f"features.{args.name}", device)
    raw = embed_images(clip_encoder(network), images, device, int(spec["batch_size"]),
                       desc=f"features {args.name}: clip")
    return raw, {"clip_model": spec["model"]}


# extractor → f(spec, images, classes, args, out, device, provenance) → (raw (N, D) features, info)
EXTRACTORS = {"simclr": simclr_features, "clip": clip_features}


def write_features(path: Path, features, mean, std) -> None:
    """``features.npz`` written atomically (a temporary file, then a rename)."""
    import numpy as np

    from ..checkpoint import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, features=features, mean=mean, std=std)

    atomic_write(path, write)


def run(args) -> None:
    import torch

    from ..config import check_features
    from ..devices import torch_device
    from ..embeddings import standardize
    from ..kinds import definition_settings
    from ..provenance import record
    from ..store import read_store

    set_threads(args.threads)
    key = f"features.{args.name}"
    # the workflow passes a resolved entry; one written by hand gets the same defaults and checks
    spec = definition_settings("features", parse_json(args.spec, "--spec"), key)
    check_features(spec, key)
    extractor = spec["extractor"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    poisoned = read_store(args.poison)
    images = poisoned["train/images"]  # the released training set: nothing else is read
    classes = len(poisoned.attrs["classes"])
    device = torch_device()
    provenance = record("features", entry=spec, name=args.name, seed=args.seed, inputs=[args.poison], code=CODE,
                        device=device)
    started = time.perf_counter()
    raw, info = EXTRACTORS[extractor](spec, images, classes, args, out, device, provenance)
    features, mean, std = standardize(raw)
    write_features(out / "features.npz", features, mean, std)
    write_json({"extractor": extractor, "samples": int(features.shape[0]), "dimensions": int(features.shape[1]),
                "constant_dimensions": int((raw.std(axis=0) == 0).sum()), **info,
                "seconds": time.perf_counter() - started, "device": str(device), "torch": torch.__version__},
               out / "info.json", provenance=provenance)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    print(f"{out}: {extractor} features {features.shape[0]}×{features.shape[1]}")
