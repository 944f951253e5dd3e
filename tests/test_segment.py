"""emtile segment: the kernels against their definitions, hand-built cells, block invariance,
resume after a kill, the output store, bad input."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from scipy import ndimage

import emtile
from emtile import EmtileError
from emtile.cli.main import main
from emtile.segmenter import kernels, segment
from emtile.settings import SegmentSettings
from emtile.store import create_image, is_complete, mark_complete

# --------------------------------------------------------------------------- helpers


def write_pred(path, p, *, voxel=None, kind="probabilities", complete=True, translation=None):
    """A probability store as emtile predict writes it (uint8 0..255 or floats)."""
    p = np.asarray(p)
    g = create_image(path, p.shape, p.dtype, kind=kind, voxel_size=voxel)
    g["0"][...] = p
    if translation is not None:
        ome = dict(g.attrs["ome"])
        ms = [dict(m) for m in ome["multiscales"]]
        d = dict(ms[0]["datasets"][0])
        d["coordinateTransformations"] = [d["coordinateTransformations"][0],
                                          {"type": "translation", "translation": translation}]
        ms[0]["datasets"] = [d]
        ome["multiscales"] = ms
        g.attrs["ome"] = ome
    if complete:
        mark_complete(g)
    return str(path)


def read_labels(path):
    return np.asarray(zarr.open_group(str(path), mode="r")["0"][...])


def run(tmp_path, p, name="seg.zarr", **kw):
    """Segment ``p`` (written once per test under tmp_path) and return the labels."""
    pred = tmp_path / "pred.zarr"
    if not pred.exists():
        write_pred(pred, p)
    out = tmp_path / name
    kw.setdefault("progress", False)
    result = segment(str(pred), str(out), overwrite=True, **kw)
    labels = read_labels(out)
    assert labels.max(initial=0) == result.objects
    return labels, result


def assert_consecutive(labels, n):
    ids = np.unique(labels)
    assert list(ids[ids > 0]) == list(range(1, n + 1))


def boundary_map(labels, sigma=2.0, noise=0.1, seed=0):
    """A synthetic probability of interior from binary truth: blurred in-plane, noisy, uint8."""
    rng = np.random.default_rng(seed)
    p = ndimage.gaussian_filter((labels > 0).astype(np.float32), (0, sigma, sigma))
    p = np.clip(p + rng.normal(0, noise, p.shape), 0, 1)
    return np.round(p * 255).astype(np.uint8)


def flood_reference(seeds, domain, alt, rounds, axes, origin, volume_shape):
    """The flood's definition, pixel by pixel in Python: (cost, source) tuples, every pixel every
    round from the previous round's values; then only keys carried by a chain of neighbours'
    final keys back to a seed are kept."""
    inf = (1 << 40, 0)
    shape = seeds.shape
    key = {}
    for z, y, x in itertools.product(*map(range, shape)):
        g = np.ravel_multi_index((z + origin[0], y + origin[1], x + origin[2]), volume_shape)
        key[z, y, x] = (0, int(g)) if seeds[z, y, x] else inf

    def neighbours(pos):
        for ax in axes:
            for d in (-1, 1):
                nb = list(pos)
                nb[ax] += d
                if tuple(nb) in key:
                    yield tuple(nb)

    for _ in range(rounds):
        new = dict(key)
        for pos in key:
            if domain[pos]:
                for nb in neighbours(pos):
                    if key[nb] != inf:
                        cost, src = key[nb]
                        new[pos] = min(new[pos], (cost + 1 + int(alt[pos]), src))
        key = new
    carried = {pos for pos in key if key[pos] != inf and not domain[pos]}
    grew = True
    while grew:
        grew = False
        for pos in key:
            if pos in carried or not domain[pos] or key[pos] == inf:
                continue
            if any(nb in carried and key[pos] == (key[nb][0] + 1 + int(alt[pos]), key[nb][1])
                   for nb in neighbours(pos)):
                carried.add(pos)
                grew = True
    return {pos: (k if pos in carried or k == inf else inf) for pos, k in key.items()}


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("axes,shape", [((1, 2), (2, 9, 11)), ((0, 1, 2), (4, 6, 7))])
def test_flood_matches_its_definition(axes, shape):
    rng = np.random.default_rng(1)
    volume_shape = (shape[0] + 3, shape[1] + 5, shape[2] + 2)
    origin = (2, 4, 1)
    for trial in range(4):
        alt = rng.integers(0, 256, shape).astype(np.uint8)
        alt[rng.random(shape) < 0.3] = 255  # plateaus: ties go to the lower source
        seeds = rng.random(shape) < 0.08
        domain = ~seeds & (rng.random(shape) < 0.85)  # some walls
        rounds = 3 + 2 * trial
        got = kernels.flood(seeds, domain, alt, rounds=rounds, axes=axes, origin=origin,
                            volume_shape=volume_shape)
        ref = flood_reference(seeds, domain, alt, rounds, axes, origin, volume_shape)
        for pos, (cost, src) in ref.items():
            k = int(got[pos])
            if cost == 1 << 40:
                assert k == kernels.UNSET, pos
            else:
                assert (k >> 44, k & ((1 << 44) - 1)) == (cost, src), pos


def test_flood_is_local():
    """The flood on a window with 2 x `rounds` of context equals the whole array's flood there."""
    rng = np.random.default_rng(2)
    shape = (1, 60, 70)
    alt = ndimage.gaussian_filter(rng.random(shape), 2)
    alt = np.round(255 * (alt - alt.min()) / np.ptp(alt)).astype(np.uint8)
    seeds = alt < 60
    full = kernels.flood(seeds, ~seeds, alt, rounds=9, axes=(1, 2), origin=(0, 0, 0),
                         volume_shape=shape)
    for y0, x0 in [(10, 20), (0, 0), (40, 50)]:  # 2 x rounds of context (rounds, then the check)
        a = (0, max(0, y0 - 18), max(0, x0 - 18))
        b = (1, min(60, y0 + 20 + 18), min(70, x0 + 15 + 18))
        sub = tuple(slice(i, j) for i, j in zip(a, b))
        part = kernels.flood(seeds[sub], ~seeds[sub], alt[sub], rounds=9, axes=(1, 2), origin=a,
                             volume_shape=shape)
        inner = (slice(0, 1), slice(y0 - a[1], y0 - a[1] + 20), slice(x0 - a[2], x0 - a[2] + 15))
        np.testing.assert_array_equal(part[inner],
                                      full[0:1, y0:y0 + 20, x0:x0 + 15])


