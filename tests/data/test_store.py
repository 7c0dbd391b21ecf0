import numpy as np
import pytest
import zarr

from poisonflow import store as store_module
from poisonflow.errors import StoreError
from poisonflow.store import read_store, write_store

N = 2500  # more samples than one chunk of 8-px images holds


@pytest.fixture
def arrays(store_arrays):
    return lambda: store_arrays(N, classes=10, poisoned=250, test=7)


def test_round_trip_keeps_values_dtypes_and_attrs(tmp_path, arrays):
    data = arrays()
    write_store(tmp_path / "s.zarr", data, {"classes": ["a", "b"], "source": "x"})
    store = read_store(tmp_path / "s.zarr")
    assert store.keys() == sorted(data)
    for key, value in data.items():
        assert store[key].dtype == value.dtype
        np.testing.assert_array_equal(store[key], value)
    assert store.attrs["classes"] == ["a", "b"] and store.attrs["complete"] is True
    assert not list(tmp_path.glob(".s.zarr.tmp-*"))  # no temporary left behind


def test_all_zero_chunks_are_written_and_read_back(tmp_path):
    # zero chunks must exist on disk, or a missing chunk could not be told from a zero one
    write_store(tmp_path / "z.zarr", {"a": np.zeros((3000, 4), np.uint8)}, {})
    assert read_store(tmp_path / "z.zarr").array("a").nchunks_initialized == 3


def test_incomplete_store_is_refused_with_its_path(tmp_path, arrays):
    write_store(tmp_path / "s.zarr", arrays(), {})
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+", use_consolidated=False)
    del root.attrs["complete"]
    store_module._consolidate(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"s\.zarr: store is incomplete"):
        read_store(tmp_path / "s.zarr")


def test_missing_chunk_is_refused_not_read_as_zeros(tmp_path, arrays):
    write_store(tmp_path / "s.zarr", arrays(), {})
    chunk = tmp_path / "s.zarr" / "train" / "images" / "c" / "1" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    store = read_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"train/images' has 1 missing chunk"):
        store["train/images"]
    np.testing.assert_array_equal(store["train/labels"], arrays()["train/labels"])


def test_missing_store_and_array_are_named(tmp_path, arrays):
    with pytest.raises(StoreError, match="nope.zarr: store does not exist"):
        read_store(tmp_path / "nope.zarr")
    write_store(tmp_path / "s.zarr", arrays(), {})
    with pytest.raises(StoreError, match="array 'train/other' is missing"):
        read_store(tmp_path / "s.zarr")["train/other"]


def test_rewrite_replaces_atomically(tmp_path):
    write_store(tmp_path / "s.zarr", {"a": np.ones(3, np.int64)}, {})
    write_store(tmp_path / "s.zarr", {"b": np.full(2, 5, np.int64)}, {})
    store = read_store(tmp_path / "s.zarr")
    assert store.keys() == ["b"]


# --------------------------------------------------------------------------------------------
# integrity: checksums recorded when written, verified when read
# --------------------------------------------------------------------------------------------

CHUNK = ("train", "images", "c", "1", "0", "0", "0")  # the second chunk of train/images


def _chunk(path):
    chunk = path.joinpath(*CHUNK)
    assert chunk.is_file()
    return chunk


def test_checksums_and_digest_are_recorded(tmp_path, arrays):
    data = arrays()
    write_store(tmp_path / "s.zarr", data, {"classes": ["a"]}, provenance={"stage": "test"})
    store = read_store(tmp_path / "s.zarr")
    assert sorted(store.checksums) == sorted(data)
    assert all(v.startswith("blake2b-128:") for v in store.checksums.values())
    assert store.digest.startswith("blake2b-128:") and store.attrs["provenance"] == {"stage": "test"}
    assert store.attrs == {"classes": ["a"], "provenance": {"stage": "test"}, "complete": True}
    on_disk = store_module.store_attrs(tmp_path / "s.zarr")  # as recorded (and as `poisonflow info` reads it)
    assert on_disk["checksums"] == store.checksums and on_disk["digest"] == store.digest
    # the digest is the content's: same arrays and attributes, other provenance → same digest
    write_store(tmp_path / "t.zarr", data, {"classes": ["a"]}, provenance={"stage": "other"})
    assert read_store(tmp_path / "t.zarr").digest == store.digest
    write_store(tmp_path / "u.zarr", dict(data, **{"train/labels": data["train/labels"][::-1].copy()}),
                {"classes": ["a"]})
    assert read_store(tmp_path / "u.zarr").digest != store.digest
    # appended batches give the checksum of the whole array
    with store_module.StoreWriter(tmp_path / "v.zarr", {"classes": ["a"]}) as writer:
        for key, value in data.items():
            for start in range(0, len(value), 700):
                writer.append(key, value[start:start + 700])
    assert read_store(tmp_path / "v.zarr").checksums == store.checksums


def test_zstd_and_crc32c_chunk_checksums_are_on(tmp_path, arrays):
    write_store(tmp_path / "s.zarr", arrays(), {})
    array = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["train/images"]
    names = [codec.to_dict()["name"] for codec in array.metadata.codecs]
    assert names == ["bytes", "zstd", "crc32c"]
    assert array.metadata.codecs[1].checksum is True


