"""emtile.markers: grouped done-markers written by the driver."""

import numpy as np
import zarr

from emtile.markers import BlockMarkers


def group(tmp_path):
    return zarr.open_group(tmp_path / "out.zarr", mode="w", zarr_format=3)


def test_record_flush_and_reopen(tmp_path):
    g = group(tmp_path)
    m = BlockMarkers.create(g, 10, chunk=4, flush_every=3600)
    assert m.array.chunks == (4,) and not m.done().any()
    m.record([1, 5])  # the first record is written at once
    m.record(9)
    # 9 is recorded in memory only: a crash now would lose it (it would be recomputed)
    on_disk = zarr.open_group(tmp_path / "out.zarr", mode="r")["emtile_blocks"][:]
    assert on_disk.nonzero()[0].tolist() == [1, 5]
    assert m.done().nonzero()[0].tolist() == [1, 5, 9]
    assert list(m.todo()) == [0, 2, 3, 4, 6, 7, 8]
    m.flush()
    again = BlockMarkers.open(zarr.open_group(tmp_path / "out.zarr", mode="r+"), 10)
    assert again.done().nonzero()[0].tolist() == [1, 5, 9] and again.count() == 3


def test_flush_every_zero_writes_at_once(tmp_path):
    m = BlockMarkers.create(group(tmp_path), 5)
    m.record(3)
    assert zarr.open_array(tmp_path / "out.zarr" / "emtile_blocks", mode="r")[:].tolist() == [0, 0, 0, 1, 0]


def test_open_refuses_another_plan(tmp_path):
    g = group(tmp_path)
    assert BlockMarkers.open(g, 7) is None  # not there: a set-up that did not finish
    BlockMarkers.create(g, 7)
    assert BlockMarkers.open(g, 8) is None and BlockMarkers.open(g, 7) is not None


def test_todo_is_lazy_over_a_million_blocks(tmp_path):
    m = BlockMarkers.create(group(tmp_path), 10**6)
    m.record(np.arange(0, 10**6, 2))
    it = m.todo()
    assert [next(it) for _ in range(3)] == [1, 3, 5]
    assert m.count() == 5 * 10**5


def test_record_outside_the_plan(tmp_path):
    import pytest

    m = BlockMarkers.create(group(tmp_path), 3)
    with pytest.raises(IndexError, match="block 3 is outside the plan of 3 blocks"):
        m.record(3)
