"""emtile.geometry: hand-worked cases and property tests of the tile grid and block plan."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emtile import EmtileError
from emtile.geometry import (ShapeMap, block_plan, choose_tile, normalize_roi, read_window,
                             reflect_index, tile_costs, tile_grid)

M4 = ShapeMap(depth=4)


# ------------------------------------------------------------------ hand-worked cases


def test_shape_map_by_hand():
    # 572 -(4)-> 568 /2 284 -> 280 /2 140 -> 136 /2 68 -> 64 /2 32 -> 28, up: 56-4 104-4 200-4 392-4
    assert M4.output_size(572) == 388
    assert M4.halo == 92 and M4.align == 16 and M4.min_size == 188
    assert M4.valid_sizes(540, 600) == [540, 556, 572, 588]
    assert ShapeMap(depth=2).halo == 20 and ShapeMap(depth=3).halo == 44
    assert M4.input_size((388, 4)) == (572, 188)


def test_shape_map_errors():
    with pytest.raises(EmtileError, match="tile=570 is not valid for depth 4: nearest valid sizes "
                                          "are 556 and 572"):
        M4.check(570)
    with pytest.raises(EmtileError, match="output size 390 is not reachable at depth 4: nearest "
                                          "output sizes are 388 and 404"):
        M4.input_size(390)
    with pytest.raises(EmtileError, match=r"tile=\(572, 572, 572\) has 3 values; expected 1 or 2"):
        M4.check((572, 572, 572))


def test_isbi_grid_at_572():
    """The issue's example: 572 -> 388, stride 384, neighbours overlap by 4 px."""
    g = tile_grid((30, 512, 512), M4, 572)
    assert g.in_tile == (1, 572, 572) and g.out_tile == (1, 388, 388)
    assert g.stride == (1, 384, 384) and g.overlap == (0, 4, 4) and g.halo == (0, 92, 92)
    assert g.counts == (30, 2, 2) and g.n_tiles == 120
    assert g.out_window((0, 1, 1)) == ((0, 384, 384), (1, 772, 772))
    assert g.in_window((0, 1, 1)) == ((0, 292, 292), (1, 864, 864))
    assert g.own_window((0, 0, 0)) == ((0, 0, 0), (1, 384, 384))  # owned: stride part only
    assert g.own_window((0, 1, 1)) == ((0, 384, 384), (1, 512, 512))  # last: to the region end


def test_overlap_reduces_the_stride_to_a_multiple_of_the_alignment():
    g = tile_grid((512, 512), M4, 572, overlap=40)
    assert g.stride == (336, 336) and g.overlap == (52, 52) and not g.owned
    with pytest.raises(EmtileError, match="overlap=380 is too large for tile=572"):
        tile_grid((512, 512), M4, 572, overlap=380)


def test_roi_grid_stays_on_the_global_alignment():
    g = tile_grid((5, 512, 512), M4, 572, roi=(slice(1, 3), slice(100, 300), slice(None)))
    assert g.region == ((1, 3), (100, 300), (0, 512))
    assert g.origin == (1, 96, 0)  # 100 rounded down to a multiple of 16


def test_block_plan_by_hand():
    g = tile_grid((2, 1000, 900), M4, 572)
    plan = block_plan(g, (1, 384, 384), max_block_px=800 * 800)
    assert plan.block_shape == (1, 768, 768) and plan.counts == (2, 2, 2) and len(plan) == 8
    b = plan[3]
    assert (b.start, b.stop) == ((0, 768, 768), (1, 1000, 900))
    assert b.tiles == ((0, 2, 2),)  # owned windows meet block edges exactly: no tile twice
    assert plan.n_tile_runs == g.n_tiles


