"""Hash of the source files a stage runs, for Snakemake's params rerun trigger.

The set of files is the closure of ``poisonflow`` imports, found by reading the import statements
of the source (no import, so the Snakefile stays fast): editing a module reruns exactly the jobs
whose stage reaches it. Implementations behind registries are imported lazily and so are not in a
stage's closure; a job adds the one it uses (``extra``).

Everything is computed once per process: a file's imports and bytes are read once, a closure is
followed once per module, and a hash once per set of modules (the workflow asks for the same few
sets for thousands of jobs).
"""

from __future__ import annotations

import ast
import hashlib
import re
from functools import lru_cache
from pathlib import Path

PACKAGE = "poisonflow"
ROOT = Path(__file__).resolve().parent

# An import statement at any indentation (imports inside functions count: that is how stages
# import torch-heavy modules lazily). A parenthesised ``from x import (a,\n b)`` and backslash
# continuations are taken whole. A docstring line that happens to read like an import may match
# too; it can only add a file to a closure (a harmless extra rerun trigger), never drop one.
_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+[.\w]+[ \t]+import[ \t]*(?:\([^)]*\)|(?:[^\n\\]|\\\n)*)"
                     r"|import[ \t]+(?:[^\n\\]|\\\n)*)", re.MULTILINE)


def _module_file(name: str) -> Path | None:
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    parts = name.split(".")[1:]
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _statements(source: str):
    """The import statements of ``source`` as AST nodes, without parsing the whole file."""
    for match in _IMPORT.finditer(source):
        text = match.group(0).strip()
        if "#" in text and "(" not in text:  # a trailing comment on a one-line import
            text = text.split("#", 1)[0].strip()
        try:
            tree = ast.parse(text)
        except SyntaxError:  # prose in a docstring, or a fragment the pattern cut short
            continue
        yield from (node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))


@lru_cache(maxsize=None)
def _imports(path: Path) -> frozenset[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(path.read_text()):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        else:
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules imported by name
    # importing a submodule runs its parent packages' __init__ too
    for module in list(found):
        parts = module.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(found)


@lru_cache(maxsize=None)
def module_closure(name: str) -> tuple[Path, ...]:
    """Source files of ``name`` and every ``poisonflow`` module it imports, transitively."""
    start = _module_file(name)
    if start is None:
        raise ValueError(f"no module {name} in {ROOT}")
    seen: dict[Path, None] = {}
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for module in _imports(path):
            found = _module_file(module)
            if found is not None and found not in seen:
                todo.append(found)
    return tuple(sorted(seen))


@lru_cache(maxsize=None)
def _file_bytes(path: Path) -> bytes:
    return path.read_bytes()


@lru_cache(maxsize=None)
def _hash(modules: frozenset[str]) -> str:
    digest = hashlib.sha256()
    files = sorted({path for module in modules for path in module_closure(module)})
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(_file_bytes(path))
    return digest.hexdigest()[:16]


def code_hash(*modules: str) -> str:
    """sha256 (16 hex digits) over the closure files of ``modules``: their paths and contents.

    Cached for the life of the process (a Snakemake run): an edit is seen by the next run."""
    return _hash(frozenset(modules))
