"""Benchmark the Numba stitcher against the equivalent NumPy code and the machine's copy bandwidth.

    .venv/bin/python examples/bench_stitch.py              # 388² tiles (stride 384) over a 4096² buffer
    .venv/bin/python examples/bench_stitch.py --size 8192 --tile 388 --repeat 5

One process, one run: a parallel Numba copy of ``--copy-gib`` GiB gives the bandwidth baseline,
then the stitcher (:func:`emtile.stitch.accumulate` over every tile of a grid covering the buffer,
clipped at the far edges, followed by :func:`emtile.stitch.normalize`) and the same work in plain
NumPy (``acc[sl] += w * tile; wsum[sl] += w``, then a masked divide) are timed on identical data
and checked to agree. Bandwidth is counted as the bytes the operation must read plus write (for
C=1, accumulate reads acc, wsum, tile, weight and writes acc, wsum: 24 B per tile pixel; normalize
reads acc and wsum and writes the output), the same count for Numba and NumPy. Each figure is the
best of ``--repeat`` interleaved rounds; on a shared machine the ratios measured here are what to quote.

Targets (issue 3): stitch >= 2x NumPy, and >= 70% of the copy bandwidth.
"""

import argparse
import resource
import time

import numpy as np
from numba import get_num_threads, njit, prange

from emtile.stitch import accumulate, normalize, weight_window


