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
