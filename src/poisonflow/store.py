"""Zarr stores written atomically, checksummed, and read back only when complete and intact.

A store is built in a sibling temporary directory (``.<name>.tmp-<host>-<pid>-<random>``), its
metadata consolidated, the attribute ``complete`` set last, then renamed into place. Before
writing, a writer removes the temporaries of the same target that a killed writer left behind
(their process is gone, or started after they were last touched).

Integrity: every chunk is compressed with zstd's own frame checksum and carries a CRC-32C
(zarr's ``crc32c`` codec), so a damaged chunk fails when it is decoded; and the store's attributes
record a BLAKE2b checksum of each array's content (``checksums``), computed while it is written,
and a digest of the whole store (``digest``: the checksums and the other attributes, provenance
excepted), which is the store's id in the provenance of what is computed from it. Readers refuse
a store without ``complete``, with a missing chunk, a chunk that fails its checksum or an array
whose content differs from its recorded checksum, with one line naming the path
(:class:`~poisonflow.errors.StoreError`); :func:`verify_store` checks every array.

:func:`write_store` writes arrays that are already in memory; :class:`StoreWriter` builds a store
batch by batch (``append``), for datasets larger than memory, with the same atomic finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import zarr

from .errors import StoreError

# Arrays are chunked along the sample axis only: ~1024 samples per chunk, fewer where samples are
# large, so a chunk file stays below CHUNK_BYTES (1024 samples of 32..64 px images are a few
# hundred KB to 12 MB; at 224 px a 1024-sample chunk would be 150 MB, too much to hold per write).
SAMPLES_PER_CHUNK = 1024
CHUNK_BYTES = 16 << 20

CHECKSUM = "blake2b-128"  # the algorithm of the recorded array checksums, named in each value
# attributes that describe how or when a store was made, not what it holds: left out of its digest
UNHASHED_ATTRS = {"complete", "checksums", "digest", "provenance", "timing"}


def _consolidate(path: Path) -> None:
    # Consolidated metadata is a zarr-python convention on top of format 3; we rely on it knowingly.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(path))


def _compressors():
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0, checksum=True), Crc32cCodec()]


def samples_per_chunk(sample_shape: tuple[int, ...], dtype) -> int:
    """Chunk length along the sample axis for samples of this shape and dtype."""
    sample_bytes = max(1, int(np.prod(sample_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return max(1, min(SAMPLES_PER_CHUNK, CHUNK_BYTES // sample_bytes))


def _chunks(array: np.ndarray) -> tuple[int, ...]:
    if not array.ndim:
        return ()
    first = max(1, min(samples_per_chunk(array.shape[1:], array.dtype), array.shape[0]))
    return (first,) + tuple(array.shape[1:])


def _plain_json(value):
    """``value`` as JSON gives it back (numpy scalars and arrays as numbers and lists, tuples as lists)."""
    def plain(item):
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, np.ndarray):
            return item.tolist()
        if isinstance(item, os.PathLike):
            return os.fspath(item)
        raise TypeError(f"store attributes must be JSON values, not {type(item).__name__}")

    return json.loads(json.dumps(value, default=plain))


def _split_key(key: str) -> tuple[str, str]:
    group_name, _, name = key.rpartition("/")
    return group_name, name


def _hasher():
    return hashlib.blake2b(digest_size=16)


def _update(hasher, value: np.ndarray) -> None:
    """Feed an array's C-order bytes (its content, independent of chunking) to ``hasher``."""
    hasher.update(np.ascontiguousarray(value).view(np.uint8) if value.dtype == bool else np.ascontiguousarray(value))


def _checksum(hasher) -> str:
    return f"{CHECKSUM}:{hasher.hexdigest()}"


def store_digest(attrs: Mapping[str, Any]) -> str:
    """The digest of a store: its array checksums and the attributes that describe its content."""
    content = {k: v for k, v in attrs.items() if k not in UNHASHED_ATTRS}
    text = json.dumps({"checksums": attrs.get("checksums", {}), "attrs": content}, sort_keys=True, default=str)
    return _checksum(hashlib.blake2b(text.encode(), digest_size=16))