def test_flood_needs_exactly_its_rounds_of_context():
    # a seed at x = 0, a flat boundary: the label reaches x = rounds and no further
    seeds = np.zeros((1, 1, 30), bool)
    seeds[0, 0, 0] = True
    alt = np.zeros((1, 1, 30), np.uint8)
    full = kernels.flood(seeds, ~seeds, alt, rounds=10, axes=(1, 2), origin=(0, 0, 0),
                         volume_shape=(1, 1, 30))
    assert (full[0, 0, :11] != kernels.UNSET).all() and (full[0, 0, 11:] == kernels.UNSET).all()
    for start, same in [(0, True), (1, False)]:  # pixel 10 with 10 resp. 9 pixels of context
        win = kernels.flood(seeds[..., start:], ~seeds[..., start:], alt[..., start:],
                            rounds=10, axes=(1, 2), origin=(0, 0, start),
                            volume_shape=(1, 1, 30))
        assert (win[0, 0, 10 - start] == full[0, 0, 10]) == same


def test_seed_maxima_are_local_and_capped():
    mask = np.zeros((1, 50, 80), bool)
    mask[0, 5:45, 5:75] = True  # a wide cell: its core {d == cap} is one plateau of seeds
    mask[0, 20:30, 40] = False
    peaks = kernels.seed_maxima(mask, cap=6, radius=2, axes=(1, 2))
    d = ndimage.distance_transform_edt(mask[0])
    np.testing.assert_array_equal(peaks[0] & (d >= 6), d >= 6)
    # computed on a window with cap + radius of context: the same seeds
    win = kernels.seed_maxima(mask[:, 10:40, 30:70], cap=6, radius=2, axes=(1, 2))
    np.testing.assert_array_equal(win[:, 8:22, 8:32], peaks[:, 18:32, 38:62])
    # no boundary at all in the window: d = cap everywhere (not SciPy's virtual corner)
    assert kernels.seed_maxima(np.ones((1, 5, 5), bool), cap=3, radius=1, axes=(1, 2)).all()


def test_interior_rule_is_predicts():
    # uint8 v means v / 255, compared in float32 with p > T, as emtile predict --threshold does
    v = np.arange(256, dtype=np.uint8)
    for t in (0.0, 0.3, 0.5, 0.9, 1.0):
        expected = (v.astype(np.float32) / np.float32(255)) > np.float32(t)
        np.testing.assert_array_equal(kernels.interior_mask(v, t), expected)
    assert kernels.interior_mask(np.uint8(128), 0.5) and not kernels.interior_mask(np.uint8(127), 0.5)
    np.testing.assert_array_equal(kernels.altitude(np.array([0.0, 0.5, 1.0], np.float16)),
                                  [255, 128, 0])


def adjacent_pairs_reference(frag, alt, source, *, start, stop, axes, origin, volume_shape,
                             sampling):
    """The region-graph edges of a box by their definition, pixel pair by pixel pair."""
    faces = {}
    for pos in itertools.product(*(range(a, b) for a, b in zip(start, stop))):
        for ax in axes:
            nb = list(pos)
            nb[ax] += 1
            nb = tuple(nb)
            if nb[ax] >= frag.shape[ax]:
                continue
            a, b = int(frag[pos]), int(frag[nb])
            if a <= 0 or b <= 0 or a == b:
                continue
            vec = []
            for p in (pos, nb):
                here = np.add(p, origin)
                vec.append(np.subtract(np.unravel_index(int(source[p]), volume_shape), here))
            dot = sum(w * w * float(x) * float(y) for w, x, y in zip(sampling, *vec))
            evidence = dot < 0 or not (np.any(vec[0]) or np.any(vec[1]))
            face = faces.setdefault((min(a, b), max(a, b)), [0, 0, 0])
            if evidence:
                face[0] += int(alt[pos]) + int(alt[nb])
                face[1] += 2
            face[2] += 1
    return np.array([[u, v, *faces[u, v]] for u, v in sorted(faces)], np.int64).reshape(-1, 5)


@pytest.mark.parametrize("axes,sampling", [((1, 2), (1.0, 1.0, 1.0)),
                                           ((0, 1, 2), (12.5, 1.0, 1.0))])
def test_compiled_edges_and_stats_equal_their_definition(axes, sampling):
    """The Numba passes (pixels.py) on random blocks: edges, fragment stats, labels read at
    sources, summed pairs, against plain Python / NumPy."""
    rng = np.random.default_rng(5)
    shape, origin, volume_shape = (4, 9, 11), (2, 3, 1), (9, 15, 14)
    for trial in range(3):
        frag = rng.integers(0, 6, shape) * (10 ** (3 * trial))  # ids dense, then far apart
        alt = rng.integers(0, 256, shape).astype(np.uint8)
        here = np.ravel_multi_index(np.add(np.indices(shape), np.reshape(origin, (3, 1, 1, 1))),
                                    volume_shape)
        source = np.where(rng.random(shape) < 0.4, here,
                          rng.integers(0, np.prod(volume_shape), shape))
        for start, stop in [((0, 0, 0), shape), ((1, 2, 3), (3, 7, 8))]:
            got = kernels.adjacent_pairs(frag, alt, source, start=start, stop=stop, axes=axes,
                                         origin=origin, volume_shape=volume_shape,
                                         sampling=sampling)
            ref = adjacent_pairs_reference(frag, alt, source, start=start, stop=stop, axes=axes,
                                           origin=origin, volume_shape=volume_shape,
                                           sampling=sampling)
            np.testing.assert_array_equal(got, ref)
            own = tuple(slice(a, b) for a, b in zip(start, stop))
            box, inside = frag[own], alt[own] < 128
            ids = np.unique(box[box > 0])
            stats = [[i, np.sum(inside & (box == i)),
                      np.ravel_multi_index(np.add(np.argwhere(box == i)[0], origin),
                                           volume_shape)] for i in ids]
            np.testing.assert_array_equal(
                kernels.fragment_stats(box, inside, origin=origin, volume_shape=volume_shape),
                np.array(stats, np.int64).reshape(-1, 3))
        # labels read at each key's source, fill where unset
        labels = rng.integers(1, 50, shape)
        src = rng.integers(0, frag.size, shape)
        key = (np.int64(rng.integers(0, 500)) << 44) + here.reshape(-1)[src]
        key[rng.random(shape) < 0.3] = kernels.UNSET
        fill = rng.integers(-5, 0, shape)
        np.testing.assert_array_equal(
            kernels.source_labels(key, labels, origin=origin, volume_shape=volume_shape,
                                  fill=fill),
            np.where(key == kernels.UNSET, fill, labels.reshape(-1)[src]))
    # summed pairs: enough distinct pairs for the table to grow several times
    u, v = rng.integers(0, 150, 60000), rng.integers(-3, 150, 60000)
    w = rng.integers(0, 9, (2, u.size))
    pairs = sorted(set(zip(u.tolist(), v.tolist())))
    ref = {p: [0, 0] for p in pairs}
    for a, b, x, y in zip(u.tolist(), v.tolist(), *w.tolist()):
        ref[a, b][0] += x
        ref[a, b][1] += y
    np.testing.assert_array_equal(kernels.sum_edges(u, v, w[0], w[1]),
                                  np.array([[a, b, *ref[a, b]] for a, b in pairs]))
    assert kernels.sum_edges(u[:0], v[:0], w[0, :0]).shape == (0, 3)


