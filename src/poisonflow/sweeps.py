"""Sweeps: a key of an attacks or defenses entry whose value is ``{sweep: [v1, v2, …]}`` expands the
entry into one entry per value (per combination, where several keys are swept), before the config
is validated. Each variant is an ordinary entry named ``<entry>.<key>-<value>`` (nested keys dotted:
``gssd.flows.epochs-20``; several keys one after the other: ``gssd.alpha_c-0.3.alpha_p-0.15``), and
an experiment that names the entry runs every variant. So a sweep is a set of jobs like any other:
cached per variant, and adding a value runs only that value's jobs.

The expansion is recorded (:func:`expand`'s second value: section → entry → variant → the swept
values) for the aggregate, which reports every value and marks the one a paper would pick.
"""

from __future__ import annotations

import copy
import itertools

from .errors import ConfigError

SECTIONS = {"attacks": "attack", "defenses": "defense"}  # config section → experiments field


def is_sweep(value) -> bool:
    return isinstance(value, dict) and set(value) == {"sweep"}


def axes(entry, where: str, path: tuple = ()) -> list[tuple[tuple, list]]:
    """(key path, values) of every swept key of ``entry`` (config key ``where``), in key order."""
    found = []
    if not isinstance(entry, dict):
        return found
    for key, value in entry.items():
        if is_sweep(value):
            values = value["sweep"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{'.'.join((where, *map(str, path), str(key)))}.sweep: a non-empty list of values")
            found.append(((*path, key), values))
        elif isinstance(value, dict):
            found.extend(axes(value, where, (*path, key)))
    return found


def value_text(value) -> str:
    """A value as it appears in a variant's name."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def set_path(entry: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        entry = entry[key]
    entry[path[-1]] = value


def expand(raw: dict) -> tuple[dict, dict]:
    """``raw`` with every swept entry replaced by its variants (and the experiments naming it by
    the variants' names), and the record of the expansion."""
    raw = copy.deepcopy(raw)
    record: dict = {}
    for section in SECTIONS:
        entries = raw.get(section)
        if not isinstance(entries, dict):
            continue
        expanded = {}
        for name, entry in entries.items():
            swept = axes(entry, f"{section}.{name}")
            if not swept:
                expanded[name] = entry
                continue
            variants = {}
            for values in itertools.product(*(choices for _, choices in swept)):
                variant = copy.deepcopy(entry)
                parts = []
                for (path, _), value in zip(swept, values):
                    set_path(variant, path, value)
                    parts.append(f"{'.'.join(map(str, path))}-{value_text(value)}")
                variant_name = f"{name}.{'.'.join(parts)}"
                if variant_name in entries or variant_name in expanded:
                    raise ConfigError(f"{section}.{name}: the sweep's variant {variant_name!r} is named twice")
                expanded[variant_name] = variant
                variants[variant_name] = {".".join(map(str, path)): value for (path, _), value in zip(swept, values)}
            record.setdefault(section, {})[name] = variants
        raw[section] = expanded
    for experiment in raw.get("experiments") or []:
        if not isinstance(experiment, dict):
            continue
        for section, field in SECTIONS.items():
            names = experiment.get(field)
            swept = record.get(section, {})
            if isinstance(names, list):
                experiment[field] = [variant for name in names for variant in (swept.get(name) or [name])]
    return raw, record
