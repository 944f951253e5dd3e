"""The faster segment kernels equal the ones they replaced, bit for bit.

The references are the kernels as they were before the padded flood and the per-thread scratch
(commit ce441ef): bounds checked by coordinates, scratch allocated per call. They are compiled
here (no cache) and compared on random inputs: seeds touching every face, walls, plateaus, 2-D
and 3-D neighbourhoods, one-axis ones, rounds that stop early and rounds that run out (so that
``keep_supported`` drops pixels).
"""

import threading

import numpy as np
import pytest
from numba import njit

from emtile.segmenter import flood as fl
from emtile.segmenter import kernels

UNSET = np.int64(0x7FFFFFFFFFFFFFFF)
SHIFT = 44


@njit
def old_init_keys(seeds, origin, volume_shape):
    nz, ny, nx = seeds.shape
    key = np.empty(seeds.shape, np.int64)
    Y, X = volume_shape[1], volume_shape[2]
    for z in range(nz):
        for y in range(ny):
            row = ((z + origin[0]) * Y + y + origin[1]) * X + origin[2]
            for x in range(nx):
                key[z, y, x] = row + x if seeds[z, y, x] else UNSET
    return key


@njit
def old_flood_rounds(key, domain, alt, rounds, shape, axes):
    n = key.size
    nz, ny, nx = shape[0], shape[1], shape[2]
    strides = (ny * nx, nx, 1)
    sizes = (nz, ny, nx)
    mark = np.zeros(n, np.int32)
    frontier = np.empty(n, np.int64)
    cand = np.empty(n, np.int64)
    value = np.empty(n, np.int64)
    m = 0
    for p in range(n):
        if key[p] != UNSET:
            frontier[m] = p
            m += 1
    for r in range(1, rounds + 1):
        k = 0
        for f in range(m):
            p = frontier[f]
            coord = (p // strides[0], (p // strides[1]) % ny, p % nx)
            for ax in range(3):
                if not axes[ax]:
                    continue
                for d in (-1, 1):
                    c = coord[ax] + d
                    if c < 0 or c >= sizes[ax]:
                        continue
                    q = p + d * strides[ax]
                    if domain[q] and mark[q] != r:
                        mark[q] = r
                        cand[k] = q
                        k += 1
        for j in range(k):
            q = cand[j]
            best = key[q]
            step = (np.int64(alt[q]) + 1) << SHIFT
            coord = (q // strides[0], (q // strides[1]) % ny, q % nx)
            for ax in range(3):
                if not axes[ax]:
                    continue
                for d in (-1, 1):
                    c = coord[ax] + d
                    if c < 0 or c >= sizes[ax]:
                        continue
                    nb = key[q + d * strides[ax]]
                    if nb == UNSET:
                        continue
                    v = nb + step
                    if v < best:
                        best = v
            value[j] = best
        m = 0
        for j in range(k):
            q = cand[j]
            if value[j] < key[q]:
                key[q] = value[j]
                frontier[m] = q
                m += 1
        if m == 0:
            return r - 1
    return rounds


@njit
def old_keep_supported(key, domain, alt, rounds, shape, axes):
    n = key.size
    ny, nx = shape[1], shape[2]
    strides = (ny * nx, nx, 1)
    sizes = (shape[0], ny, nx)
    ok = np.zeros(n, np.bool_)
    frontier = np.empty(n, np.int64)
    nxt = np.empty(n, np.int64)
    m = 0
    for p in range(n):
        if key[p] != UNSET and not domain[p]:
            ok[p] = True
            frontier[m] = p
            m += 1
    for _ in range(rounds):
        k = 0
        for f in range(m):
            p = frontier[f]
            coord = (p // strides[0], (p // strides[1]) % ny, p % nx)
            for ax in range(3):
                if not axes[ax]:
                    continue
                for d in (-1, 1):
                    c = coord[ax] + d
                    if c < 0 or c >= sizes[ax]:
                        continue
                    q = p + d * strides[ax]
                    if ok[q] or not domain[q] or key[q] == UNSET:
                        continue
                    if key[q] == key[p] + ((np.int64(alt[q]) + 1) << SHIFT):
                        ok[q] = True
                        nxt[k] = q
                        k += 1
        if k == 0:
            break
        frontier, nxt = nxt, frontier
        m = k
    dropped = 0
    for p in range(n):
        if domain[p] and key[p] != UNSET and not ok[p]:
            key[p] = UNSET
            dropped += 1
    return dropped


def old_flood(seeds, domain, alt, rounds, axes, origin, volume_shape):
    """``(key, rounds that changed something, dropped)`` as the old kernels computed them."""
    key = old_init_keys(seeds, np.array(origin, np.int64), np.array(volume_shape, np.int64))
    if not seeds.any() or not domain.any():
        return key, 0, 0
    flat = key.reshape(-1)
    args = (np.ascontiguousarray(domain).reshape(-1), np.ascontiguousarray(alt).reshape(-1),
            rounds, np.array(seeds.shape, np.int64), np.array([ax in axes for ax in range(3)]))
    done = old_flood_rounds(flat, *args)
    dropped = old_keep_supported(flat, *args) if done == rounds else 0
    return key, done, dropped


def random_case(rng, shape, seed_rate=0.05, wall_rate=0.1):
    alt = rng.integers(0, 256, shape).astype(np.uint8)
    alt[rng.random(shape) < 0.3] = 255  # plateaus: ties go to the lower source
    alt[rng.random(shape) < 0.1] = 0
    seeds = rng.random(shape) < seed_rate
    for ax in range(3):  # seeds on every face
        for end in (0, -1):
            face = [slice(None)] * 3
            face[ax] = end
            seeds[tuple(face)] |= rng.random(seeds[tuple(face)].shape) < 0.3
    domain = ~seeds & (rng.random(shape) >= wall_rate)
    return seeds, domain, alt


AXES = [(1, 2), (0, 1, 2), (2,), (0,), (0, 2)]


@pytest.mark.parametrize("axes", AXES)
def test_padded_flood_equals_the_old_kernels(axes):
    rng = np.random.default_rng(7)
    seen = {"early": 0, "dropped": 0}
    for trial in range(40):
        shape = tuple(int(s) for s in rng.integers(1, 14, 3))
        volume_shape = tuple(s + int(e) for s, e in zip(shape, rng.integers(0, 5, 3)))
        origin = tuple(int(v - s) for v, s in zip(volume_shape, shape))
        seeds, domain, alt = random_case(rng, shape, seed_rate=rng.choice([0.0, 0.02, 0.1]),
                                         wall_rate=rng.choice([0.0, 0.2]))
        rounds = int(rng.choice([0, 1, 2, 3, 5, 9, 40]))
        key, done, dropped = fl.run_flood(seeds, domain, alt, rounds, axes, origin,
                                          volume_shape)
        ref, ref_done, ref_dropped = old_flood(seeds, domain, alt, rounds, axes, origin,
                                               volume_shape)
        assert key.shape == shape
        np.testing.assert_array_equal(key, ref)
        assert (done, dropped) == (ref_done, ref_dropped)
        np.testing.assert_array_equal(
            kernels.flood(seeds, domain, alt, rounds=rounds, axes=axes, origin=origin,
                          volume_shape=volume_shape), ref)
        seen["early"] += done < rounds
        seen["dropped"] += dropped > 0
    assert seen["early"] and (seen["dropped"] or axes in [(2,), (0,)])


def test_keep_supported_drops_as_before():
    """Rounds that run out on a noisy relief: the last round leaves unsupported keys."""
    rng = np.random.default_rng(3)
    total = 0
    for axes in [(1, 2), (0, 1, 2)]:
        for trial in range(20):
            shape = (3, 17, 19)
            seeds, domain, alt = random_case(rng, shape, seed_rate=0.03, wall_rate=0.0)
            for rounds in (2, 3, 4, 6):
                key, done, dropped = fl.run_flood(seeds, domain, alt, rounds, axes, (0, 0, 0),
                                                  shape)
                ref, ref_done, ref_dropped = old_flood(seeds, domain, alt, rounds, axes,
                                                       (0, 0, 0), shape)
                np.testing.assert_array_equal(key, ref)
                assert (done, dropped) == (ref_done, ref_dropped)
                total += dropped
    assert total > 0


def test_scratch_reused_across_sizes():
    """Cached scratch (grown, then reused by smaller and larger blocks, left with the values of
    the previous call) changes nothing."""
    rng = np.random.default_rng(5)
    for shape in [(2, 30, 30), (1, 5, 7), (4, 40, 9), (2, 30, 30), (1, 3, 3)] * 4:
        seeds, domain, alt = random_case(rng, shape)
        rounds = int(rng.integers(1, 20))
        got = fl.run_flood(seeds, domain, alt, rounds, (1, 2), (0, 0, 0), shape)
        ref = old_flood(seeds, domain, alt, rounds, (1, 2), (0, 0, 0), shape)
        np.testing.assert_array_equal(got[0], ref[0])
        assert got[1:] == ref[1:]


def test_threads_keep_their_own_scratch():
    rng = np.random.default_rng(9)
    cases = [random_case(rng, (2, 60, 50)) for _ in range(6)]
    refs = [old_flood(s, d, a, 12, (1, 2), (0, 0, 0), s.shape)[0] for s, d, a in cases]
    errors = []

    def work(i):
        for _ in range(5):
            s, d, a = cases[i]
            if not np.array_equal(fl.run_flood(s, d, a, 12, (1, 2), (0, 0, 0), s.shape)[0],
                                  refs[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_float_divmod_is_exact():
    from emtile.segmenter.pixels import _divmod

    rng = np.random.default_rng(11)
    divisors = [1, 2, 3, 7, 512, 1000, 4096, 4097, 1 << 20, 12345 * 6789, (1 << 22) * 3 + 1]
    for d in divisors:
        g = np.concatenate([rng.integers(0, 1 << 44, 2000), rng.integers(0, 1 << 50, 2000),
                            np.arange(0, 50) * d, np.arange(1, 50) * d - 1,
                            (rng.integers(0, (1 << 44) // d, 1000) * d),
                            (rng.integers(1, (1 << 44) // d, 1000) * d - 1)])
        for v in g:
            assert _divmod(np.int64(v), np.int64(d), 1.0 / d) == divmod(int(v), d), (v, d)


def test_labels_at_sources_equal_a_numpy_reference():
    from emtile.segmenter.pixels import labels_at_sources

    rng = np.random.default_rng(12)
    for volume_shape in [(5, 7, 9), (3, 4096, 4097), (40, 30000, 30001)]:
        shape = (2, 5, 6)
        origin = tuple(int(rng.integers(0, v - s + 1)) for v, s in zip(volume_shape, shape))
        labels = rng.integers(-5, 1000, shape)
        fill = rng.integers(-3, 3, shape)
        local = np.stack([rng.integers(0, s, shape) for s in shape])
        src = np.ravel_multi_index(tuple(local[i] + origin[i] for i in range(3)), volume_shape)
        cost = rng.integers(0, 1 << 16, shape).astype(np.int64) << SHIFT
        key = np.where(rng.random(shape) < 0.2, UNSET, cost + src)
        want = np.where(key == UNSET, fill, labels[tuple(local)])
        got = np.empty(shape, np.int64)
        labels_at_sources(key, labels, fill, np.array(origin, np.int64),
                          np.array(volume_shape, np.int64), got)
        np.testing.assert_array_equal(got, want)


def test_add_offsets_equals_the_masked_numpy_update():
    from emtile.segmenter.pixels import add_offsets

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (3, 20, 30)).astype(np.int64)  # many 0s: left as they are
    boxes = np.array([[0, 0, 0, 3, 10, 30], [0, 10, 0, 2, 20, 15], [2, 10, 15, 3, 20, 30]],
                     np.int64)
    offsets = np.array([100, 1000, 10**12], np.int64)
    want = labels.copy()
    for (z0, y0, x0, z1, y1, x1), off in zip(boxes, offsets):
        part = want[z0:z1, y0:y1, x0:x1]
        part[part > 0] += off
    got = labels.copy()
    add_offsets(got, boxes, offsets)
    np.testing.assert_array_equal(got, want)
    assert (got[2, 10:, :15] == labels[2, 10:, :15]).all()  # in no box: untouched
    add_offsets(got, boxes[:0], offsets[:0])  # no boxes: nothing
    np.testing.assert_array_equal(got, want)
