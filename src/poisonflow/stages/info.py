"""info: how an artifact was made — ``poisonflow info PATH``.

PATH is a store (``*.zarr``), a model (``model.pt`` or its ``model.json`` sidecar), a JSON output
(``metrics.json``, ``info.json``) or a folder holding such artifacts (a victim or defense folder).
Prints each one's provenance (:mod:`poisonflow.provenance`): the stage, config entry, seed, input
artifacts with their digests, code hash, package versions, device and time, plus what identifies
the artifact itself (a store's digest and arrays, a model's architecture and weights digest).
``--json`` prints the records as JSON. Reads only JSON metadata: no torch, no array data.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import StoreError


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a store (.zarr), a model (model.pt or model.json), a metrics.json, or a folder of them")
    parser.add_argument("--json", action="store_true", help="print the full records as JSON instead of a summary")


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def describe(path: Path) -> dict:
    """``{"path", "type", ...}`` of one artifact: what identifies it and its provenance."""
    from ..modelio import FORMAT, read_sidecar, sidecar_path

    if _is_store(path):
        try:  # the consolidated metadata, read as JSON: no zarr needed
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes") or {}
        except (OSError, ValueError) as error:
            raise StoreError(f"{path}: unreadable zarr.json ({' '.join(str(error).split())})") from None
        return {"path": str(path), "type": "store", "complete": attrs.get("complete") is True,
                "digest": attrs.get("digest"), "arrays": sorted(attrs.get("checksums") or {}),
                "timing": attrs.get("timing"), "provenance": attrs.get("provenance")}
    if path.suffix == ".pt" or (path.suffix == ".json" and _is_sidecar(path, FORMAT)):
        weights = path if path.suffix == ".pt" else path.with_suffix(".pt")
        sidecar = read_sidecar(weights)
        if sidecar is None:
            return {"path": str(weights), "type": "model", "sidecar": None, "provenance": None}
        return {"path": str(weights), "type": "model", "sidecar": str(sidecar_path(weights)),
                "spec": sidecar.get("spec"), "digest": sidecar.get("weights_digest"),
                "parameters": sidecar.get("parameters"), "provenance": sidecar.get("provenance")}
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise StoreError(f"{path}: not readable JSON ({' '.join(str(error).split())})") from None
        values = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {"path": str(path), "type": "json", "checksum": data.get("checksum"), "values": values,
                "provenance": data.get("provenance")}
    raise StoreError(f"{path}: not a store, model or JSON output of poisonflow")


def _is_sidecar(path: Path, fmt: str) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def artifacts(path: Path) -> list[Path]:
    """``path`` itself, or for a plain folder the artifacts directly in it."""
    if not path.exists():
        raise StoreError(f"{path}: does not exist")
    if path.is_file() or _is_store(path):
        return [path]
    found = []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if _is_store(child) or child.suffix == ".pt" or (child.suffix == ".json" and not child.with_suffix(".pt").exists()):
            found.append(child)
    if not found:
        raise StoreError(f"{path}: holds no store, model or JSON output")
    return found


def _compact(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def summary(record: dict) -> str:
    """The record as aligned 'field  value' lines under the artifact's path."""
    lines = [record["path"]]

    def add(field: str, value) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"  {field:<11} {value}")

    if record["type"] == "store":
        state = "complete" if record["complete"] else "INCOMPLETE"
        add("type", f"store ({state}; {len(record['arrays'])} arrays with checksums)" if record["arrays"]
            else f"store ({state}; no checksums recorded)")
        add("digest", record.get("digest"))
        timing = record.get("timing") or {}
        if "generation_seconds" in timing:
            add("generation", f"{timing['generation_seconds']:.2f} s ({timing.get('measures', 'generation')})")
    elif record["type"] == "model":
        add("type", "model (weights-only .pt)" + ("" if record.get("sidecar") else "; no sidecar: architecture unknown"))
        spec = record.get("spec") or {}
        if spec:
            add("model", f"{_compact(spec.get('model'))}, {spec.get('num_classes')} classes, "
                         f"{spec.get('image_size')} px, {record.get('parameters')} parameters")
        add("digest", record.get("digest"))
    else:
        add("type", "JSON" + (" (checksummed)" if record.get("checksum") else ""))
        add("values", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in sorted(record.get("values", {}).items())))
    provenance = record.get("provenance")
    if not provenance:
        add("provenance", "none recorded (written before provenance was recorded, or not by a stage)")
        return "\n".join(lines)
    what = provenance.get("stage", "?")
    details = [f"name {provenance['name']}" if "name" in provenance else None,
               f"seed {provenance['seed']}" if "seed" in provenance else None]
    add("stage", what + (f" ({', '.join(d for d in details if d)})" if any(details) else ""))
    add("entry", _compact(provenance.get("entry")) if "entry" in provenance else None)
    for extra in ("training", "evaluation", "snapshot_epoch"):
        if extra in provenance:
            add(extra, _compact(provenance[extra]))
    for i, item in enumerate(provenance.get("inputs", [])):
        add("inputs" if i == 0 else "", f"{item.get('path')}  {item.get('digest') or '(no digest recorded)'}")
    code = provenance.get("code") or {}
    add("code hash", f"{code.get('hash')} ({', '.join(code.get('modules', []))})" if code.get("hash") else None)
    versions = provenance.get("versions") or {}
    order = ["poisonflow", "python", "torch", "torchvision", "zarr", "numcodecs", "numpy"]
    names = [k for k in order if k in versions] + sorted(k for k in versions if k not in order)
    add("versions", ", ".join(f"{k} {versions[k]}" for k in names if versions[k]))
    add("device", provenance.get("device"))
    add("created", provenance.get("created"))
    return "\n".join(lines)


def run(args) -> None:
    records = [describe(item) for path in args.paths for item in artifacts(Path(path))]
    if args.json:
        print(json.dumps(records if len(records) > 1 else records[0], indent=2, sort_keys=True))
    else:
        print("\n\n".join(summary(record) for record in records))
