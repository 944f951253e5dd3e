"""What resuming costs at 10^6 blocks: one marker file per block against grouped markers.

    .venv/bin/python examples/bench_markers.py                 # 10^6 blocks
    .venv/bin/python examples/bench_markers.py --blocks 100000 --workdir /scratch

A resumed run first asks which blocks are done. Two designs for the done-markers, each a uint8
Zarr array of one byte per block, all blocks marked done (the worst case for reading):

- **per block**: chunks of one block, so any process can write its own marker (one file per
  block); resume reads the whole array (one file open per block), or lists the chunk folder;
- **grouped** (what emtile does, :mod:`emtile.markers`): chunks of 16,384 blocks written only by
  the driver; resume reads ``n / 16384`` chunks.

Prints the time to write the markers, to read them all back (``done()``, what a resume does),
to iterate the blocks still to do, and the number of files, for both. The page cache is warm
(the markers were just written); a cold cache on a network file system is slower still for the
per-block design, which is the point.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def count_files(path):
    return sum(len(files) for _, _, files in os.walk(path))


def per_block(root, n):
    import zarr

    group = zarr.open_group(root / "per-block.zarr", mode="w", zarr_format=3)
    a = group.create_array("emtile_blocks", shape=(n,), chunks=(1,), dtype="uint8",
                           fill_value=0, compressors=None)
    write_s, _ = timed(lambda: a.__setitem__(slice(None), 1))
    read_s, flags = timed(lambda: zarr.open_array(root / "per-block.zarr" / "emtile_blocks",
                                                  mode="r")[:])
    assert flags.all()
    list_s, listed = timed(lambda: count_files(root / "per-block.zarr" / "emtile_blocks" / "c"))
    assert listed == n
    return {"write_s": write_s, "read_s": read_s, "list_s": list_s,
            "files": count_files(root / "per-block.zarr")}


def grouped(root, n):
    import zarr

    from emtile.markers import BlockMarkers

    group = zarr.open_group(root / "grouped.zarr", mode="w", zarr_format=3)
    m = BlockMarkers.create(group, n, flush_every=3600)

    def write():
        for a in range(0, n, 1000):  # as a driver records results arriving in groups
            m.record(np.arange(a, min(a + 1000, n)))
        m.flush()

    write_s, _ = timed(write)
    reopen = BlockMarkers.open(zarr.open_group(root / "grouped.zarr", mode="r+"), n)
    read_s, flags = timed(reopen.done)
    assert flags.all()
    todo_s, todo = timed(lambda: sum(1 for _ in reopen.todo()))
    assert todo == 0
    return {"write_s": write_s, "read_s": read_s, "list_s": todo_s,
            "files": count_files(root / "grouped.zarr")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=10**6, help="blocks in the plan")
    p.add_argument("--workdir", type=Path, default=None, help="where the stores go")
    a = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="emtile-markers-", dir=a.workdir))
    try:
        print(f"{a.blocks:,} blocks, all done; load average {os.getloadavg()[0]:.2f}")
        g = grouped(root, a.blocks)
        b = per_block(root, a.blocks)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'':<12}{'write s':>10}{'resume s':>10}{'todo/list s':>12}{'files':>10}")
    for name, r in (("per block", b), ("grouped", g)):
        print(f"{name:<12}{r['write_s']:>10.2f}{r['read_s']:>10.3f}{r['list_s']:>12.3f}"
              f"{r['files']:>10,}")
    print(f"resume (reading every marker): grouped is {b['read_s'] / max(g['read_s'], 1e-9):.0f}x "
          f"faster")


if __name__ == "__main__":
    main()