# --------------------------------------------------------------------------------------------
# Temporaries of killed writers
# --------------------------------------------------------------------------------------------

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _tmp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.tmp-(?:(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-)?[0-9a-f]{{8}}$")


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), from /proc; None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_THIS_PROCESS_STARTED = _process_start(os.getpid()) or time.time()


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary folders of the store ``path`` that no live writer owns.

    A temporary named for a process of this host is stale when that process is gone, or started
    after the folder was last modified (its id was reused); one without a process id (written by
    an older version) when it is older than this process. Temporaries of other hosts (a shared
    file system) are left alone: their writers cannot be checked from here.
    """
    path = Path(path)
    pattern = _tmp_pattern(path.name)
    if not path.parent.is_dir():
        return []
    stale = []
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if not match:
            continue
        try:
            modified = entry.lstat().st_mtime
        except OSError:
            continue
        if match["pid"] is None:
            if modified < _THIS_PROCESS_STARTED:
                stale.append(entry)
            continue
        pid = int(match["pid"])
        if match["host"] != _host() or pid == os.getpid():
            continue
        started = _process_start(pid) if _alive(pid) else None
        if not _alive(pid) or (started is not None and started > modified + 1.0):
            stale.append(entry)
    return sorted(stale)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete :func:`stale_temporaries` of ``path``; return what was deleted."""
    removed = []
    for entry in stale_temporaries(path):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class StoreWriter:
    """Build a store at ``path`` atomically, array by array or batch by batch.

    ::

        with StoreWriter(path, {"classes": names}, provenance=record) as writer:
            writer.write("train/labels", labels)
            for batch in batches:
                writer.append("train/images", batch)   # grows along axis 0

    On a clean exit each array's checksum and the store's digest are recorded, the metadata is
    consolidated, ``complete`` is set and the temporary directory is renamed to ``path``
    (replacing an old store there); on an exception it is deleted and ``path`` is left as it was.
    Memory use is one batch at a time. ``provenance`` (a JSON-able dict) is stored as the
    attribute ``provenance``.
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, Any] | None = None,
                 provenance: Mapping[str, Any] | None = None):
        self.path = Path(path)
        attrs = {k: v for k, v in dict(attrs or {}).items() if k not in ("complete", "checksums", "digest")}
        if provenance is not None:
            attrs["provenance"] = dict(provenance)
        self.attrs = _plain_json(attrs)  # what reading the attributes back gives, so digests agree
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._root = None
        self._arrays: dict[str, zarr.Array] = {}
        self._hashers: dict[str, Any] = {}

    def __enter__(self) -> "StoreWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        self._root = zarr.open_group(str(self._tmp), mode="w")
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            if self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)

    def _group(self, group_name: str):
        return self._root.require_group(group_name) if group_name else self._root

    def _create(self, key: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...]) -> zarr.Array:
        if self._root is None:
            raise StoreError(f"{self.path}: StoreWriter used outside its 'with' block")
        if key in self._arrays:
            raise StoreError(f"{self.path}: array '{key}' is written twice")
        group_name, name = _split_key(key)
        array = self._group(group_name).create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, compressors=_compressors(),
            config={"write_empty_chunks": True})
        self._arrays[key] = array
        self._hashers[key] = _hasher()
        return array

    def write(self, key: str, value: np.ndarray) -> None:
        """Write a whole array (keys like ``"train/images"``)."""
        value = np.ascontiguousarray(value)
        array = self._create(key, value.shape, value.dtype, _chunks(value))
        _update(self._hashers[key], value)
        if value.size:
            array[...] = value

    def append(self, key: str, batch: np.ndarray) -> None:
        """Append ``batch`` along axis 0 of ``key``, creating the array on the first call.

        Later batches must have the first one's dtype and trailing shape. Batches whose length is a
        multiple of the chunk length (:func:`samples_per_chunk`) write whole chunks only.
        """
        batch = np.ascontiguousarray(batch)
        if batch.ndim == 0:
            raise StoreError(f"{self.path}: array '{key}': cannot append a scalar")
        array = self._arrays.get(key)
        if array is None:
            chunks = (samples_per_chunk(batch.shape[1:], batch.dtype),) + tuple(batch.shape[1:])
            array = self._create(key, (0,) + tuple(batch.shape[1:]), batch.dtype, chunks)
        elif array.shape[1:] != batch.shape[1:] or array.dtype != batch.dtype:
            raise StoreError(f"{self.path}: array '{key}': cannot append a {batch.dtype} batch of shape "
                             f"{batch.shape} to {array.dtype} samples of shape {array.shape[1:]}")
        if len(batch):
            array.append(batch, axis=0)
            _update(self._hashers[key], batch)

    def length(self, key: str) -> int:
        """Samples written so far to ``key`` (0 if it does not exist yet)."""
        array = self._arrays.get(key)
        return 0 if array is None else int(array.shape[0])

    def _finish(self) -> None:
        attrs = dict(self.attrs)
        attrs["checksums"] = {key: _checksum(hasher) for key, hasher in sorted(self._hashers.items())}
        attrs["digest"] = store_digest(attrs)
        self._root.attrs.update(attrs)
        _consolidate(self._tmp)
        root = zarr.open_group(str(self._tmp), mode="r+", use_consolidated=False)
        root.attrs["complete"] = True
        _consolidate(self._tmp)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self._tmp, self.path)


def write_store(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any],
                provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``arrays`` (keys like ``"train/images"``), ``attrs`` and ``provenance`` to ``path`` atomically."""
    with StoreWriter(path, attrs, provenance=provenance) as writer:
        for key, value in arrays.items():
            writer.write(key, value)
    return Path(path)


