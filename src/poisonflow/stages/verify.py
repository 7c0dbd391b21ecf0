"""verify: check every result on disk and remove the damaged ones — ``poisonflow verify [RESULTS_DIR]``.

Walks the results folder (default ``results``) and checks

- every store (``*.zarr``): complete, every chunk present and decoding (zstd and CRC-32C
  checksums), every array equal to the checksum recorded when it was written;
- every model (``*.pt``): its weights against the digest in its ``.json`` sidecar; a ``.pt``
  without a sidecar (a checkpoint, a trained trigger, an older model) must load weights-only;
- every JSON file: it parses, and matches its ``checksum`` where it has one (``metrics.json``);
- every ``.npz`` (training dynamics): its zip members' CRCs;
- temporaries of killed store writers (``.<name>.zarr.tmp-*``) that no live writer owns.

A damaged artifact is removed (a model with its sidecar) and named on one line, so the next
``snakemake`` run rebuilds exactly those outputs (and what depends on them); ``--dry-run`` only
reports. Exit status 0 when everything is intact, 1 when something was (or, with ``--dry-run``,
would be) removed, 2 when the folder does not exist.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PoisonflowError, StoreError


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="?", default="results", metavar="RESULTS_DIR",
                        help="the results folder to check (default: results)")
    parser.add_argument("--dry-run", action="store_true", help="report damaged outputs without removing them")
    parser.add_argument("--quiet", action="store_true", help="print only what is damaged and the final count")


@dataclass
class Report:
    checked: dict = field(default_factory=lambda: {"stores": 0, "models": 0, "json": 0, "npz": 0})
    damaged: list = field(default_factory=list)  # (path, reason)
    temporaries: list = field(default_factory=list)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_store(path: Path) -> str | None:
    from ..store import verify_store

    try:
        verify_store(path)
    except StoreError as error:
        return _one_line(error)
    return None


def check_model(path: Path) -> str | None:
    from ..modelio import check_weights

    try:
        if check_weights(path) is None:  # no sidecar: it must at least load weights-only
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
    except PoisonflowError as error:
        return _one_line(error)
    except Exception as error:  # torch raises several types for a truncated or unsafe file
        return f"{path}: does not load as a weights-only file ({type(error).__name__})"
    return None


def check_json(path: Path) -> str | None:
    from .common import read_json

    try:
        text = path.read_text()
        if not isinstance(json.loads(text), dict):
            return None  # a JSON list or value: nothing to check beyond parsing
        read_json(path)
    except ValueError as error:
        return f"{path}: damaged JSON ({_one_line(error)})"
    except (OSError, PoisonflowError) as error:
        return _one_line(error)
    return None


def check_npz(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as bundle:
            bad = bundle.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"{path}: damaged .npz ({_one_line(error)})"
    return f"{path}: damaged .npz (member {bad} fails its CRC)" if bad else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def walk(root: Path, report: Report, remove: bool, say) -> None:
    """Check the artifacts under ``root`` (not descending into stores)."""
    from ..modelio import sidecar_path
    from ..store import stale_temporaries

    stores, models, others = [], [], []
    for folder, subfolders, files in _walk(root):
        for name in list(subfolders):
            path = folder / name
            if name.endswith(".zarr"):
                stores.append(path)
                subfolders.remove(name)  # its chunks are checked as part of the store
                report.temporaries += [t for t in stale_temporaries(path) if t not in report.temporaries]
            elif ".zarr.tmp-" in name:
                subfolders.remove(name)
                target = folder / name[1:name.index(".tmp-")]
                report.temporaries += [t for t in stale_temporaries(target) if t not in report.temporaries]
        for name in files:
            path = folder / name
            if name.startswith("."):
                continue
            if name.endswith(".pt"):
                models.append(path)
            elif name.endswith((".json", ".npz")):
                others.append(path)
    sidecars = {sidecar_path(m) for m in models}
    checks = [(p, "stores", check_store) for p in stores] + [(p, "models", check_model) for p in models]
    checks += [(p, "json" if p.suffix == ".json" else "npz", check_json if p.suffix == ".json" else check_npz)
               for p in others if p not in sidecars]  # a sidecar is checked with its model
    for path, kind, check in sorted(checks, key=lambda item: str(item[0])):
        report.checked[kind] += 1
        problem = check(path)
        if problem is None:
            say(f"ok       {path}")
            continue
        problem = problem.removeprefix(f"{path}: ")  # the line names the path once
        report.damaged.append((path, problem))
        victims = [path] + ([sidecar_path(path)] if kind == "models" and sidecar_path(path).exists() else [])
        if remove:
            for victim in victims:
                _remove(victim)
        print(f"{'removed' if remove else 'damaged'}  {' and '.join(str(v) for v in victims)}: {problem}", flush=True)
    for temporary in report.temporaries:
        if remove:
            _remove(temporary)
        print(f"{'removed' if remove else 'stale'}  {temporary}: temporary of a killed store writer", flush=True)


def _walk(root: Path):
    import os

    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        yield Path(folder), subfolders, sorted(files)


def run(args) -> int:
    root = Path(args.results)
    if not root.is_dir():
        raise StoreError(f"{root}: no such results folder")
    report = Report()
    walk(root, report, remove=not args.dry_run, say=(lambda line: None) if args.quiet else print)
    names = {"stores": "store", "models": "model", "json": "JSON file", "npz": ".npz file"}
    counts = ", ".join(f"{n} {names[kind]}{'' if n == 1 else 's'}" for kind, n in report.checked.items())
    if report.damaged:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{root}: checked {counts}; {verb} {len(report.damaged)} damaged output(s): run snakemake "
              f"to rebuild {'them' if not args.dry_run else 'them after removing them'}")
        return 1
    print(f"{root}: checked {counts}; all intact" + (f" ({len(report.temporaries)} stale temporaries "
                                                     f"{'found' if args.dry_run else 'removed'})" if report.temporaries else ""))
    return 0