def random_region_graph(n, seed, *, coarse=False):
    """A planar-like region graph of ``n`` objects: on a grid, faces to the right, below and
    (some) diagonally; random face sums, some faces without evidence; random sizes and first
    pixels. ``coarse``: few distinct means and contacts, so that ties are everywhere."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    idx = np.arange(n)
    u, v = [], []
    for off, share in ((1, 1.0), (side, 1.0), (side + 1, 0.3)):
        ok = (idx + off < n) & (rng.random(n) < share)
        if off != side:
            ok &= idx % side != side - 1
        u.append(idx[ok])
        v.append(idx[ok] + off)
    u, v = np.concatenate(u), np.concatenate(v)
    c = rng.integers(1, 4 if coarse else 40, u.size)
    c[rng.random(u.size) < 0.1] = 0  # contact only, no evidence
    s = c * (rng.integers(0, 4, u.size) * 64 if coarse else rng.integers(0, 256, u.size))
    t = c + rng.integers(0, 2 if coarse else 5, u.size)
    first = rng.permutation(4 * n)[:n]
    size = rng.integers(1, 200, n)
    return first, size, np.stack([u, v, s, c, t], axis=1).astype(np.int64)


@pytest.mark.parametrize("seed, coarse", [(0, False), (1, False), (2, True), (3, True)])
def test_compiled_merges_equal_the_python_definition(seed, coarse):
    """merge_objects (Numba) makes RegionGraph's merges: the same ids on random graphs, with
    and without ties, for every combination of agglomeration and small-object absorption."""
    from emtile.segmenter.agglomerate import merge_objects
    from emtile.segmenter.graph import RegionGraph

    first, size, edges = random_region_graph(3000, seed, coarse=coarse)
    for threshold, min_size in [(0.5, 60), (None, 60), (0.3, 0), (1.0, 400), (0.0, 2),
                                (None, 0)]:
        graph = RegionGraph(first, size, edges)
        if threshold is not None:
            graph.agglomerate(threshold)
        graph.absorb_small(min_size)
        ids, count = graph.final_ids()
        got, got_count = merge_objects(first, size, edges, merge_threshold=threshold,
                                       min_size=min_size)
        assert got_count == count and 0 < count
        np.testing.assert_array_equal(got, ids, err_msg=f"{threshold}, {min_size}")
    ids, count = merge_objects(first[:0], size[:0], edges[:0], merge_threshold=0.5, min_size=5)
    assert ids.shape == (0,) and count == 0


def with_histograms(edges, seed, *, coarse=False):
    """``edges`` with random face histograms (``FACE_BINS`` columns): each face's evidence
    pixels spread over the bins, some of them above the last bin (counted only in the total)."""
    rng = np.random.default_rng(seed)
    bins = kernels.FACE_BINS
    c = edges[:, 3]
    hist = np.zeros((c.size, bins), np.int64)
    spread = 3 if coarse else bins  # coarse: few bins in use, ties everywhere
    low = rng.random(c.size)  # the share of each face's pixels in the bins
    for i, n in enumerate(c.tolist()):
        b = np.where(rng.random(n) < low[i], rng.integers(0, spread, n), bins)
        hist[i] = np.bincount(b[b < bins], minlength=bins)
    return np.concatenate([edges, hist], axis=1)


@pytest.mark.parametrize("seed, coarse", [(0, False), (1, True)])
def test_compiled_quantile_merges_equal_the_python_definition(seed, coarse):
    """Quantile linkage: merge_objects makes RegionGraph's merges on faces with histograms."""
    from emtile.segmenter.agglomerate import merge_objects
    from emtile.segmenter.graph import RegionGraph

    first, size, edges = random_region_graph(3000, seed, coarse=coarse)
    edges = with_histograms(edges, seed, coarse=coarse)
    merged = []
    for quantile, min_size in [(0.5, 60), (0.25, 0), (1.0, 0), (0.1, 400)]:
        graph = RegionGraph(first, size, edges, quantile=quantile)
        merged.append(graph.agglomerate(0.3))  # the threshold is in the bins already
        graph.absorb_small(min_size)
        ids, count = graph.final_ids()
        got, got_count = merge_objects(first, size, edges, merge_threshold=0.3,
                                       merge_quantile=quantile, min_size=min_size)
        assert got_count == count and 0 < count
        np.testing.assert_array_equal(got, ids, err_msg=f"{quantile}, {min_size}")
    assert merged[2] < merged[0] < merged[1]  # a higher quantile needs more of the face low


def test_face_histograms_count_the_evidence_pixels():
    """With every level in the bins (limit 255), a face's histogram counts exactly the
    evidence pixels whose altitudes are summed; with a lower limit, those at or below it."""
    rng = np.random.default_rng(0)
    frag = np.repeat(np.repeat(rng.integers(1, 6, (1, 6, 7)), 5, axis=1), 5, axis=2)
    alt = rng.integers(0, 256, frag.shape).astype(np.uint8)
    source = np.arange(frag.size).reshape(frag.shape)  # every pixel its own source: interior
    kw = dict(start=(0, 0, 0), stop=frag.shape, axes=(1, 2), origin=(0, 0, 0),
              volume_shape=frag.shape)
    plain = kernels.adjacent_pairs(frag, alt, source, **kw)
    full = kernels.adjacent_pairs(frag, alt, source, bins=kernels.altitude_bins(255), **kw)
    np.testing.assert_array_equal(full[:, :5], plain)
    np.testing.assert_array_equal(full[:, 5:].sum(axis=1), plain[:, 3])
    limit = kernels.face_limit(0.3)
    assert limit == 76  # 0.3 * 255 = 76.5
    low = kernels.adjacent_pairs(frag, alt, source, bins=kernels.altitude_bins(limit), **kw)
    for u, v, *_, in plain[:4].tolist():  # recount the first faces by hand
        a, b = frag[0], alt[0].astype(int)
        count = sum(int(x <= limit) + int(y <= limit) for ax in (0, 1)
                    for p, q, x, y in zip(np.take(a, range(a.shape[ax] - 1), ax).ravel(),
                                          np.take(a, range(1, a.shape[ax]), ax).ravel(),
                                          np.take(b, range(a.shape[ax] - 1), ax).ravel(),
                                          np.take(b, range(1, a.shape[ax]), ax).ravel())
                    if {int(p), int(q)} == {u, v})
        row = low[(low[:, 0] == u) & (low[:, 1] == v)][0]
        assert row[5:].sum() == count


