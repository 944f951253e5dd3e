"""The Numba stitcher against plain NumPy, on awkward shapes with clipping at every edge."""

import numpy as np
import pytest

from emtile import EmtileError
from emtile.stitch import accumulate, normalize, weight_window

BLENDS = ["none", "linear", "cosine", "gaussian"]


def ref_accumulate(acc, wsum, tile, weight, origin):
    """The obvious NumPy code, clipping by hand."""
    buf, src = [], []
    for o, size, t in zip(origin, wsum.shape, weight.shape):
        lo, hi = max(o, 0), min(o + t, size)
        if hi <= lo:
            return
        buf.append(slice(lo, hi))
        src.append(slice(lo - o, hi - o))
    buf, src = tuple(buf), tuple(src)
    acc[(slice(None),) + buf] += weight[src] * tile[(slice(None),) + src].astype(np.float32)
    wsum[buf] += weight[src]


def ref_normalize(acc, wsum, dtype):
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(wsum > 0, acc / wsum, np.float32(0)).astype(np.float32)
    if dtype == np.uint8:
        p = np.nan_to_num(p, nan=0.0)
        return np.rint(np.clip(p, 0, 1) * np.float32(255)).astype(np.uint8)
    return p.astype(dtype)


def random_origins(rng, buf_shape, tile_shape, n):
    """Origins from fully outside to overhanging every edge, plus the four/eight corners."""
    out = [tuple(int(rng.integers(-t - 1, s + 2)) for s, t in zip(buf_shape, tile_shape))
           for _ in range(n)]
    corners = np.array(np.meshgrid(*[(-(t // 2), s - t // 2) for s, t in zip(buf_shape, tile_shape)],
                                   indexing="ij")).reshape(len(buf_shape), -1).T
    return out + [tuple(int(v) for v in c) for c in corners]


@pytest.mark.parametrize("buf_shape,tile_shape,channels", [
    ((37, 53), (11, 17), 1),
    ((37, 53), (40, 60), 3),  # tile larger than the buffer: clipped on both sides at once
    ((1, 29), (5, 7), 2),
    ((7, 19, 23), (4, 9, 5), 1),
    ((7, 19, 23), (3, 8, 30), 2),
    ((41,), (9,), 2),
])
@pytest.mark.parametrize("tile_dtype", [np.float32, np.float16])
def test_accumulate_matches_numpy(buf_shape, tile_shape, channels, tile_dtype, rng):
    acc = np.zeros((channels, *buf_shape), np.float32)
    wsum = np.zeros(buf_shape, np.float32)
    ref_acc, ref_wsum = acc.copy(), wsum.copy()
    for origin in random_origins(rng, buf_shape, tile_shape, 25):
        tile = rng.standard_normal((channels, *tile_shape)).astype(tile_dtype)
        weight = rng.random(tile_shape, dtype=np.float32) + np.float32(0.1)
        accumulate(acc, wsum, tile, weight, origin)
        ref_accumulate(ref_acc, ref_wsum, tile, weight, origin)
    np.testing.assert_array_equal(acc, ref_acc)
    np.testing.assert_array_equal(wsum, ref_wsum)
    assert wsum.max() > 0  # something landed


def test_accumulate_into_views_and_strided_tiles(rng):
    """Buffers that are views of larger arrays are written in place; tiles may be strided."""
    big_acc = np.zeros((3, 30, 40), np.float32)
    big_wsum = np.zeros((30, 40), np.float32)
    acc, wsum = big_acc[1:, 5:25, ::2], big_wsum[5:25, ::2]  # non-contiguous views
    ref_acc, ref_wsum = np.zeros(acc.shape, np.float32), np.zeros(wsum.shape, np.float32)
    tile = rng.random((4, 12, 16), dtype=np.float32)[::2, :, ::2]  # (2, 12, 8), strided
    weight = np.ascontiguousarray(rng.random((12, 16), dtype=np.float32)[:, ::2])
    for origin in [(-3, -2), (4, 5), (15, 16)]:
        accumulate(acc, wsum, tile, weight, origin)
        ref_accumulate(ref_acc, ref_wsum, tile, weight, origin)
    np.testing.assert_array_equal(acc, ref_acc)
    np.testing.assert_array_equal(wsum, ref_wsum)
    assert big_acc[0].max() == 0 and big_acc[:, :, 1::2].max() == 0  # nothing outside the views


def test_tile_entirely_outside_is_a_no_op():
    acc = np.zeros((1, 4, 4), np.float32)
    wsum = np.zeros((4, 4), np.float32)
    tile, weight = np.ones((1, 2, 2), np.float32), np.ones((2, 2), np.float32)
    for origin in [(-2, 0), (4, 0), (0, -5), (1, 4)]:
        accumulate(acc, wsum, tile, weight, origin)
    assert not acc.any() and not wsum.any()


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("shape,tile,stride", [
    ((61, 47), (16, 12), (11, 9)),
    ((13, 29, 22), (6, 10, 8), (4, 7, 5)),
])
def test_overlapping_tiles_of_one_image_reconstruct_it(blend, shape, tile, stride, rng):
    """Crops of one image, accumulated with any weights and normalised, give the image back."""
    channels = 2
    image = rng.random((channels, *shape), dtype=np.float32)
    overlap = tuple(t - s for t, s in zip(tile, stride))
    weight = weight_window(tile, blend=blend, overlap=overlap)
    acc = np.zeros(image.shape, np.float32)
    wsum = np.zeros(shape, np.float32)
    starts = [range(-t // 3, n, s) for n, t, s in zip(shape, tile, stride)]
    for origin in np.array(np.meshgrid(*starts, indexing="ij")).reshape(len(shape), -1).T:
        padded = np.zeros((channels, *tile), np.float32)
        src = tuple(slice(max(o, 0), o + t) for o, t in zip(origin, tile))
        dst = tuple(slice(max(-o, 0), max(-o, 0) + min(o + t, n) - max(o, 0))
                    for o, t, n in zip(origin, tile, shape))
        padded[(slice(None),) + dst] = image[(slice(None),) + src]
        accumulate(acc, wsum, padded, weight, tuple(int(o) for o in origin))
    assert wsum.min() > 0
    np.testing.assert_allclose(normalize(acc, wsum), image, rtol=2e-6, atol=0)


@pytest.mark.parametrize("blend", ["linear", "cosine"])
def test_ramps_are_a_partition_of_unity(blend):
    """Two tiles that overlap by `overlap` pixels have weights summing to 1 in the overlap."""
    n, overlap = 20, 6
    w = weight_window((n,), blend=blend, overlap=overlap).astype(np.float64)
    total = np.zeros(2 * n - overlap)
    total[:n] += w
    total[n - overlap:] += w
    np.testing.assert_allclose(total[overlap:-overlap], 1.0, rtol=1e-6)


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("shape,overlap", [((17,), 5), ((10, 13), (3, 4)), ((6, 9, 8), 2),
                                           ((388, 388), 32), ((1, 5), 0)])
def test_weight_window_properties(blend, shape, overlap):
    w = weight_window(shape, blend=blend, overlap=overlap)
    assert w.shape == shape and w.dtype == np.float32
    assert w.min() > 0
    assert w.max() == 1
    for axis in range(len(shape)):
        np.testing.assert_array_equal(w, np.flip(w, axis))
    if blend == "none":
        assert (w == 1).all()


def test_weight_window_profiles_by_hand():
    np.testing.assert_allclose(weight_window((5,), blend="linear", overlap=2), [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(weight_window((5,), blend="cosine", overlap=1), [0.5, 1, 1, 1, 0.5])
    np.testing.assert_allclose(weight_window((2, 3), blend="linear", overlap=(0, 1)),
                               [[0.5, 1, 0.5], [0.5, 1, 0.5]])
    g = weight_window((64,), blend="gaussian")  # sigma = 8, centre between pixels 31 and 32
    np.testing.assert_allclose(g[40] / g[31], np.exp(-0.5 * ((8.5 ** 2 - 0.5 ** 2) / 64)), rtol=1e-6)
    np.testing.assert_array_equal(weight_window((3, 4), blend="gaussian", overlap=2),
                                  weight_window((3, 4), blend="gaussian"))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
@pytest.mark.parametrize("shape", [(2, 23, 31), (1, 3, 7, 9), (3, 50)])
def test_normalize_matches_numpy(dtype, shape, rng):
    acc = (rng.standard_normal(shape) * 2).astype(np.float32)  # values outside [0, 1] too
    wsum = rng.integers(0, 4, shape[1:]).astype(np.float32)  # some pixels have no weight
    got = normalize(acc, wsum, dtype=dtype)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_array_equal(got, ref_normalize(acc, wsum, dtype))
    assert (got[:, wsum == 0] == 0).all()


def test_normalize_float16_rounding_and_specials():
    values = np.array([0, -0.0, 1 / 3, 65504, 65519.99, 65520, 1e6, -1e6, 6.1e-5, 5.96e-8, 2.98e-8,
                       2.99e-8, 1e-10, np.inf, -np.inf, np.nan], np.float32)
    random_bits = np.random.default_rng(1).integers(0, 2**32, 200_000, dtype=np.uint64)
    values = np.concatenate([values, random_bits.astype(np.uint32).view(np.float32)])
    got = normalize(values[None], np.ones(values.shape, np.float32), dtype=np.float16)[0]
    with np.errstate(over="ignore", invalid="ignore"):
        want = values.astype(np.float16)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


def test_normalize_uint8_by_hand():
    acc = np.array([[1.0, 3.0, 0.0, -1.0, 9.0, np.nan, 0.5]], np.float32)
    wsum = np.array([2.0, 3.0, 0.0, 1.0, 1.0, 1.0, 0.0], np.float32)
    np.testing.assert_array_equal(normalize(acc, wsum, dtype=np.uint8), [[128, 255, 0, 0, 255, 0, 0]])


def test_normalize_writes_into_out(rng):
    acc = rng.random((2, 5, 6), dtype=np.float32)
    wsum = np.full((5, 6), 2, np.float32)
    big = np.full((3, 5, 12), 7, np.uint8)
    out = big[1:, :, ::2]  # a strided view
    assert normalize(acc, wsum, out=out) is out
    np.testing.assert_array_equal(out, ref_normalize(acc, wsum, np.uint8))
    assert (big[0] == 7).all() and (big[:, :, 1::2] == 7).all()
    out16 = np.empty((2, 5, 6), np.float16)
    normalize(acc, wsum, out=out16, dtype=np.float16)
    np.testing.assert_array_equal(out16, (acc / 2).astype(np.float16))


# ------------------------------------------------------------------------------ errors


def _buffers(channels=1, shape=(8, 9)):
    return np.zeros((channels, *shape), np.float32), np.zeros(shape, np.float32)


def test_accumulate_errors():
    acc, wsum = _buffers()
    tile, weight = np.ones((1, 3, 3), np.float32), np.ones((3, 3), np.float32)
    with pytest.raises(EmtileError, match="acc has dtype float64; expected float32"):
        accumulate(acc.astype(np.float64), wsum, tile, weight, (0, 0))
    with pytest.raises(EmtileError, match=r"acc has 5 dimensions .* expected 2 or 3 or 4"):
        accumulate(np.zeros((1, 1, 1, 1, 1), np.float32), wsum, tile, weight, (0, 0))
    with pytest.raises(EmtileError, match="acc must be a NumPy array, got list"):
        accumulate([[0.0]], wsum, tile, weight, (0, 0))
    readonly = acc.copy()
    readonly.flags.writeable = False
    with pytest.raises(EmtileError, match="acc is read-only"):
        accumulate(readonly, wsum, tile, weight, (0, 0))
    with pytest.raises(EmtileError, match=r"wsum has shape \(8, 8\); expected acc's spatial shape \(8, 9\)"):
        accumulate(acc, wsum[:, :8], tile, weight, (0, 0))
    with pytest.raises(EmtileError, match="wsum has dtype float16"):
        accumulate(acc, wsum.astype(np.float16), tile, weight, (0, 0))
    with pytest.raises(EmtileError, match="tile has dtype int64; expected float32 or float16"):
        accumulate(acc, wsum, tile.astype(np.int64), weight, (0, 0))
    with pytest.raises(EmtileError, match=r"tile has 2 dimensions \(shape \(3, 3\)\); expected 3"):
        accumulate(acc, wsum, tile[0], weight, (0, 0))
    with pytest.raises(EmtileError, match="tile has 2 channels .* acc has 1"):
        accumulate(acc, wsum, np.ones((2, 3, 3), np.float32), weight, (0, 0))
    with pytest.raises(EmtileError, match=r"weight has shape \(3, 4\); expected the tile's spatial shape \(3, 3\)"):
        accumulate(acc, wsum, tile, np.ones((3, 4), np.float32), (0, 0))
    with pytest.raises(EmtileError, match="weight has dtype float64"):
        accumulate(acc, wsum, tile, weight.astype(np.float64), (0, 0))
    with pytest.raises(EmtileError, match=r"origin=\(0, 0, 0\) has 3 values; expected 2"):
        accumulate(acc, wsum, tile, weight, (0, 0, 0))
    with pytest.raises(EmtileError, match=r"origin=\(0.5, 0\) is not a tuple of integers"):
        accumulate(acc, wsum, tile, weight, (0.5, 0))
    with pytest.raises(EmtileError, match="origin=3 is not a tuple of integers"):
        accumulate(acc, wsum, tile, weight, 3)


def test_normalize_errors():
    acc, wsum = _buffers(2)
    with pytest.raises(EmtileError, match="dtype=int16 is not supported: choose uint8, float16 or float32"):
        normalize(acc, wsum, dtype=np.int16)
    with pytest.raises(EmtileError, match="out has dtype int32"):
        normalize(acc, wsum, out=np.zeros(acc.shape, np.int32))
    with pytest.raises(EmtileError, match=r"out has shape \(1, 8, 9\); expected acc's shape \(2, 8, 9\)"):
        normalize(acc, wsum, out=np.zeros((1, 8, 9), np.float32))
    with pytest.raises(EmtileError, match="dtype=uint8 differs from out's dtype float32"):
        normalize(acc, wsum, out=np.zeros(acc.shape, np.float32), dtype=np.uint8)
    with pytest.raises(EmtileError, match=r"wsum has shape \(9, 8\)"):
        normalize(acc, wsum.T, dtype=np.float32)
    with pytest.raises(EmtileError, match="acc has dtype float16"):
        normalize(acc.astype(np.float16), wsum)


def test_weight_window_errors():
    with pytest.raises(EmtileError, match="blend='box' is not supported: choose one of none, linear"):
        weight_window((4, 4), blend="box")
    with pytest.raises(EmtileError, match=r"shape=\(4, 0\) is not a tile shape"):
        weight_window((4, 0))
    with pytest.raises(EmtileError, match=r"shape=\(\) is not a tile shape"):
        weight_window(())
    with pytest.raises(EmtileError, match="shape=4 is not a tuple of integers"):
        weight_window(4)
    with pytest.raises(EmtileError, match=r"overlap=\(1, 2, 3\) has 3 values for a 2-D shape"):
        weight_window((8, 8), blend="linear", overlap=(1, 2, 3))
    with pytest.raises(EmtileError, match=r"overlap=4 does not fit a cosine window of size 8: "
                                          r"expected 0 <= overlap <= 3"):
        weight_window((8, 8), blend="cosine", overlap=4)
    with pytest.raises(EmtileError, match="overlap=-1 is negative: expected 0 or more"):
        weight_window((8, 8), blend="gaussian", overlap=-1)
    with pytest.raises(EmtileError, match="overlap=True is not a tuple of integers"):
        weight_window((8, 8), blend="linear", overlap=True)


@pytest.mark.parametrize("channels", [1, 3])
def test_place_owned_gives_the_bytes_of_accumulate_and_normalize(channels):
    """Owned tiles (weight 1 on their first ``stride`` pixels, 0 on the rest, the last tile of a
    row owning all of it) quantised straight into uint8 give what accumulate + normalize give,
    whatever order the tiles come in; NaN under a zero weight poisons the pixel (0 * NaN) and
    NaN under the owner becomes 0, as before."""
    from emtile.stitch import finish_owned, place_owned

    rng = np.random.default_rng(3)
    block, tile, stride = (23, 31), (9, 11), (7, 8)
    starts = [range(-3, block[ax] + 2, stride[ax]) for ax in range(2)]  # as geometry's Grid
    tiles = []
    for iy, y in enumerate(starts[0]):
        for ix, x in enumerate(starts[1]):
            last = (iy == len(starts[0]) - 1, ix == len(starts[1]) - 1)
            t = rng.random((channels,) + tile, dtype=np.float32) * 1.2 - 0.1  # some out of [0, 1]
            t[:, rng.integers(tile[0]), rng.integers(tile[1])] = np.nan
            t[:, -1, -1] = np.nan  # under weight 0 unless last
            owned = tuple(n if is_last else s for n, s, is_last in zip(tile, stride, last))
            tiles.append(((y, x), owned, t))
    acc = np.zeros((channels,) + block, np.float32)
    wsum = np.zeros(block, np.float32)
    out = np.zeros((channels,) + block, np.uint8)
    nan = np.zeros_like(out)
    for k in rng.permutation(len(tiles)):
        origin, owned, t = tiles[k]
        w = np.zeros(tile, np.float32)
        w[:owned[0], :owned[1]] = 1
        accumulate(acc, wsum, t, w, origin)
    for k in rng.permutation(len(tiles)):
        origin, owned, t = tiles[k]
        place_owned(out, nan, t, origin, owned)
    expected = normalize(acc, wsum, dtype=np.uint8)
    assert nan.any() and (expected == 0).any()
    np.testing.assert_array_equal(finish_owned(out, nan), expected)
