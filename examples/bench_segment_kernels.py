"""Pass 2 of ``emtile segment`` on one block, kernel by kernel: seconds and minor page faults.

    OMP_NUM_THREADS=1 .venv/bin/python examples/bench_segment_kernels.py [--pred MAP]
    OMP_NUM_THREADS=1 .venv/bin/python examples/bench_segment_kernels.py --compare OLD_TREE

The block is what the defaults read for an interior block of a large 2-D-mode volume: 4 slices of
1024 x 1024 px plus a 65-px halo (``grow`` 32: ``2 * 32 + 1``), i.e. 4 x 1154 x 1154, cut from a
real probability map (``--pred``, default ``demo-out/pred.zarr``, which ``bash
examples/demo.sh`` writes: 30 x 512 x 512 uint8) mirrored
(``numpy.pad(mode="reflect")``). The calls are those of ``blocks._fragments`` and
``blocks.run_fragment_blocks`` with the defaults (component seeds: one flood of 32 rounds over the
boundary pixels, quantile linkage's histogram bins).

Each tree (this checkout, and ``--compare TREE``'s ``emtile`` package) runs in its own subprocess
(``PYTHONPATH=TREE``), alternately, ``--runs`` times; each kernel's time is the minimum over all
its repeats. Each subprocess also prints a digest of every output, so the comparison shows
whether the outputs are byte-identical. Minor page faults (``ru_minflt``) are counted per kernel
over one repeat after the warm-up.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP = os.path.join(HERE, "demo-out", "pred.zarr")  # the demo's prediction of the ISBI stack


def _block(path, size, z):
    """``z`` slices of the map at ``path`` mirrored to ``size`` x ``size`` (uint8)."""
    import numpy as np
    import zarr

    p = np.asarray(zarr.open(path, mode="r")["0"][:z, :size, :size])
    pad = [(0, 0)] + [((size - n) // 2, size - n - (size - n) // 2) for n in p.shape[1:]]
    return np.ascontiguousarray(np.pad(p, pad, mode="reflect"))


def _child(args):
    """Time the kernels of this process's ``emtile`` on one block; print one JSON line."""
    import resource

    import numpy as np

    from emtile.segmenter import kernels
    from emtile.segmenter.pixels import stored_ids

    p = _block(args.pred, args.size, args.z)
    halo = 2 * args.grow + 1
    volume_shape = (2 * args.z, 4096, 4096)
    r0 = (0, 1024 - halo, 1024 - halo)
    w0 = (0, halo, halo)
    w1 = (args.z, args.size - halo, args.size - halo)
    own = tuple(slice(a, b) for a, b in zip(w0, w1))
    start = tuple(a + o for a, o in zip(w0, r0))
    axes = (1, 2)
    boundary_bit = np.uint64(1 << 63)
    bins = kernels.altitude_bins(kernels.face_limit(0.2))
    cells = kernels.label_components(kernels.interior_mask(p, 0.88), axes=axes)[0]
    cells = cells.astype(np.int64)
    cells[cells > 0] += 1000  # provisional ids carry the block's offset

    out = {}
    steps = [
        ("interior_mask", lambda: kernels.interior_mask(p, 0.88)),
        ("altitude", lambda: kernels.altitude(p)),
        ("flood", lambda: kernels.flood(out["interior_mask"], ~out["interior_mask"],
                                        out["altitude"], rounds=args.grow, axes=axes, origin=r0,
                                        volume_shape=volume_shape)),
        ("source_labels", lambda: kernels.source_labels(out["flood"], cells, origin=r0,
                                                        volume_shape=volume_shape)),
        ("source", lambda: out["flood"] & np.int64(kernels.INDEX_LIMIT - 1)),
        ("fragment_stats", lambda: kernels.fragment_stats(
            out["source_labels"][own], out["interior_mask"][own], origin=start,
            volume_shape=volume_shape)),
        ("adjacent_pairs", lambda: kernels.adjacent_pairs(
            out["source_labels"], out["altitude"], out["source"], start=w0, stop=w1, axes=axes,
            origin=r0, volume_shape=volume_shape, bins=bins)),
        ("stored_ids", lambda: stored_ids(out["source_labels"][own], out["interior_mask"][own],
                                          boundary_bit)),
    ]
    best = {name: float("inf") for name, _ in steps}
    faults = {}
    for rep in range(args.repeats + 1):  # the first is the warm-up (JIT, caches)
        for name, fn in steps:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            out[name] = fn()
            dt = time.perf_counter() - t0
            if rep == 1:
                faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            if rep:
                best[name] = min(best[name], dt)
    digests = {name: hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()[:12]
               for name, v in out.items()}
    print(json.dumps({"seconds": best, "faults": faults, "digests": digests}))


def _run(tree, args):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--pred", args.pred,
           "--size", str(args.size),
           "--z", str(args.z), "--grow", str(args.grow), "--repeats", str(args.repeats)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", help="another checkout whose emtile package is timed too")
    ap.add_argument("--pred", default=MAP, help="a uint8 probability store (emtile predict's)")
    ap.add_argument("--size", type=int, default=1154, help="read box side (px)")
    ap.add_argument("--z", type=int, default=4)
    ap.add_argument("--grow", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1, help="subprocesses per tree, alternated")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    args.pred = os.path.abspath(args.pred)
    if not os.path.isdir(args.pred):
        sys.exit(f"no probability map at {args.pred}: run bash examples/demo.sh first, or give "
                 f"--pred an emtile prediction")
    trees = [("this", HERE)] + ([("compare", os.path.abspath(args.compare))] if args.compare
                                else [])
    results = {name: [] for name, _ in trees}
    for _ in range(args.runs):
        for name, tree in trees:
            results[name].append(_run(tree, args))
            print(f"{name}: done; load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    merged = {}
    for name, runs in results.items():
        merged[name] = {
            "seconds": {k: min(r["seconds"][k] for r in runs) for k in runs[0]["seconds"]},
            "faults": runs[-1]["faults"], "digests": runs[0]["digests"]}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"block {args.z} x {args.size} x {args.size}, grow {args.grow}, min of "
          f"{args.repeats} x {args.runs} runs; load average {load}")
    head = f"{'kernel':16s}" + "".join(f"{n + ' s':>12s}{n + ' flt':>12s}" for n in merged)
    print(head + ("   ratio  same" if len(merged) == 2 else ""))
    for k in merged["this"]["seconds"]:
        line = f"{k:16s}" + "".join(f"{m['seconds'][k]:12.4f}{m['faults'][k]:12d}"
                                    for m in merged.values())
        if len(merged) == 2:
            a, b = merged["this"], merged["compare"]
            line += f"{b['seconds'][k] / a['seconds'][k]:8.2f}  "
            line += "yes" if a["digests"][k] == b["digests"][k] else "NO"
        print(line)
    total = "".join(f"{sum(m['seconds'].values()):12.4f}{sum(m['faults'].values()):12d}"
                    for m in merged.values())
    print(f"{'total':16s}" + total)


if __name__ == "__main__":
    main()