def test_median_linkage_merges_a_split_cell_with_specks(tmp_path):
    """One cell split by a band of weak boundary (p 0.6) with dark specks, beside a second
    cell behind a real membrane: the mean of the band's face is above the merge threshold
    (the specks), its median is not, so only median linkage joins the split cell; the
    membrane is never merged."""
    p = np.ones((1, 40, 70), np.float32)
    p[0, :, 44:47] = 0  # the membrane between the two cells
    p[0, :, 20:22] = 0.6  # the band splitting the first cell
    p[0, ::3, 20:22] = 0  # specks in it: a third of its pixels
    kw = dict(method="ws", threshold=0.85, merge_threshold=0.45)
    _, r = run(tmp_path, p, "mean.zarr", merge_quantile=None, **kw)
    assert r.objects == 3
    labels, r = run(tmp_path, p, "median.zarr", merge_quantile=0.5, **kw)
    assert r.objects == 2
    assert labels[0, 10, 5] == labels[0, 10, 30] != labels[0, 10, 60]
    blocks, _ = run(tmp_path, p, "blocks.zarr", merge_quantile=0.5, block_size=(1, 9, 11), **kw)
    np.testing.assert_array_equal(blocks, labels)


# --------------------------------------------------------------------------- hand-built cells


WS_DISTANCE = dict(method="ws", seeds="distance", merge_quantile=None)  # ws before quantiles
METHOD_OPTS = {"cc": dict(method="cc"), "ws": dict(method="ws"), "ws-distance": WS_DISTANCE}


def two_cells_with_gap():
    """Two rectangles of interior; the 2-px membrane between them has a one-pixel gap."""
    p = np.zeros((1, 40, 60), np.float32)
    p[0, 5:35, 5:29] = 1
    p[0, 5:35, 31:55] = 1
    p[0, 20, 29:31] = 1  # the gap: the two interiors touch through one pixel row
    return p


def test_two_cells_touching_through_a_gap(tmp_path):
    p = two_cells_with_gap()
    cc, r = run(tmp_path, p, "cc.zarr", method="cc")
    assert r.objects == 1  # components cannot see the gap
    _, r = run(tmp_path, p, "wsc.zarr", method="ws")
    assert r.objects == 1  # nor can component seeds
    for q in (None, 0.5):
        ws, r = run(tmp_path, p, f"ws{q}.zarr", **dict(WS_DISTANCE, merge_quantile=q),
                    merge_threshold=0.5)
        assert r.objects == 2  # the shared face is mostly membrane: not merged
        assert ws[0, 20, 10] != ws[0, 20, 50] and ws[0, 20, 10] > 0 and ws[0, 20, 50] > 0
        assert (ws > 0).all()  # the membrane is given to the cells
    kept, _ = run(tmp_path, p, "kept.zarr", **WS_DISTANCE, keep_boundaries=True)
    np.testing.assert_array_equal(kept > 0, p > 0.5)
    # merged when the threshold accepts the face
    _, r = run(tmp_path, p, "merged.zarr", **WS_DISTANCE, merge_threshold=1.0)
    assert r.objects == 1


def plus_shape(shape=(1, 70, 90)):
    """A plus-shaped cell in a 2-px membrane, inside a second cell that fills the rest."""
    plus = np.zeros(shape, bool)
    plus[:, 30:40, 4:86] = True
    plus[:, 5:65, 40:50] = True
    ring = ndimage.binary_dilation(plus, np.ones((1, 5, 5), bool)) & ~plus
    return (~ring).astype(np.float32)


def spiral(n=64, width=2, gap=3):
    """A square spiral path of interior pixels (it leaves and re-enters every small block)."""
    img = np.zeros((n, n), bool)
    y, x, dy, dx = n // 2, n // 2, 0, 1
    step, length = 0, 1
    while 0 <= y < n - width and 0 <= x < n - width:
        for _ in range(length * (width + gap)):
            img[y:y + width, x:x + width] = True
            y, x = y + dy, x + dx
            if not (0 <= y < n - width and 0 <= x < n - width):
                break
        dy, dx = dx, -dy
        step += 1
        if step % 2 == 0:
            length += 1
    return img[None].astype(np.float32)


@pytest.mark.parametrize("method", ["cc", "ws", "ws-distance"])
@pytest.mark.parametrize("case", ["plus", "spiral"])
def test_one_cell_across_many_blocks(tmp_path, method, case):
    p = plus_shape() if case == "plus" else spiral()
    cells = ndimage.label(p[0] > 0.5)[1]
    assert cells == (2 if case == "plus" else 1)
    # ws splits the spiral where its turns meet along a long membrane (a neck, as between two
    # cells touching through a gap); a permissive merge threshold joins the fragments again,
    # across every block face, on the global region graph
    opts = dict(METHOD_OPTS[method], merge_threshold=1.0 if case == "spiral" else 0.5)
    whole, r1 = run(tmp_path, p, "whole.zarr", **opts)
    assert r1.objects == cells and r1.blocks == 1
    if case == "plus":  # the plus is one object, its membrane split with its neighbour
        assert np.unique(whole[0, 30:40, 4:86]).size == 1 and (whole > 0).all()
    block = (1, 13, 17) if case == "plus" else (1, 8, 8)  # the cell crosses every block face
    small, r2 = run(tmp_path, p, "small.zarr", block_size=block, **opts)
    assert r2.blocks > 20
    np.testing.assert_array_equal(small, whole)
    assert_consecutive(small, cells)


@pytest.mark.parametrize("method", ["cc", "ws"])
def test_empty_volume_and_one_cell(tmp_path, method):
    empty, r = run(tmp_path, np.zeros((2, 30, 40), np.float32), "empty.zarr", method=method,
                   block_size=(1, 16, 16))
    assert r.objects == 0 and not empty.any()
    (tmp_path / "pred.zarr").rename(tmp_path / "empty-pred.zarr")
    one, r = run(tmp_path, np.ones((2, 30, 40), np.float32), "one.zarr", method=method,
                 block_size=(1, 16, 16))
    # one cell per slice in 2d mode, the first slice's first
    assert r.objects == 2 and (one[0] == 1).all() and (one[1] == 2).all()
    (tmp_path / "pred.zarr").rename(tmp_path / "one-pred.zarr")
    one3, r = run(tmp_path, np.ones((2, 30, 40), np.float32), "one3.zarr", method=method,
                  mode="3d", block_size=(1, 16, 16))
    assert r.objects == 1 and (one3 == 1).all()


def test_ids_unique_and_consecutive(tmp_path, isbi_labels):
    truth = isbi_labels[:2, :160, :200]
    labels, r = run(tmp_path, boundary_map(truth), method="cc", block_size=(1, 50, 70))
    assert_consecutive(labels, r.objects)
    for z in range(2):  # in 2d mode every id is one connected piece of one slice
        for i in np.unique(labels[z])[1:]:
            assert ndimage.label(labels[z] == i)[1] == 1
    assert not np.intersect1d(np.unique(labels[0])[1:], np.unique(labels[1])[1:]).size
    # numbered in the order of their first pixel (C order)
    _, first = np.unique(labels.ravel(), return_index=True)
    assert np.all(np.diff(first[1:] if labels.ravel()[0] == 0 else first) > 0)


