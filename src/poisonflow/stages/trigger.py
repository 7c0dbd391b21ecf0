"""trigger stage: train a generators entry on the clean store → ``results/triggers/{dataset}/{name}/``.

Attack kinds whose trigger is learned (TrojanNN's patch, Input-Aware's generators, SSBA's
encoder) declare a ``generator:`` part in their fragment and implement
``train_generator(spec, context) -> dict[str, torch.Tensor]``. This stage runs it once per dataset
and generators entry and writes ``generator.pt`` (those tensors, read back weights-only),
``info.json`` (the entry, the seconds spent, and what the kind's optional
``describe_generator(tensors) -> dict`` says of the result) and, where the kind trains with the trainer, its
``history*.csv``. The poison stage hands the tensors to the kind's ``build`` as
``context.generator``: an attack's rate, target or the victim's training never retrain them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="generators entry name")
    parser.add_argument("--spec", required=True, help="the resolved generators entry (JSON)")
    parser.add_argument("--clean", required=True, help="clean store (its released training set is used)")
    parser.add_argument("--surrogate-dir", help="the entry's surrogate (model.pt), for kinds that use a model")
    parser.add_argument("--out-dir", required=True, help="output folder (generator.pt, info.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


@dataclass
class TriggerContext:
    """What a generator is trained from: the released clean training set and, where the entry names
    one, a surrogate model; a work folder for checkpoints kept across a killed job."""
    train_images: Any  # uint8 (N, H, W, 3)
    train_labels: Any  # int64 (N,)
    classes: list[str]
    surrogate: Any  # torch.nn.Module in eval mode, or None
    device: Any
    seed: int
    workdir: Path
    key: str  # ``generators.<name>``, for messages


GENERATOR_FILE = "generator.pt"


def save_generator(tensors: dict, path: Path) -> None:
    import torch

    from ..checkpoint import atomic_write

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_generator(folder: str | Path) -> dict:
    """The trained trigger's tensors, loaded weights-only (no code from the file runs)."""
    import torch

    return torch.load(Path(folder) / GENERATOR_FILE, map_location="cpu", weights_only=True)


def run(args) -> None:
    from ..attacks import ATTACKS
    from ..devices import torch_device
    from ..kinds import generator_settings
    from ..stages.poison import load_surrogate
    from ..store import read_store
    from .common import set_threads, write_json

    set_threads(args.threads)
    key = f"generators.{args.name}"
    spec = generator_settings(json.loads(args.spec)["kind"], json.loads(args.spec), key)
    clean = read_store(args.clean)
    images, labels = clean["train/images"], clean["train/labels"]
    classes = list(clean.attrs["classes"])
    device = torch_device()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    context = TriggerContext(images, labels, classes,
                             load_surrogate(spec, args.surrogate_dir, len(classes), images.shape[1], device),
                             device, int(spec["seed"]), out / "work", key)
    started = time.perf_counter()
    module = ATTACKS.get(spec["kind"], key=f"{key}.kind")
    tensors = module.train_generator(spec, context)
    seconds = time.perf_counter() - started
    # a kind may describe what it chose in words (VSSC: candidates, pass rates, choice) for info.json
    describe = getattr(module, "describe_generator", None)
    for history in context.workdir.glob("history*.csv"):
        shutil.move(str(history), out / history.name)
    save_generator(tensors, out / GENERATOR_FILE)
    write_json({"generator": spec, "name": args.name, "seconds": seconds, "device": str(device),
                **({"report": describe(tensors)} if describe else {})}, out / "info.json")
    shutil.rmtree(context.workdir, ignore_errors=True)
    print(f"{out}: trained {spec['kind']} generator '{args.name}' in {seconds:.1f} s")
