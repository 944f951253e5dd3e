"""Benchmark ``emtile convert`` against the floor: tifffile reading the same file.

Builds TIFF stacks of 2048×2048 slices made by mirroring ISBI slices (4×4 per slice), at the sizes
asked for, then in one run and for each size:

- floor: a subprocess that reads every page with tifffile (streaming, page by page);
- write floor: a subprocess that reads every page and writes it uncompressed as 1 MB files (what
  any converter to a chunked store must at least do on this disk);
- convert: a subprocess running ``emtile.convert`` on the same file;

and prints MB/s (of uncompressed data) for both, their ratio and each process's peak RSS.

    .venv/bin/python examples/bench_convert.py --sizes 0.5,4 [--compression none|zlib] [--workdir DIR]

``--compare TREE --rounds N`` instead times this tree's convert against another checkout's
(e.g. ``git archive OLD emtile | tar -x -C /tmp/old`` for the commit before a change; TREE
holds its ``emtile/``), interleaved A B, B A, ... on the same file, and prints the throughput
ratio (this tree / TREE) per round and its median, with the load average before and after.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("EMTILE_ISBI_DIR", REPO.parent / "shared" / "data" / "isbi2012"))

FLOOR = """
import sys, tifffile
n = 0
with tifffile.TiffFile(sys.argv[1]) as tf:
    for page in tf.pages:
        n += page.asarray().nbytes
print(n)
"""

WRITE_FLOOR = """
import os, sys, tifffile
out = sys.argv[2]
os.makedirs(out)
with tifffile.TiffFile(sys.argv[1]) as tf:
    for i, page in enumerate(tf.pages):
        data = page.asarray()
        for j, block in enumerate(data.reshape(-1, 2**20)):
            with open(f"{out}/{i}.{j}", "wb") as f:
                f.write(block.tobytes())
"""

CONVERT = """
import sys, emtile
emtile.convert(sys.argv[1], sys.argv[2], progress=False, overwrite=True)
"""


def mirrored_slice(img, reps=4):
    """A (512*reps)² slice made of mirrored copies of one ISBI slice (no seams, real texture)."""
    row = np.concatenate([img if i % 2 == 0 else img[:, ::-1] for i in range(reps)], axis=1)
    return np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(reps)], axis=0)


def build_stack(path, gigabytes, data_dir, compression):
    import tifffile

    raw = tifffile.imread(data_dir / "train-volume.tif")
    side = 2048
    n = max(1, int(round(gigabytes * 1e9 / side**2)))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i in range(n):
            tw.write(mirrored_slice(raw[i % len(raw)]), contiguous=compression == "none",
                     compression=None if compression == "none" else compression,
                     photometric="minisblack")
    return n * side**2


def timed(code, *args, pythonpath=None):
    """Run ``code`` in a fresh interpreter (importing emtile from ``pythonpath`` if given);
    return (seconds, peak RSS in bytes)."""
    wrapper = (
        "import resource, runpy, sys, time\n"
        "t = time.perf_counter()\n"
        f"exec(compile({code!r}, 'bench', 'exec'))\n"
        "dt = time.perf_counter() - t\n"
        "print('BENCH', dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(pythonpath)) if pythonpath else None
    # run outside any checkout: `python -c` puts the working folder first on sys.path, which
    # would import the emtile found there instead of PYTHONPATH's
    out = subprocess.run([sys.executable, "-c", wrapper, *map(str, args)], capture_output=True,
                         text=True, check=True, env=env, cwd=tempfile.gettempdir()).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("BENCH")][-1].split()
    return float(line[1]), int(line[2])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,4", help="stack sizes in GB, comma-separated")
    ap.add_argument("--compression", default="none", help="TIFF compression of the input: none or zlib")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ISBI data folder")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build stacks (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--compare", type=Path, default=None,
                    help="another checkout of emtile: time convert here against it, interleaved")
    ap.add_argument("--rounds", type=int, default=6, help="with --compare: A/B rounds")
    args = ap.parse_args()
    if args.compare is not None:
        return compare(args)

    work = Path(tempfile.mkdtemp(prefix="emtile-bench-", dir=args.workdir))
    rows = []
    try:
        for gb in (float(s) for s in args.sizes.split(",")):
            tif = work / f"stack-{gb:g}GB.tif"
            nbytes = build_stack(tif, gb, args.data, args.compression)
            floor_s, floor_rss = timed(FLOOR, tif)
            copy_dir = work / "copy"
            write_s, _ = timed(WRITE_FLOOR, tif, copy_dir)
            shutil.rmtree(copy_dir)
            out = work / f"stack-{gb:g}GB.zarr"
            conv_s, conv_rss = timed(CONVERT, tif, out)
            rows.append({
                "size_GB": nbytes / 1e9, "input_compression": args.compression,
                "floor_MBps": nbytes / floor_s / 1e6, "convert_MBps": nbytes / conv_s / 1e6,
                "ratio": floor_s / conv_s,
                "read_write_floor_MBps": nbytes / write_s / 1e6, "floor_peak_rss_MB": floor_rss / 1e6,
                "convert_peak_rss_MB": conv_rss / 1e6, "convert_s": conv_s,
            })
            shutil.rmtree(out)
            tif.unlink()
            r = rows[-1]
            print(f"{r['size_GB']:.2f} GB ({args.compression} TIFF): read floor {r['floor_MBps']:.0f} MB/s "
                  f"(peak RSS {r['floor_peak_rss_MB']:.0f} MB); convert {r['convert_MBps']:.0f} MB/s "
                  f"in {conv_s:.1f} s (peak RSS {r['convert_peak_rss_MB']:.0f} MB); "
                  f"convert/floor throughput {r['ratio']:.2f}; read + write 1 MB files floor "
                  f"{r['read_write_floor_MBps']:.0f} MB/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def compare(args):
    """Convert the same stack with this tree and with ``args.compare``, interleaved."""
    import statistics

    work = Path(tempfile.mkdtemp(prefix="emtile-bench-", dir=args.workdir))
    trees = {"this": REPO, "other": args.compare.resolve()}
    for name, tree in trees.items():  # which emtile each side imports, to be sure
        print(name, subprocess.run([sys.executable, "-c", "import emtile; print(emtile.__file__)"],
                                   capture_output=True, text=True, cwd=tempfile.gettempdir(),
                                   env=dict(os.environ, PYTHONPATH=str(tree))).stdout.strip())
    try:
        for gb in (float(s) for s in args.sizes.split(",")):
            tif = work / f"stack-{gb:g}GB.tif"
            nbytes = build_stack(tif, gb, args.data, args.compression)
            seconds = {name: [] for name in trees}
            load0 = os.getloadavg()
            for r in range(args.rounds):
                for name in (trees if r % 2 == 0 else list(trees)[::-1]):
                    out = work / "out.zarr"
                    s, _ = timed(CONVERT, tif, out, pythonpath=trees[name])
                    shutil.rmtree(out)
                    seconds[name].append(s)
            ratios = [o / t for t, o in zip(seconds["this"], seconds["other"])]
            print(f"{nbytes / 1e9:.2f} GB ({args.compression} TIFF): convert MB/s this "
                  f"{nbytes / statistics.median(seconds['this']) / 1e6:.0f}, other "
                  f"{nbytes / statistics.median(seconds['other']) / 1e6:.0f}; throughput "
                  f"this/other per round {[round(x, 3) for x in ratios]}, median "
                  f"{statistics.median(ratios):.3f}; seconds {seconds}; load average before "
                  f"{load0}, after {os.getloadavg()}", flush=True)
            tif.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
