"""Predict's reader: one raw window per group of tiles, batches cut from it as views and
normalised late give exactly the float32 tiles of reading and normalising tile by tile."""

import numpy as np
import pytest
import torch

from emtile import geometry, normalize
from emtile.normalize import Scaling
from emtile.tile_reader import Batches, Tiles


def raw(dtype, shape=(3, 45, 38), seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape) * 40 + 7).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)  # any byte order


SCALINGS = [Scaling("dtype"), Scaling("minmax", -3.25, 181.5), Scaling("percentile", 17.0, 17.0)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, ">u2", np.int16, np.int32, np.float32,
                                   np.float64, np.bool_])
@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s.method)
def test_batches_equal_tiles_read_and_normalised_one_by_one(dtype, scaling):
    """Windows overhang the volume (mirrored), a block's tiles come in groups smaller than the
    block and batches smaller than a group; the CPU batches and the device-side ones (torch,
    here on the CPU) are bitwise those of normalising each tile's own read."""
    volume = raw(dtype)
    shape_map = geometry.ShapeMap(2, 2)
    grid = geometry.tile_grid(volume.shape, shape_map, (44, 44))
    plan = geometry.block_plan(grid, (1, 16, 16), max_block_px=600)
    spatial = grid.in_tile[1:]
    cpu = Batches(grid, 2, scaling)
    device = Batches(grid, 2, scaling, on_device=True)
    groups = 0
    for block_index, first, window, origins, _ in Tiles(volume, None, plan, range(len(plan)), 3):
        assert window.dtype == volume.dtype.newbyteorder("=")  # raw pixels until the batch
        block = plan[block_index]
        tiles = block.tiles[first:first + 3]
        expected = np.stack([normalize.apply(geometry.read_window(volume, *grid.in_window(t)),
                                             scaling).reshape(spatial) for t in tiles])[:, None]
        for batches in (cpu, device):
            got = [(b0, x) for b0, x in batches(torch.from_numpy(window), origins, 2)]
            assert [b0 for b0, _ in got] == list(range(0, len(tiles), 2))
            x = torch.cat([x for _, x in got]).numpy()
            assert x.dtype == np.float32
            np.testing.assert_array_equal(x.view(np.uint32), expected.view(np.uint32))
        groups += 1
    assert groups > len(plan)  # some blocks took several groups


def test_a_window_of_an_in_memory_array_is_not_a_view_of_it():
    volume = raw(np.uint8)
    grid = geometry.tile_grid(volume.shape, geometry.ShapeMap(2, 2), (44, 44))
    plan = geometry.block_plan(grid, (1, 48, 48))
    _, _, window, _, _ = next(iter(Tiles(volume, None, plan, [0], 8)))
    assert not np.shares_memory(window, volume) and window.flags.c_contiguous