def test_a_short_tail_joins_the_block_before_it():
    """The last tile along an axis owns its whole output (1028 px, past its 1024 stride): a block
    edge at 2048 would cut it, and it would run in two blocks. The 4-px tail joins the block
    before it instead, so each of the 4 tiles runs once (not 9 times)."""
    g = tile_grid((1, 2052, 2052), M4, 1212)
    assert g.out_tile[1:] == (1028, 1028) and g.stride[1:] == (1024, 1024) and g.n_tiles == 4
    plan = block_plan(g, (1, 1024, 1024), max_block_px=2048 * 2048)
    assert plan.block_shape == (1, 2048, 2048) and len(plan) == 1
    assert plan.box(0) == ((0, 0, 0), (1, 2052, 2052)) and plan.n_tile_runs == 4
    # a tail that does not start inside the last tile is a block of its own
    g = tile_grid((1, 2500, 388), M4, 572)
    plan = block_plan(g, (1, 384, 384), max_block_px=768 * 768)
    assert [plan.box(i)[0][1] for i in range(len(plan))] == [0, 768, 1536, 2304]
    assert plan.n_tile_runs == g.n_tiles == sum(plan.n_tiles(i) for i in range(len(plan)))


def test_choose_tile_prefers_one_big_tile_on_a_small_slice():
    tile, eff = choose_tile((30, 512, 512), M4, max_tile=800)
    assert tile == 700  # output 516 >= 512: one tile per slice
    assert eff == pytest.approx(512 * 512 / 700**2)
    tile, eff = choose_tile((30, 512, 512), M4, max_tile=600)
    assert tile in M4.valid_sizes(188, 600) and eff < 0.5
    with pytest.raises(EmtileError, match="no valid tile size between 10 and 100"):
        choose_tile((512, 512), M4, max_tile=100, min_tile=10)
    # a lower bound above one tile covering the region (blending ramps need room): the smallest
    # valid size from there
    assert choose_tile((50, 50), M4, min_tile=400)[0] == 412


def test_normalize_roi():
    assert normalize_roi(None, (3, 4)) == ((0, 3), (0, 4))
    assert normalize_roi((slice(1, None), slice(None, 2)), (3, 4)) == ((1, 3), (0, 2))
    with pytest.raises(EmtileError, match=r"roi=0:5,0:9 is outside the volume of shape \(3, 4\): "
                                          r"axis 0 needs 0 <= start < stop <= 3, got 0:5"):
        normalize_roi((slice(0, 5), slice(0, 9)), (3, 4))
    with pytest.raises(EmtileError, match="has 1 axes; the volume of shape"):
        normalize_roi((slice(0, 1),), (3, 4))
    with pytest.raises(EmtileError, match="got 2:2"):
        normalize_roi((slice(2, 2), slice(None)), (3, 4))


def test_reflect_index_matches_numpy_pad():
    for n in (1, 2, 3, 7):
        a = np.arange(n)
        padded = np.pad(a, (25, 31), mode="reflect")
        np.testing.assert_array_equal(a[reflect_index(np.arange(-25, n + 31), n)], padded)


def test_read_window_mirrors_only_outside():
    a = np.arange(5 * 6).reshape(5, 6)
    np.testing.assert_array_equal(read_window(a, (1, 2), (4, 5)), a[1:4, 2:5])
    expected = np.pad(a, ((3, 4), (2, 9)), mode="reflect")
    np.testing.assert_array_equal(read_window(a, (-3, -2), (9, 15)), expected)


# ------------------------------------------------------------------ properties


@st.composite
def grids(draw):
    depth = draw(st.integers(1, 4))
    m = ShapeMap(depth=depth)
    lead = draw(st.integers(0, 1))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(lead)) + tuple(
        draw(st.integers(1, 300)) for _ in range(2))
    roi = []
    for n in shape:
        a = draw(st.integers(0, n - 1))
        roi.append(slice(a, draw(st.integers(a + 1, n))))
    smallest = next(t for t in m.valid_sizes(m.min_size, 2000) if m.output_size(t) >= m.align)
    tile = draw(st.sampled_from(m.valid_sizes(smallest, smallest + 12 * m.align)))
    out = m.output_size(tile)
    overlap = draw(st.integers(0, out - m.align))
    grid = tile_grid(shape, m, tile, roi=tuple(roi), overlap=overlap)
    return m, grid


