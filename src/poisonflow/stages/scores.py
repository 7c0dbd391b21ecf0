"""scores stage: a surrogate → ``results/scores/{dataset}/{surrogate}.csv``.

Columns: index, label, loss, gradnorm, forgetting — the hard-sample paper's three difficulty
metrics. Loss and gradient norm use the model after ``score_epoch`` in eval mode; forgetting
events come from the recorded training dynamics.
"""

from __future__ import annotations

import os
from pathlib import Path

from .common import THREADS_HELP, parse_json, set_threads


def add_arguments(parser) -> None:
    parser.add_argument("--spec", required=True, metavar="JSON",
                        help="the resolved surrogates entry (JSON), its training inline")
    parser.add_argument("--clean", required=True, metavar="STORE", help="clean store (its training split is scored)")
    parser.add_argument("--surrogate-dir", required=True, metavar="DIR",
                        help="the surrogate's folder (scoring.pt and dynamics.npz)")
    parser.add_argument("--out", required=True, metavar="CSV", help="output CSV (index, label, loss, gradnorm, forgetting)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per forward/backward pass (default: 128)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def run(args) -> None:
    import numpy as np

    from ..devices import torch_device
    from ..modelio import load_model, model_spec
    from ..scores import score_table
    from ..store import read_store

    set_threads(args.threads)
    spec = parse_json(args.spec, "--spec")
    clean = read_store(args.clean)
    images, labels = clean["train/images"], clean["train/labels"]
    device = torch_device()
    model = load_model(Path(args.surrogate_dir) / "scoring.pt", device,
                       spec=model_spec(spec["training"]["model"], len(clean.attrs["classes"]), images.shape[1]))
    with np.load(Path(args.surrogate_dir) / "dynamics.npz", allow_pickle=False) as stored:  # arrays only
        correct = stored["correct"]
    table = score_table(model, images, labels, correct, device, args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, out)
    print(f"{out}: {len(table)} samples; mean loss {table['loss'].mean():.4f}, mean gradnorm "
          f"{table['gradnorm'].mean():.4f}, mean forgetting {table['forgetting'].mean():.2f}")