def test_small_objects_join_their_neighbour_or_go(tmp_path):
    p = np.zeros((1, 40, 60), np.float32)
    p[0, 2:38, 2:30] = 1  # a big cell
    p[0, 2:38, 33:58] = 1  # a second big cell
    p[0, 18:21, 31] = 0.9  # a 3-pixel blob inside the membrane between them
    labels, r = run(tmp_path, p, "keep.zarr", method="cc", threshold=0.5)
    assert r.objects == 3
    labels, r = run(tmp_path, p, "min.zarr", method="cc", threshold=0.5, min_size=10,
                    block_size=(1, 7, 9))
    assert r.objects == 2
    whole, _ = run(tmp_path, p, "min1.zarr", method="cc", threshold=0.5, min_size=10)
    np.testing.assert_array_equal(labels, whole)
    # alone (no neighbour within reach): dropped
    q = np.zeros((1, 40, 60), np.float32)
    q[0, 18:21, 31] = 1
    (tmp_path / "pred.zarr").rename(tmp_path / "p1.zarr")
    labels, r = run(tmp_path, q, "alone.zarr", method="cc", min_size=10)
    assert r.objects == 0 and not labels.any()


# --------------------------------------------------------------------------- block invariance


INVARIANCE = [
    dict(method="cc"),
    dict(method="cc", keep_boundaries=True, min_size=40),
    dict(method="ws"),
    dict(method="ws", threshold=0.7, merge_threshold=0.6, merge_quantile=0.25),
    dict(method="ws", merge_quantile=None, merge_threshold=0.5),
    WS_DISTANCE,
    dict(WS_DISTANCE, min_size=60, merge_threshold=0.4, keep_boundaries=True),
    dict(WS_DISTANCE, merge_threshold=0.5, merge_quantile=0.5),
]