class CheckedArray:
    """A stored array for partial reads (``array[a:b]``): a chunk that fails its checksum raises
    :class:`StoreError` naming the store and the array; other attributes are zarr's."""

    def __init__(self, store: "Store", key: str, array: zarr.Array):
        self._store, self._key, self._array = store, key, array

    def __getitem__(self, selection):
        try:
            return self._array[selection]
        except Exception as error:  # zarr, numcodecs and zstd raise several types for a damaged chunk
            raise self._store.damaged(self._key, error) from None

    def __len__(self) -> int:
        return len(self._array)

    def __getattr__(self, name: str):
        return getattr(self._array, name)


class Store:
    """A read-only view of a complete store: ``store["train/images"]`` gives a numpy array, after
    checking it against its recorded checksum. ``attrs`` are the attributes the writer gave (with
    ``complete``); ``checksums`` and ``digest`` the integrity records."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: store does not exist")
        try:
            self._root = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # zarr raises several types for a broken store
            raise StoreError(f"{self.path}: not a readable Zarr store ({_one_line(exc)})") from exc
        if self._root.attrs.get("complete") is not True:
            raise StoreError(f"{self.path}: store is incomplete (no 'complete' mark); delete it and rerun")
        raw = dict(self._root.attrs)
        self._raw_attrs = dict(raw)
        # integrity records apart from the attributes the writer gave (and ``complete``)
        self.checksums: dict[str, str] = dict(raw.pop("checksums", None) or {})
        self.digest: str | None = raw.pop("digest", None)
        self.attrs = raw

    def damaged(self, key: str, error: BaseException | str) -> StoreError:
        reason = error if isinstance(error, str) else f"a chunk fails its checksum or cannot be decoded: {_one_line(error)}"
        return StoreError(f"{self.path}: array '{key}' is damaged ({reason}); "
                          f"run `poisonflow verify` or delete the store, then rerun")

    def __contains__(self, key: str) -> bool:
        try:
            node = self._root[key]
        except KeyError:
            return False
        return isinstance(node, zarr.Array)

    def keys(self) -> list[str]:
        found = []
        for name, node in self._root.members(max_depth=None):
            if isinstance(node, zarr.Array):
                found.append(name)
        return sorted(found)

    def _zarr_array(self, key: str) -> zarr.Array:
        if key not in self:
            raise StoreError(f"{self.path}: array '{key}' is missing")
        array = self._root[key]
        if array.size and array.nchunks_initialized != array.nchunks:
            raise StoreError(
                f"{self.path}: array '{key}' has {array.nchunks - array.nchunks_initialized} missing chunk(s)"
            )
        return array

    def array(self, key: str) -> CheckedArray:
        """The array for partial reads; every chunk read is checked (CRC-32C and zstd checksums)."""
        return CheckedArray(self, key, self._zarr_array(key))

    def blocks(self, key: str) -> Iterator[np.ndarray]:
        """The array's content in chunk-sized blocks along axis 0 (one block for a scalar)."""
        array = self.array(key)
        if array.ndim == 0 or not array.size:
            yield np.asarray(array[...]) if array.size else np.zeros(array.shape, array.dtype)
            return
        step = max(1, int(array.chunks[0]))
        for start in range(0, array.shape[0], step):
            yield np.asarray(array[start:start + step])

    def check(self, key: str, value: np.ndarray | None = None) -> None:
        """Compare ``key``'s content (``value`` if already read, else streamed block by block) with
        its recorded checksum; StoreError naming the path if it differs. Stores written before
        checksums were recorded pass unchecked."""
        expected = self.checksums.get(key)
        if expected is None:
            return
        hasher = _hasher()
        for block in ([value] if value is not None else self.blocks(key)):
            _update(hasher, block)
        if _checksum(hasher) != expected:
            raise self.damaged(key, "its content differs from the checksum recorded when it was written")

    def verify(self) -> None:
        """Read every array and check it; StoreError naming the path and the first damaged array."""
        recorded = set(self.checksums)
        present = set(self.keys())
        if self.checksums and recorded - present:
            raise StoreError(f"{self.path}: array '{sorted(recorded - present)[0]}' is missing")
        if self.digest is not None and store_digest(self._raw_attrs) != self.digest:
            raise StoreError(f"{self.path}: attributes differ from the digest recorded when it was written")
        for key in sorted(present):
            self.check(key)

    def __getitem__(self, key: str) -> np.ndarray:
        array = self.array(key)
        value = np.asarray(array[...]) if array.size else np.zeros(array.shape, array.dtype)
        self.check(key, value)
        return value


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text


def read_store(path: str | os.PathLike) -> Store:
    return Store(path)


def verify_store(path: str | os.PathLike) -> Store:
    """Open ``path`` and check every array against its checksums; StoreError naming it if damaged."""
    store = Store(path)
    store.verify()
    return store


def store_attrs(path: str | os.PathLike) -> dict:
    """A store's attributes from its consolidated metadata (``zarr.json``), without zarr: cheap,
    for ``poisonflow info``. StoreError naming the path when the file is missing or unreadable."""
    path = Path(path)
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError) as error:
        raise StoreError(f"{path}: no readable zarr.json ({_one_line(error)})") from None
    return dict(meta.get("attributes") or {})
