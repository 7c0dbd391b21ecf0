"""Name → implementation registries with lazy imports.

Each entry maps a config ``kind:`` name to ``"module:attribute"``. Implementations are imported
only when asked for, so a stage's code hash (see :mod:`poisonflow.codehash`) can cover the stage
and the one implementation a job uses, not every method in the registry.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError


class Registry:
    def __init__(self, what: str, entries: dict[str, str]):
        self.what = what
        self._fixed = dict(entries)

    def entries(self) -> dict[str, str]:
        """name → ``"module:attribute"`` (or a bare module)."""
        return self._fixed

    def names(self) -> list[str]:
        return sorted(self.entries())

    def __contains__(self, name: str) -> bool:
        return name in self.entries()

    def target(self, name: str, key: str | None = None) -> str:
        entries = self.entries()
        if name not in entries:
            where = f"{key}: " if key else ""
            raise ConfigError(
                f"{where}unknown {self.what} '{name}' (known: {', '.join(sorted(entries))})"
            )
        return entries[name]

    def module_name(self, name: str, key: str | None = None) -> str:
        return self.target(name, key).split(":")[0]

    def get(self, name: str, key: str | None = None) -> Any:
        module_name, _, attribute = self.target(name, key).partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, attribute) if attribute else module
