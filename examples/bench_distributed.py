"""emtile predict on a Dask cluster against the same run in one process, and the per-task cost.

    .venv/bin/python examples/bench_distributed.py                       # 2 workers, 24 x 1024^2
    .venv/bin/python examples/bench_distributed.py --slices 48 --workers 2 --noop-tasks 100000

Two measurements, one run, on this machine:

1. **Efficiency**: the same volume (ISBI slices mirrored to ``--slices`` x ``--size`` x ``--size``,
   OME-Zarr), the same model (random weights, base ``--base``, depth 4, tile ``--tile``) and the
   same total torch threads: ``emtile.predict`` in this process with ``--threads`` = cores
   (``--workers`` DataLoader reader, as the CLI does), against ``--cluster local`` with
   ``--workers`` worker processes of cores / workers threads each. Efficiency = local time /
   cluster time. The cluster's start-up (processes, imports) and the model load in each worker
   are timed separately and not counted in the cluster time; both runs are checked to give the
   same bytes when their thread counts match (they do not here: 2 threads vs 1, so they are
   compared to the float rounding of the uint8 output).
2. **Per-task cost**: ``--noop-tasks`` tasks that do nothing, one block each, through
   :func:`emtile.distributed.map_blocks` and its bounded window: tasks per second, and the cost
   per task (threads / throughput), beside the median block time of the prediction above.

Check ``uptime`` first: figures taken on a busy machine are not figures.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012" / "train-volume.tif"


def noop_blocks(job, ids):
    return [None] * len(ids)


def load_model_here(path):
    import emtile

    t0 = time.perf_counter()
    emtile.load_model(path)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=24)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--tile", type=int, default=572)
    p.add_argument("--workers", type=int, default=2, help="Dask workers (and local readers)")
    p.add_argument("--noop-tasks", type=int, default=100_000)
    p.add_argument("--data", type=Path, default=ISBI)
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args(argv)

    import numpy as np
    import torch
    import zarr

    import emtile
    from emtile.bench import mirrored_volume, peak_rss
    from emtile.distributed import map_blocks, start_cluster

    cores = os.cpu_count() or 1
    threads = max(1, cores // a.workers)
    print(f"load average {os.getloadavg()[0]:.2f} on {cores} cores; volume {a.slices}x{a.size}x"
          f"{a.size}, UNet base {a.base}, tile {a.tile}")
    with tempfile.TemporaryDirectory(prefix="emtile-dist-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        vol = tmp / "vol.zarr"
        mirrored_volume(vol, (a.slices, a.size, a.size), source=a.data)
        torch.manual_seed(0)
        emtile.save_model(emtile.UNet(base=a.base, depth=4), tmp / "model")
        opts = dict(tile=a.tile, progress=False, dtype="uint8")

        t0 = time.perf_counter()
        local = emtile.predict(tmp / "model", vol, tmp / "local.zarr", threads=cores,
                               num_workers=1, **opts)
        local_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        with start_cluster("local", workers=a.workers) as (client, info):
            client.run(lambda: __import__("emtile.predictor"))  # imports: part of start-up
            startup_s = time.perf_counter() - t0
            loads = list(client.run(load_model_here, str(tmp / "model")).values())

            t0 = time.perf_counter()
            cluster = emtile.predict(tmp / "model", vol, tmp / "cluster.zarr", client=client,
                                     threads=threads, **opts)
            cluster_s = time.perf_counter() - t0

            # the per-task cost, through the same bounded window
            t0 = time.perf_counter()
            n = map_blocks(noop_blocks, None, range(a.noop_tasks), client=client, progress=False)
            noop_s = time.perf_counter() - t0
        a_local = zarr.open_array(tmp / "local.zarr" / "0", mode="r")[:]
        a_cluster = zarr.open_array(tmp / "cluster.zarr" / "0", mode="r")[:]
        diff = int(np.abs(a_local.astype(int) - a_cluster).max())

    per_task = a.workers / (n / noop_s)  # each worker has one task slot
    block = cluster.block_seconds
    print(f"local      {local_s:8.1f} s  ({cores} torch threads, 1 reader), {local.tiles} tiles "
          f"in {local.blocks} blocks")
    print(f"cluster    {cluster_s:8.1f} s  ({a.workers} workers x {threads} threads); start-up "
          f"{startup_s:.1f} s, model load per worker {max(loads):.2f} s (not counted)")
    print(f"efficiency {local_s / cluster_s:8.3f}  (local / cluster; target >= 0.90)")
    print(f"bytes      max |local - cluster| = {diff} (uint8; 0 needs equal thread counts)")
    print(f"no-op      {n:,} tasks in {noop_s:.1f} s: {n / noop_s:,.0f} tasks/s, "
          f"{1000 * per_task:.2f} ms per task slot")
    print(f"blocks     median block {block:.2f} s on the cluster: the per-task cost is "
          f"{100 * per_task / block:.2f}% of it (targets: <= 20 ms and <= 5%)")
    own, _ = peak_rss()
    print(f"peak RSS   {own / 2**30:.2f} GiB (this process)")


if __name__ == "__main__":
    sys.exit(main())