def _truncate(chunk):
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _flip(chunk):
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "bit-flip"])
def test_damaged_chunk_is_refused_with_the_path(tmp_path, arrays, damage):
    write_store(tmp_path / "s.zarr", arrays(), {})
    damage(_chunk(tmp_path / "s.zarr"))
    store = read_store(tmp_path / "s.zarr")
    pattern = rf"^{tmp_path / 's.zarr'}: array 'train/images' is damaged \(a chunk fails its checksum"
    with pytest.raises(StoreError, match=pattern) as error:
        store["train/images"]
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    with pytest.raises(StoreError, match=pattern):
        store.array("train/images")[1024:1030]  # partial reads are checked too
    with pytest.raises(StoreError, match=pattern):
        store_module.verify_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store["train/labels"], arrays()["train/labels"])  # the rest reads


def test_deleted_chunk_is_refused_by_verify(tmp_path, arrays):
    write_store(tmp_path / "s.zarr", arrays(), {})
    _chunk(tmp_path / "s.zarr").unlink()
    with pytest.raises(StoreError, match=rf"^{tmp_path / 's.zarr'}: array 'train/images' has 1 missing chunk"):
        store_module.verify_store(tmp_path / "s.zarr")


def test_swapped_valid_chunks_fail_the_array_checksum(tmp_path, arrays):
    # each chunk passes its own CRC; only the recorded checksum of the content can tell
    write_store(tmp_path / "s.zarr", arrays(), {})
    first = tmp_path.joinpath("s.zarr", "train", "images", "c", "0", "0", "0", "0")
    second = _chunk(tmp_path / "s.zarr")
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(StoreError, match=r"s\.zarr: array 'train/images' is damaged \(its content differs"):
        read_store(tmp_path / "s.zarr")["train/images"]


def test_stores_without_checksums_still_read(tmp_path, arrays):
    write_store(tmp_path / "s.zarr", arrays(), {})
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+", use_consolidated=False)
    del root.attrs["checksums"]
    del root.attrs["digest"]
    store_module._consolidate(tmp_path / "s.zarr")
    store_module.verify_store(tmp_path / "s.zarr")
    assert read_store(tmp_path / "s.zarr")["train/labels"].shape == (N,)


# --------------------------------------------------------------------------------------------
# temporaries left by killed writers
# --------------------------------------------------------------------------------------------

WRITER = """
import os, sys, time
import numpy as np
from poisonflow.store import StoreWriter
with StoreWriter(sys.argv[1], {{}}) as writer:
    writer.append("a", np.zeros((10, 4), np.uint8))
    print("writing", flush=True)
    {then}
"""


def _writer(target, then):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", WRITER.format(then=then), str(target)],
                            stdout=subprocess.PIPE, text=True)


def _temporaries(target):
    return sorted(target.parent.glob(f".{target.name}.tmp-*"))


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "s.zarr"
    killed = _writer(target, "os._exit(9)")  # dies mid-write, as under kill -9: no cleanup runs
    assert killed.stdout.readline() == "writing\n"
    assert killed.wait() == 9
    left = _temporaries(target)
    assert len(left) == 1 and f"-{killed.pid}-" in left[0].name
    write_store(target, {"a": np.ones(3, np.uint8)}, {})
    assert _temporaries(target) == [] and read_store(target)["a"].tolist() == [1, 1, 1]


def test_a_live_writers_temporary_is_kept(tmp_path):
    target = tmp_path / "s.zarr"
    live = _writer(target, "time.sleep(60)")
    try:
        assert live.stdout.readline() == "writing\n"
        write_store(target, {"a": np.ones(3, np.uint8)}, {})
        assert [f"-{live.pid}-" in p.name for p in _temporaries(target)] == [True]
    finally:
        live.kill()
        live.wait()
    write_store(target, {"a": np.ones(3, np.uint8)}, {})
    assert _temporaries(target) == []


def test_reused_pid_and_old_unnamed_temporaries_are_stale(tmp_path):
    import os
    import subprocess
    import sys
    import time

    target = tmp_path / "s.zarr"
    legacy = tmp_path / ".s.zarr.tmp-0123abcd"  # written by an older version, before this process
    legacy.mkdir()
    os.utime(legacy, (time.time() - 86400, time.time() - 86400))
    other = tmp_path / ".other.zarr.tmp-0123abcd"  # another target's: not touched
    other.mkdir()
    os.utime(other, (time.time() - 86400, time.time() - 86400))
    # a live process that started after the temporary named with its pid was last modified
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        reused = tmp_path / f".s.zarr.tmp-{store_module._host()}-{sleeper.pid}-0123abcd"
        reused.mkdir()
        os.utime(reused, (time.time() - 3600, time.time() - 3600))
        assert store_module.stale_temporaries(target) == sorted([legacy, reused])
        store_module.remove_stale_temporaries(target)
        assert not legacy.exists() and not reused.exists() and other.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