@st.composite
def grids_3d(draw):
    """3-D models with per-level factors (anisotropic or isotropic), tiles per axis."""
    depth = draw(st.integers(1, 3))
    factors = tuple(draw(st.sampled_from([(1, 2, 2), (2, 2, 2), (1, 3, 3), (2, 1, 2)]))
                    for _ in range(depth))
    m = ShapeMap(depth=depth, ndim=3, factors=factors)
    shape = tuple(draw(st.integers(1, n)) for n in (12, 48, 48))
    roi = []
    for n in shape:  # mostly large regions: several tiles along each axis
        a = draw(st.integers(0, n // 3))
        roi.append(slice(a, draw(st.integers(max(a + 1, 2 * n // 3), n))))
    tile, overlap = [], []
    for ax, a in enumerate(m.aligns):
        lo = next(t for t in itertools.count(m.min_sizes[ax]) if (m.output_along(t, ax) or 0) >= a)
        t = draw(st.sampled_from(m.valid_sizes(lo, lo + 4 * a, axis=ax)))
        tile.append(t)
        overlap.append(draw(st.integers(0, m.output_along(t, ax) - a)))
    return m, tile_grid(shape, m, tuple(tile), roi=tuple(roi), overlap=tuple(overlap))


@settings(max_examples=60, deadline=None)
@given(grids())
def test_tiles_cover_the_region_and_stay_aligned(args):
    check_cover(*args)


@settings(max_examples=40, deadline=None)
@given(grids_3d())
def test_3d_tiles_cover_the_region_and_stay_aligned_per_axis(args):
    check_cover(*args)


def check_cover(m, g):
    count = np.zeros(g.region_shape, np.int32)
    r0 = [a for a, _ in g.region]
    for idx in g.tiles():
        start, stop = g.out_window(idx)
        istart, istop = g.in_window(idx)
        # origins on multiples of the alignment along the model axes (volume coordinates)
        assert all(s % a == 0 for s, a in zip(start[g.ndim - m.ndim:], m.aligns))
        assert all(b - a == t for a, b, t in zip(istart, istop, g.in_tile))
        own0, own1 = g.own_window(idx)
        assert all(a <= b for a, b in zip(own0, own1))
        # crops stay inside the tile and the region
        assert all(s <= a and b <= e for a, b, s, e in zip(own0, own1, start, stop))
        assert all(lo <= a and b <= hi for a, b, (lo, hi) in zip(own0, own1, g.region))
        count[tuple(slice(a - o, b - o) for a, b, o in zip(own0, own1, r0))] += 1
    if g.owned:
        assert (count == 1).all()  # every pixel from exactly one tile
    else:
        assert (count >= 1).all()
    # no tile is wasted: each one's own window meets the region
    assert all(all(a < b for a, b in zip(*g.own_window(i))) for i in g.tiles())


@settings(max_examples=40, deadline=None)
@given(grids(), st.integers(1, 3), st.integers(1, 5000))
def test_blocks_partition_the_region_on_chunk_boundaries(args, chunk_factor, budget):
    m, g = args
    check_blocks(g, (1,) * (g.ndim - 2) + (chunk_factor * 7, chunk_factor * 5), budget)


@settings(max_examples=25, deadline=None)
@given(grids_3d(), st.integers(1, 3), st.integers(1, 50000))
def test_3d_blocks_partition_the_region_on_chunk_boundaries(args, chunk_factor, budget):
    m, g = args
    check_blocks(g, (chunk_factor * 3, chunk_factor * 7, chunk_factor * 5), budget)


def check_blocks(g, chunks, budget):
    plan = block_plan(g, chunks, max_block_px=budget)
    seen = np.zeros(g.region_shape, np.int32)
    needed = {}
    for idx in g.tiles():
        needed[idx] = g.own_window(idx)
    for block in plan:
        sl = block.slices(g.region)
        seen[sl] += 1
        for (a, _), s, c in zip(g.region, block.start, chunks):
            assert (s - a) % c == 0  # blocks start on chunk boundaries: they own whole chunks
        # exactly the tiles that contribute to the block
        expect = {i for i, (o0, o1) in needed.items()
                  if all(max(a, b) < min(c, d) for a, b, c, d in zip(o0, block.start, o1, block.stop))}
        assert set(block.tiles) == expect
    assert (seen == 1).all()


def test_per_axis_shape_map_by_hand():
    # z at depth 2 with factors (1,2,2), (2,2,2): no pooling and 1x3x3 kernels at level 0, then
    # 3x3x3: 18 -> 18 -(4) 14 /2 7 -(4) 3 -> 6 -(4) 2 -> 2 (halo 8, alignment 2)
    m = ShapeMap(depth=2, ndim=3, factors=((1, 2, 2), (2, 2, 2)))
    assert m.kernels == ((1, 3, 3), (3, 3, 3), (3, 3, 3))
    assert m.halos == (8, 20, 20) and m.aligns == (2, 4, 4) and m.min_sizes == (18, 44, 44)
    assert m.output_size((18, 44, 48)) == (2, 4, 8) and m.input_size((4, 4, 4)) == (20, 44, 44)
    assert m.output_size(48) == (32, 8, 8) and m.input_size(4) == (20, 44, 44)
    assert m.valid_sizes(40, 50) == [44, 48] and m.valid_sizes(17, 23, axis=0) == [18, 20, 22]
    with pytest.raises(EmtileError, match=r"^tile=\(19, 44, 44\) is not valid: 19 along z for "
                                          r"depth 2 with factors=\(\(1, 2, 2\), \(2, 2, 2\)\); "
                                          r"along z, nearest valid sizes are 18 and 20$"):
        m.check((19, 44, 44))
    with pytest.raises(EmtileError, match=r"^the halo differs per axis \(z 8, y 20, x 20\)"):
        m.halo
    # kernels of 5 along y and x at the bottom: 2 * 2 more pixels lost there, 4x in the input
    k = ShapeMap(depth=1, ndim=3, factors=((1, 2, 2),), kernels=((1, 3, 3), (3, 5, 5)))
    assert k.halos == (2, 4 + 2 * 4, 4 + 2 * 4) and k.aligns == (1, 2, 2)
    with pytest.raises(EmtileError, match="kernels=.*must be odd"):
        ShapeMap(depth=1, ndim=3, kernels=((3, 3, 3), (2, 3, 3)))
    with pytest.raises(EmtileError, match=r"factors=.* has 1 entries; expected 2"):
        ShapeMap(depth=2, ndim=3, factors=((1, 2, 2),))


def test_3d_tile_costs_are_the_cheapest_per_axis_combination():
    m = ShapeMap(depth=2, ndim=3, factors=((1, 2, 2), (2, 2, 2)))
    shape = (13, 41, 37)
    first = tile_costs(shape, m)[0]
    assert first == ((30, 84, 80), 1, 30 * 84 * 80)  # one tile covers the volume
    # under a budget of voxels: the cheapest of every valid combination that fits, by brute force
    budget = 60_000
    costs = tile_costs(shape, m, max_voxels=budget)
    best = min((tile_grid(shape, m, (z, y, x)).n_tiles * z * y * x, z * y * x)
               for z in m.valid_sizes(18, 30, axis=0) for y in m.valid_sizes(44, 84, axis=1)
               for x in m.valid_sizes(44, 80, axis=2) if z * y * x <= budget)
    assert (costs[0][2], np.prod(costs[0][0])) == best
    assert all(np.prod(t) <= budget for t, _, _ in costs)
    assert [c[2] for c in costs] == sorted(c[2] for c in costs)
    assert choose_tile(shape, m, max_voxels=budget)[0] == costs[0][0]
    with pytest.raises(EmtileError, match="no valid tile fits in 1000 voxels"):
        tile_costs(shape, m, max_voxels=1000)


def test_center_crop_of_arrays_and_tensors():
    import torch

    from emtile.geometry import center_crop

    a = np.arange(6 * 8).reshape(6, 8)
    np.testing.assert_array_equal(center_crop(a, (2, 4)), a[2:4, 2:6])
    t = torch.arange(2 * 6 * 8).reshape(2, 1, 6, 8)
    assert torch.equal(center_crop(t, (4, 4)), t[..., 1:5, 2:6])
    assert center_crop(a, (6, 8)) is not a and np.shares_memory(center_crop(a, (2, 2)), a)  # a view