@pytest.mark.parametrize("opts", INVARIANCE, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_block_invariance_2d(tmp_path, isbi_labels, opts):
    p = boundary_map(isbi_labels[:2, :200, :230], noise=0.15)
    whole, r = run(tmp_path, p, "whole.zarr", **opts, block_size=p.shape)
    assert r.blocks == 1 and r.objects > 20
    for block in [(1, 64, 64), (2, 37, 101), (1, 200, 19)]:  # not dividing the shape
        labels, _ = run(tmp_path, p, f"b{block[1]}.zarr", **opts, block_size=block)
        np.testing.assert_array_equal(labels, whole, err_msg=str(block))


def sparse_cells(shape, seed=0):
    """Cells of all sizes far apart in a wide, uneven boundary: labels travel the whole flood
    distance, the interior flood the whole interior distance, so every halo is needed."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), (0, 3, 3))
    field = (field - field.min()) / np.ptp(field)
    p = 0.45 * field  # boundary everywhere: p < 0.45
    inside = np.zeros(shape, bool)
    for _ in range(max(3, shape[1] * shape[2] // 700)):
        z, y, x = (rng.integers(0, n) for n in shape)
        r = rng.integers(2, 22)
        yy, xx = np.ogrid[:shape[1], :shape[2]]
        inside[z] |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    for _ in range(max(1, shape[1] * shape[2] // 8000)):  # wedges: seeds far from the tip
        z, y, x = (rng.integers(0, n) for n in shape)
        for k in range(60):
            half = 1 + k // 6
            inside[z, max(0, y - half):y + half + 1, min(shape[2] - 1, x + k)] = True
    p[inside] = 0.95 + 0.05 * field[inside]
    return np.round(p * 255).astype(np.uint8)


@pytest.mark.parametrize("method,short", [("cc", False), ("ws", False), ("ws-distance", False),
                                          ("cc", True), ("ws", True), ("ws-distance", True)])
def test_block_invariance_wide_boundaries(tmp_path, monkeypatch, method, short):
    """Every halo is needed: a block that read one pixel less would differ (checked by
    shrinking each halo by one). ``short``: tiny operator parameters, so that most paths run
    into their limits."""
    opts = dict(METHOD_OPTS[method], threshold=0.5, min_size=15)
    if short:
        opts.update(seed_cap=3, seed_radius=1, interior_rounds=4, grow=3)
    p = sparse_cells((2, 150, 170))
    whole, r = run(tmp_path, p, "whole.zarr", **opts, block_size=p.shape)
    assert r.objects > 10 and (whole == 0).any()  # some boundary is out of every cell's reach
    for block in [(1, 23, 19), (2, 64, 150)]:
        labels, _ = run(tmp_path, p, f"b{block[1]}.zarr", **opts, block_size=block)
        np.testing.assert_array_equal(labels, whole, err_msg=str(block))


@pytest.mark.parametrize("method", ["cc", "ws", "ws-distance"])
def test_block_invariance_3d(tmp_path, isbi_labels, method):
    # ISBI sections are 50 nm apart; 3-D mode on a stack of near slices, voxel (8, 4, 4) nm
    p = boundary_map(isbi_labels[:1, :96, :120].repeat(7, axis=0), noise=0.2, seed=3)
    pred = tmp_path / "pred.zarr"
    write_pred(pred, p, voxel=(8, 4, 4))
    opts = dict(METHOD_OPTS[method], mode="3d", min_size=30)
    whole, r = run(tmp_path, p, "whole.zarr", **opts, block_size=p.shape)
    assert r.objects > 5
    for block in [(3, 40, 50), (7, 17, 120), (2, 96, 33)]:
        labels, _ = run(tmp_path, p, f"b{block}.zarr", **opts, block_size=block)
        np.testing.assert_array_equal(labels, whole, err_msg=str(block))


@pytest.mark.parametrize("method", ["ws", "ws-distance"])
def test_wide_provisional_ids_give_the_same_labels(tmp_path, isbi_labels, monkeypatch, method):
    """A probability map's provisional ids, uint32 while they fit and int64 past
    ``blocks.NARROW_IDS`` (forced here), give the same labels."""
    from emtile.segmenter import blocks

    p = boundary_map(isbi_labels[:2, :96, :120], noise=0.2, seed=5)
    opts = dict(METHOD_OPTS[method], mode="3d", block_size=(1, 40, 50))
    narrow, r = run(tmp_path, p, "narrow.zarr", **opts)
    monkeypatch.setattr(blocks, "NARROW_IDS", 2)
    wide, _ = run(tmp_path, p, "wide.zarr", **opts)
    assert r.objects > 5
    np.testing.assert_array_equal(wide, narrow)


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_blocks_in_threads_give_the_same_labels(tmp_path, isbi_labels, monkeypatch, mode):
    """Blocks (and the global step's rows) run in one thread per core here: the labels and the
    report are those of one thread, whatever the order the blocks finish in."""
    import threading

    from emtile import _process
    from emtile.segmenter import blocks as blocks_module

    threads = set()
    fragments = blocks_module.run_fragment_blocks

    def recording(job, ids):
        threads.add(threading.get_ident())
        return fragments(job, ids)

    monkeypatch.setattr(blocks_module, "run_fragment_blocks", recording)
    p = boundary_map(isbi_labels[:4, :150, :170], noise=0.15)
    opts = dict(WS_DISTANCE, min_size=20, block_size=(1, 40, 50) if mode == "2d" else (2, 64, 64),
                mode=mode)
    got = {}
    for cores in (1, 4):
        monkeypatch.setattr(_process, "usable_cores", lambda: cores)
        threads.clear()
        got[cores] = run(tmp_path, p, f"t{cores}.zarr", **opts)
        assert (len(threads) > 1) == (cores > 1)
    np.testing.assert_array_equal(got[4][0], got[1][0])
    assert got[4][1].report == got[1][1].report and got[1][1].objects > 10
    seconds = got[4][1].pass_seconds  # where the time went, per pass
    assert list(seconds) == ["levels", "labels", "fragments", "graph", "write"]
    assert all(t > 0 for t in seconds.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cc", "ws"])
def test_block_invariance_isbi_size(tmp_path, isbi_labels, method):
    p = boundary_map(isbi_labels[:3], noise=0.15)
    whole, _ = run(tmp_path, p, "whole.zarr", method=method, min_size=25, block_size=p.shape)
    for block in [(1, 128, 128), (3, 256, 200), (1, 100, 512)]:
        labels, _ = run(tmp_path, p, f"b{block[1]}.zarr", method=method, min_size=25,
                        block_size=block)
        np.testing.assert_array_equal(labels, whole, err_msg=str(block))


def test_float_probabilities(tmp_path, isbi_labels):
    p8 = boundary_map(isbi_labels[:1, :100, :100])
    p16 = (p8 / np.float32(255)).astype(np.float16)
    a, _ = run(tmp_path, p16, "f16.zarr", block_size=(1, 33, 40))
    b, _ = run(tmp_path, p16, "f16w.zarr")
    np.testing.assert_array_equal(a, b)
    assert a.max() > 5


# --------------------------------------------------------------------------- resume


def _segment_in_subprocess(pred, out, fault, **kw):
    code = ("import sys, json; from emtile.segmenter import segment; "
            "segment(sys.argv[1], sys.argv[2], progress=False, **json.loads(sys.argv[3]))")
    env = dict(os.environ, _EMTILE_FAULTS=fault)
    return subprocess.run([sys.executable, "-c", code, str(pred), str(out), json.dumps(kw)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("crash", ["labels.recorded@3", "fragments.recorded@5",
                                   "fragments.written@4", "graph.recorded@1",
                                   "write.recorded@2"])
def test_resume_after_kill(tmp_path, isbi_labels, monkeypatch, crash):
    """A run killed after N blocks of a pass were recorded (or after the N-th block's data was
    written, before it was recorded) finishes only what is missing, with the same labels."""
    p = boundary_map(isbi_labels[:2, :120, :150])
    pred = write_pred(tmp_path / "pred.zarr", p)
    opts = dict(method="ws", min_size=20, block_size=[1, 40, 50])
    ref = segment(pred, tmp_path / "ref.zarr", progress=False, **opts)
    out = tmp_path / "seg.zarr"
    r = _segment_in_subprocess(pred, out, f"segment.{crash}=kill", **opts)
    assert r.returncode == -9, r.stderr
    assert out.exists() and not is_complete(out)
    # the re-run computes only what is missing
    from emtile.segmenter import blocks as blocks_module
    from emtile.segmenter import driver

    seen = {}

    def counting(name, fn):
        def wrapper(job, ids):
            seen.setdefault(name, []).extend(ids)
            return fn(job, ids)
        return wrapper

    names = ["run_label_blocks", "run_fragment_blocks", "run_graph_rows", "run_write_blocks"]
    for name in names:
        monkeypatch.setattr(blocks_module, name, counting(name, getattr(blocks_module, name)))
    monkeypatch.setattr(driver, "blocks", blocks_module)
    result = segment(pred, out, progress=False, **opts)
    assert is_complete(out)
    np.testing.assert_array_equal(read_labels(out), read_labels(tmp_path / "ref.zarr"))
    assert result.objects == ref.objects
    assert result.report == ref.report  # the global step's signs, also from resumed rows
    assert ref.blocks_resumed == (0, 0, 0) and (any(result.blocks_resumed) or "graph" in crash)
    done_pass, count = crash.split("@")
    done_pass, when = done_pass.split(".")
    expect_skipped = int(count) - (1 if when == "written" else 0)
    order = ["labels", "fragments", "graph", "write"]
    k = order.index(done_pass)
    for j, name in enumerate(names):
        n = 2 if name == "run_graph_rows" else result.blocks  # the global step: per row
        ran = len(seen.get(name, []))
        if j < k:
            assert ran == 0, name
        elif j == k:
            assert ran == n - expect_skipped, name
        else:
            assert ran == n, name
    assert TEMP_GONE(out)


def TEMP_GONE(out):
    return not (out / "emtile_segment").exists()


def test_changed_options_start_over(tmp_path, isbi_labels):
    p = boundary_map(isbi_labels[:1, :80, :90])
    pred = write_pred(tmp_path / "pred.zarr", p)
    out = tmp_path / "seg.zarr"
    r = _segment_in_subprocess(pred, out, "segment.fragments.recorded@2=kill", method="cc",
                               block_size=[1, 30, 30])
    assert r.returncode == -9
    # another threshold: the interrupted store is not resumed but replaced
    result = segment(pred, out, method="cc", block_size=[1, 30, 30], threshold=0.6,
                     progress=False)
    ref = segment(pred, tmp_path / "ref.zarr", method="cc", threshold=0.6, progress=False)
    np.testing.assert_array_equal(read_labels(out), read_labels(tmp_path / "ref.zarr"))
    assert result.objects == ref.objects


# --------------------------------------------------------------------------- the output store


def test_output_is_an_ngff_label_image(tmp_path):
    p = (plus_shape((3, 70, 90)) * 255).astype(np.uint8)
    pred = write_pred(tmp_path / "pred.zarr", p, voxel=(50, 4, 4), translation=[100.0, 8.0, 12.0])
    r = segment(pred, tmp_path / "seg.zarr", progress=False, block_size=(1, 32, 32))
    g = zarr.open_group(str(tmp_path / "seg.zarr"), mode="r")
    attrs = g.attrs.asdict()
    ome = attrs["ome"]
    assert ome["version"] == "0.5" and ome["image-label"]["source"]["image"]
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    transforms = ms["datasets"][0]["coordinateTransformations"]
    assert transforms[0] == {"type": "scale", "scale": [50.0, 4.0, 4.0]}
    assert transforms[1] == {"type": "translation", "translation": [100.0, 8.0, 12.0]}
    meta = attrs["emtile"]
    assert meta["kind"] == "labels" and meta["complete"] and meta["objects"] == r.objects == 6
    assert meta["segment"] == r.settings and meta["segment"]["method"] == "ws"
    assert meta["segment"]["threshold"] == SegmentSettings().threshold
    assert meta["segment"]["grow"] == 32  # a probability map's grow (affinities: 4)
    assert g["0"].dtype == np.uint32 and g["0"].shape == p.shape
    assert "emtile_segment" not in g
    assert emtile.open_volume(tmp_path / "seg.zarr").shape == p.shape


@pytest.mark.parametrize("image_ndim", [3, 2])
def test_label_pyramid_samples_level_0(tmp_path, isbi_labels, image_ndim):
    """``levels=3``: level k is every 2**k-th pixel of level 0 in y and x (NumPy's strided
    sampling), so it holds no id that level 0 does not; each level's chunks are the blocks'
    halved, every level is where the prediction is; level 0 is the one-level run's."""
    p = boundary_map(isbi_labels[:2, :100, :130])[: 2 if image_ndim == 3 else 1]
    p = p if image_ndim == 3 else p[0]
    pred = write_pred(tmp_path / "pred.zarr", p, voxel=(50, 4, 4)[3 - image_ndim:],
                      translation=[100.0, 8.0, 12.0][3 - image_ndim:])
    block = (1, 32, 44)[3 - image_ndim:]
    r = segment(pred, tmp_path / "seg.zarr", levels=3, block_size=block, progress=False)
    one = segment(pred, tmp_path / "one.zarr", progress=False)
    assert r.levels == 3 and "3 levels" in str(r) and r.objects == one.objects > 10
    g = zarr.open_group(str(tmp_path / "seg.zarr"), mode="r")
    level0 = np.asarray(g["0"][...])
    np.testing.assert_array_equal(level0, read_labels(tmp_path / "one.zarr"))
    ids0 = set(np.unique(level0).tolist())
    datasets = g.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]
    for k in range(3):
        arr = g[str(k)]
        level = np.asarray(arr[...])
        np.testing.assert_array_equal(level, level0[..., ::2**k, ::2**k])
        assert set(np.unique(level).tolist()) <= ids0
        assert arr.chunks[-2:] == (32 >> k, 44 >> k) and arr.dtype == np.uint32
        scale, shift = datasets[k]["coordinateTransformations"]
        assert scale["scale"][-2:] == [4.0 * 2**k] * 2
        assert shift == {"type": "translation", "translation": [100.0, 8.0, 12.0][3 - image_ndim:]}
    assert len(np.unique(np.asarray(g["2"][...]))) < len(ids0)  # small cells fall between samples


def test_records_are_written_in_parts_and_read_back_on_resume(tmp_path, isbi_labels,
                                                              monkeypatch):
    """Pass 2's per-block records are written by the driver in parts of many blocks (here 4 a
    part: 18 blocks, 5 parts, so 10 files instead of 2 per block), and a resumed run finds every
    done block's record in them."""
    from emtile.segmenter import blocks as blocks_module
    from emtile.segmenter import driver

    p = boundary_map(isbi_labels[:2, :120, :150])
    pred = write_pred(tmp_path / "pred.zarr", p)
    opts = dict(method="ws", min_size=20, block_size=(1, 40, 50), progress=False)
    ref = segment(pred, tmp_path / "ref.zarr", **opts)

    class Stop(Exception):
        pass

    def stop(job, ids):
        raise Stop

    monkeypatch.setattr(driver, "_FLUSH_S", float("inf"))
    monkeypatch.setattr(driver, "PART_BLOCKS", 4)
    monkeypatch.setattr(blocks_module, "run_write_blocks", stop)
    out = tmp_path / "seg.zarr"
    with pytest.raises(Stop):
        segment(pred, out, **opts)
    records = out / "emtile_segment" / "records"
    parts = sorted(q.name for q in records.iterdir() if q.is_dir() and q.name != "index")
    assert parts == ["p0", "p1", "p2", "p3", "p4"]
    assert sum(1 for q in records.rglob("*") if q.is_file()) == 1 + 2 + 2 * 5  # + group, index
    monkeypatch.undo()
    r = segment(pred, out, **opts)
    assert r.blocks_resumed == (18, 18, 0) and is_complete(out)
    np.testing.assert_array_equal(read_labels(out), read_labels(tmp_path / "ref.zarr"))
    assert r.objects == ref.objects


def test_uint64_when_the_count_needs_it(tmp_path, monkeypatch):
    from emtile.segmenter import driver

    monkeypatch.setattr(driver, "UINT32_IDS", 2)
    labels, r = run(tmp_path, plus_shape((3, 70, 90)), block_size=(1, 32, 32))
    assert r.objects == 6 and labels.dtype == np.uint64 and r.dtype == "uint64"


def test_two_dimensional_image(tmp_path):
    p = two_cells_with_gap()[0]
    labels, r = run(tmp_path, p, block_size=(17, 23), **WS_DISTANCE, merge_threshold=0.5)
    assert labels.shape == p.shape and r.objects == 2


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def pred8(tmp_path):
    return write_pred(tmp_path / "pred.zarr", (plus_shape((2, 40, 50)) * 255).astype(np.uint8))


@pytest.mark.parametrize("kw,match", [
    (dict(threshold=1.5), r"threshold=1.5 must be a number between 0 and 1"),
    (dict(threshold=-0.1), r"threshold=-0.1 must be"),
    (dict(merge_threshold=2), r"merge_threshold=2 must be"),
    (dict(seeds="peaks"), r"seeds='peaks' is not supported: choose components or distance"),
    (dict(merge_quantile=0), r"merge_quantile=0 must be a number in \(0, 1\], or None"),
    (dict(merge_quantile=1.5), r"merge_quantile=1.5 must be a number in \(0, 1\]"),
    (dict(merge_quantile="median"), r"merge_quantile='median' must be a number"),
    (dict(min_size=-3), r"min_size=-3 must be a whole number"),
    (dict(method="mc"), r"method='mc' is not supported: choose cc or ws"),
    (dict(mode="4d"), r"mode='4d' is not supported"),
    (dict(block_size=(0, 10, 10)), r"block_size=0,10,10 must give one positive whole number per axis"),
    (dict(block_size=(10, 10)), r"block_size=10,10 must give one positive whole number per axis \(Z,Y,X\)"),
    (dict(grow=0), r"grow=0 must be a whole number of pixels from 1 to"),
    (dict(levels=0), r"levels=0 must be a positive whole number"),
    (dict(levels=2, block_size=(1, 15, 16)), r"levels=2 needs blocks whose size in y and x is "
                                             r"divisible by 2 .* blocks are 15 px in y: use at "
                                             r"most 1 levels"),
    (dict(levels=7), r"levels=7 would halve the 40-px y axis below one pixel: use at most 6"),
])
def test_bad_options(tmp_path, pred8, kw, match):
    out = tmp_path / "seg.zarr"
    with pytest.raises(EmtileError, match=match):
        segment(pred8, out, progress=False, **kw)
    assert not out.exists()


def test_not_a_probability_map(tmp_path, isbi_labels):
    raw = tmp_path / "raw.zarr"
    write_pred(raw, np.zeros((2, 8, 8), np.uint8), kind="image")
    with pytest.raises(EmtileError, match=r"is an emtile image store, not a probability map"):
        segment(raw, tmp_path / "a.zarr", progress=False)
    lab = tmp_path / "lab.zarr"
    write_pred(lab, np.zeros((2, 8, 8), np.uint8), kind="labels")
    with pytest.raises(EmtileError, match=r"is an emtile labels store, not a probability map"):
        segment(lab, tmp_path / "b.zarr", progress=False)
    tif = tmp_path / "raw.tif"
    import tifffile

    tifffile.imwrite(tif, np.zeros((2, 8, 8), np.int16))
    with pytest.raises(EmtileError, match=r"has dtype int16: a probability map is uint8"):
        segment(tif, tmp_path / "c.zarr", progress=False)
    floats = tmp_path / "floats.tif"
    tifffile.imwrite(floats, np.full((1, 8, 8), 3.0, np.float32))
    with pytest.raises(EmtileError, match=r"holds 3.0 .*values in \[0, 1\]"):
        segment(floats, tmp_path / "d.zarr", progress=False)
    assert not is_complete(tmp_path / "d.zarr")
    four = tmp_path / "four.zarr"
    write_pred(four, np.zeros((2, 2, 8, 8), np.uint8))
    with pytest.raises(EmtileError, match=r"has shape \(2, 2, 8, 8\): expected one probability map"):
        segment(four, tmp_path / "e.zarr", progress=False)
    half = tmp_path / "half.zarr"
    write_pred(half, np.zeros((2, 8, 8), np.uint8), complete=False)
    with pytest.raises(EmtileError, match=r"is incomplete"):
        segment(half, tmp_path / "f.zarr", progress=False)
    for name in "abcef":
        assert not (tmp_path / f"{name}.zarr").exists()


def test_3d_mode_on_one_image(tmp_path):
    pred = write_pred(tmp_path / "pred.zarr", np.zeros((8, 8), np.float32))
    with pytest.raises(EmtileError, match=r"mode='3d' needs a \(Z, Y, X\) stack, .* one 2-D image"):
        segment(pred, tmp_path / "seg.zarr", mode="3d", progress=False)


def test_existing_output_and_output_inside_input(tmp_path, pred8):
    out = tmp_path / "seg.zarr"
    segment(pred8, out, progress=False)
    with pytest.raises(EmtileError, match=r"already exists; pass overwrite=True"):
        segment(pred8, out, progress=False)
    assert is_complete(out)
    segment(pred8, out, progress=False, overwrite=True)
    with pytest.raises(EmtileError, match=r"lies inside the input"):
        segment(pred8, tmp_path / "pred.zarr" / "seg", progress=False)


# --------------------------------------------------------------------------- the command


def test_cli(tmp_path, pred8):
    runner = CliRunner()
    assert runner.invoke(main, ["segment", "--help"]).exit_code == 0
    out = tmp_path / "seg.zarr"
    r = runner.invoke(main, ["segment", pred8, str(out), "--method", "cc", "--block-size",
                             "1,16,16", "--min-size", "5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "objects" in r.output and is_complete(out)
    for args, match in [
        (["--threshold", "1.5"], "--threshold 1.5 must be a number between 0 and 1"),
        (["--block-size", "1,a,16"], "1,a,16 is not a comma-separated list of integers"),
        (["--block-size", "1,16"], "--block-size 1,16 must give one positive whole number"),
        (["--merge-quantile", "x"], "'x' must be a number in (0, 1] or 'mean'"),
        (["--merge-quantile", "1.5"], "--merge-quantile 1.5 must be a number in (0, 1]"),
        (["--mode", "3d"], None),
        (["--merge-quantile", "mean", "--seeds", "distance"], None),
        (["--merge-quantile", "0.25", "--merge-threshold", "0.5"], None),
    ]:
        r = runner.invoke(main, ["segment", pred8, str(tmp_path / f"x{len(args)}{args[1]}.zarr"),
                                 "--no-progress", *args])
        if match is None:
            assert r.exit_code == 0, r.output
            settings = zarr.open_group(str(tmp_path / f"x{len(args)}{args[1]}.zarr"),
                                       mode="r").attrs["emtile"]["segment"]
            if "--seeds" in args:
                assert settings["seeds"] == "distance" and settings["merge_quantile"] is None
            if "0.25" in args:
                assert settings["merge_quantile"] == 0.25 and settings["merge_threshold"] == 0.5
            continue
        assert match in r.output, r.output
        if r.exit_code == 2:  # click's usage error for a value its option type refuses
            assert "Invalid value for" in r.output and "Traceback" not in r.output
        else:  # the library's: one line
            assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(main, ["segment", pred8, str(out), "--no-progress"])
    assert r.exit_code == 1 and "already exists" in r.output


def test_lazy_export():
    assert emtile.segment is segment


def test_info_shows_what_made_a_segmentation(tmp_path):
    from emtile.describe import format_info, info

    _, r = run(tmp_path, plus_shape((3, 70, 90)), method="cc", block_size=(1, 32, 32))
    d = info(r.output)
    assert d["segment"] == r.settings and d["objects"] == r.objects
    text = format_info(d)
    assert f"into {r.objects:,} objects" in text
    assert "settings      method cc, mode 2d, threshold" in text and "block" not in text


def test_2d_mode_writes_one_shard_per_block_per_level(tmp_path):
    """In 2d mode the labels are chunked slice by slice; each block's slices are one shard per
    level, written whole by that block: as many files as blocks times levels, the same labels
    as the whole volume segmented in one block (the store is still a valid label image)."""
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter(rng.random((6, 200, 200)), (0, 3, 3))
    p = ((p - p.min()) / (p.max() - p.min())).astype(np.float32)
    pred = tmp_path / "p.zarr"
    zarr.create_array(str(pred), data=p, chunks=(1, 200, 200))
    segment(pred, tmp_path / "s.zarr", block_size=(3, 128, 128), levels=2, progress=False)
    segment(pred, tmp_path / "one.zarr", block_size=(6, 200, 200), levels=2, progress=False)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g["0"].chunks == (1, 128, 128) and g["0"].shards == (3, 128, 128)
    assert g["1"].chunks == (1, 64, 64) and g["1"].shards == (3, 64, 64)
    files = [f for k in ("0", "1") for f in (tmp_path / "s.zarr" / k / "c").rglob("*")
             if f.is_file()]
    assert len(files) == 8 * 2  # 2 x 2 x 2 blocks, 2 levels
    one = zarr.open_group(str(tmp_path / "one.zarr"), mode="r")
    for k in ("0", "1"):
        np.testing.assert_array_equal(g[k][...], one[k][...])