@njit(parallel=True, cache=True)
def _copy(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = src[i]


def timed(fn, setup=None):
    if setup is not None:
        setup()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def grid(size, tile, stride):
    starts = range(0, size - tile + stride, stride)  # the last tile may overhang: clipped
    return [(y, x) for y in starts for x in starts]


def numpy_accumulate(acc, wsum, tile, weight, origin):
    sl = tuple(slice(o, o + t) for o, t in zip(origin, weight.shape))
    region = wsum[sl]  # numpy clips the overhang: crop the tile to match
    crop = tuple(slice(0, n) for n in region.shape)
    acc[(slice(None),) + sl] += weight[crop] * tile[(slice(None),) + crop]
    wsum[sl] += weight[crop]


def numpy_normalize(acc, wsum, out):
    out[...] = 0
    np.divide(acc, wsum, out=out, where=wsum > 0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=5120, help="buffer side (pixels)")
    p.add_argument("--tile", type=int, default=388, help="output tile side (pixels)")
    p.add_argument("--stride", type=int, default=384, help="tile stride (tile - stride = overlap)")
    p.add_argument("--channels", type=int, default=1, help="channels C")
    p.add_argument("--blend", default="cosine", help="weight window (none/linear/cosine/gaussian)")
    p.add_argument("--tiles-distinct", type=int, default=8, help="distinct random tiles cycled")
    p.add_argument("--copy-gib", type=float, default=1.0, help="size of the copy baseline (GiB)")
    p.add_argument("--repeat", type=int, default=7, help="rounds; the best of each figure is reported")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    C, S, T = args.channels, args.size, args.tile
    origins = grid(S, T, args.stride)
    tiles = [rng.random((C, T, T), dtype=np.float32) for _ in range(args.tiles_distinct)]
    weight = weight_window((T, T), blend=args.blend, overlap=(T - args.stride))
    acc = np.zeros((C, S, S), np.float32)
    wsum = np.zeros((S, S), np.float32)
    out = np.empty((C, S, S), np.float32)
    out_u8 = np.empty((C, S, S), np.uint8)

    def zero():
        acc.fill(0)
        wsum.fill(0)

    def run_accumulate(fn):
        def go():
            for k, o in enumerate(origins):
                fn(acc, wsum, tiles[k % len(tiles)], weight, o)
        return go

    # pixels actually touched (clipped) and the bytes to read + write
    px = sum(min(T, S - y) * min(T, S - x) for y, x in origins)
    acc_bytes = px * 4 * (3 * C + 3)  # read acc(C), tile(C), weight, wsum; write acc(C), wsum
    norm_bytes = S * S * 4 * (2 * C + 1)  # read acc(C), wsum; write out(C)
    norm_u8_bytes = S * S * (4 * C + 4 + C)

    # correctness first (also compiles the kernels)
    zero()
    run_accumulate(accumulate)()
    got_acc, got_wsum = acc.copy(), wsum.copy()
    zero()
    run_accumulate(numpy_accumulate)()
    assert np.allclose(got_acc, acc, rtol=1e-6, atol=1e-6) and np.array_equal(got_wsum, wsum)
    assert np.allclose(normalize(acc, wsum, out=out), numpy_normalize(acc, wsum, out.copy()))
    normalize(acc, wsum, out=out_u8)
    del got_acc, got_wsum

    n = int(args.copy_gib * 2**30) // 4
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)
    _copy(src, dst)

    def u8_numpy():
        np.rint(np.clip(numpy_normalize(acc, wsum, out), 0, 1) * 255, out=out).astype(np.uint8)

    # (name, function, setup): all cases run once per round, rounds interleaved, so that load from
    # other processes hits every case alike; the best round of each case is reported
    cases = [
        ("copy", lambda: _copy(src, dst), None),
        ("acc numba", run_accumulate(accumulate), zero),
        ("acc numpy", run_accumulate(numpy_accumulate), zero),
        ("norm numba", lambda: normalize(acc, wsum, out=out), None),
        ("norm numpy", lambda: numpy_normalize(acc, wsum, out), None),
        ("u8 numba", lambda: normalize(acc, wsum, out=out_u8), None),
        ("u8 numpy", u8_numpy, None),
    ]
    best = dict.fromkeys((c[0] for c in cases), float("inf"))
    for _ in range(args.repeat):
        for name, fn, setup in cases:
            best[name] = min(best[name], timed(fn, setup))
    del src, dst
    t_copy = best["copy"]
    copy_gbs = 2 * n * 4 / t_copy / 1e9
    t_acc_nb, t_acc_np = best["acc numba"], best["acc numpy"]
    t_norm_nb, t_norm_np = best["norm numba"], best["norm numpy"]
    t_u8_nb, t_u8_np = best["u8 numba"], best["u8 numpy"]

    rows = [
        ("accumulate", acc_bytes, t_acc_nb, t_acc_np),
        ("normalize float32", norm_bytes, t_norm_nb, t_norm_np),
        ("normalize uint8", norm_u8_bytes, t_u8_nb, t_u8_np),
        ("stitch (acc + float32)", acc_bytes + norm_bytes, t_acc_nb + t_norm_nb,
         t_acc_np + t_norm_np),
    ]
    print(f"buffer {C}x{S}x{S} float32, {len(origins)} tiles of {T}² (stride {args.stride}, "
          f"blend {args.blend}), numba threads {get_num_threads()}, best of {args.repeat}")
    print(f"copy baseline: parallel Numba copy of {args.copy_gib:g} GiB: {t_copy * 1e3:.1f} ms, "
          f"{copy_gbs:.1f} GB/s (read + write)")
    print()
    head = f"{'operation':<24}{'GB r+w':>8}{'numba ms':>10}{'numba GB/s':>12}{'numpy ms':>10}" \
           f"{'numpy GB/s':>12}{'speed-up':>10}{'% of copy':>11}"
    print(head)
    print("-" * len(head))
    for name, nbytes, tn, tp in rows:
        print(f"{name:<24}{nbytes / 1e9:>8.2f}{tn * 1e3:>10.1f}{nbytes / tn / 1e9:>12.1f}"
              f"{tp * 1e3:>10.1f}{nbytes / tp / 1e9:>12.1f}{tp / tn:>9.2f}x"
              f"{100 * nbytes / tn / 1e9 / copy_gbs:>10.0f}%")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS {peak:.2f} GiB. Targets: speed-up >= 2x, >= 70% of copy bandwidth.")


if __name__ == "__main__":
    main()
