"""Peak memory of ``emtile.predict`` does not grow with the volume: 4 GB against 0.2 GB.

    .venv/bin/python examples/bench_predict_memory.py                 # 0.2 GB and 4 GB volumes
    .venv/bin/python examples/bench_predict_memory.py --sizes-gb 0.2 1 --side 1024

Each volume is ISBI 2012 slices mirrored to ``Z x side x side`` uint8 (never random noise), written
once as OME-Zarr; each prediction runs in its own subprocess, so its peak RSS (``ru_maxrss``, and
that of its DataLoader workers) is its own. A tiny U-Net keeps it quick: memory is set by tiles,
batches, queues and blocks, which do not depend on the model's width in the way they depend on the
volume, and the model is the same for both volumes.

Target (issue 3): peak RSS for the 4 GB volume within 20% of the 0.2 GB one.

``--null`` measures predict's data path alone (issue 23): the model's forward pass is replaced by
a centre crop to its output size (the U-Net's geometry, no arithmetic), so reading, normalising,
cutting tiles, stitching, encoding and writing are all that is left; Mvoxel/s and the CPU seconds
of the prediction (its process, imports excluded) are printed beside the wall time (on a shared machine the CPU seconds
move less with the load than the wall time does).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012" / "train-volume.tif"


def centre_crop_forward(net):
    """``net`` whose forward pass is the centre crop of its input to its output size."""
    import types

    from emtile.geometry import center_crop

    def forward(self, x):
        out = self.shape_map.output_size(tuple(x.shape[2:]))
        return center_crop(x, out) * 1.0  # a new tensor, as a network's output

    net.forward = types.MethodType(forward, net)
    return net


def run_one(a):
    import resource

    import emtile
    from emtile.bench import peak_rss

    model = a.model
    if a.null:
        model = centre_crop_forward(emtile.load_model(a.model))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    r = emtile.predict(model, a.volume, a.output, tile=a.tile, progress=False,
                       channels_last=False)
    own, children = peak_rss()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": time.perf_counter() - t0, "rss": own, "rss_workers": children,
            "shape": list(r.shape), "tiles": r.tiles, "blocks": r.blocks,
            "cpu": usage.ru_utime + usage.ru_stime - cpu0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.2, 4.0],
                   help="volume sizes in GB (10^9 bytes, uint8)")
    p.add_argument("--side", type=int, default=2048, help="slice side (pixels)")
    p.add_argument("--base", type=int, default=2, help="U-Net width")
    p.add_argument("--depth", type=int, default=2, help="U-Net depth")
    p.add_argument("--tile", type=int, default=572, help="input tile size")
    p.add_argument("--data", type=Path, default=ISBI, help="stack whose slices are mirrored")
    p.add_argument("--workdir", type=Path, default=None, help="where the volumes go (temp)")
    p.add_argument("--null", action="store_true",
                   help="the data path alone: the model's forward is a centre crop")
    p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--volume", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.run:
        print(json.dumps(run_one(a)))
        return

    import torch

    import emtile
    from emtile.bench import mirrored_volume

    rows = []
    with tempfile.TemporaryDirectory(prefix="emtile-mem-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        emtile.save_model(emtile.UNet(base=a.base, depth=a.depth), tmp / "model")
        for gb in a.sizes_gb:
            z = max(1, round(gb * 1e9 / a.side**2))
            vol = tmp / f"vol-{gb:g}.zarr"
            t0 = time.perf_counter()
            mirrored_volume(vol, (z, a.side, a.side), source=a.data)
            t_write = time.perf_counter() - t0
            done = subprocess.run(
                [sys.executable, __file__, "--run", "--model", str(tmp / "model"), "--volume",
                 str(vol), "--output", str(tmp / f"pred-{gb:g}.zarr"), "--tile", str(a.tile)]
                + (["--null"] if a.null else []),
                capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"predict failed:\n{done.stderr}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((z, z * a.side**2, t_write, r))
            emtile_store_cleanup(vol, tmp / f"pred-{gb:g}.zarr")

    what = "forward = centre crop (data path alone)" if a.null else "real forward"
    print(f"UNet base {a.base} depth {a.depth} ({what}), tile {a.tile}, volumes Z x {a.side} x "
          f"{a.side} uint8 (mirrored {a.data.name}), one subprocess per prediction")
    head = f"{'volume GB':>10}{'Z':>6}{'tiles':>7}{'blocks':>7}{'write s':>9}{'predict s':>10}" \
           f"{'Mvoxel/s':>10}{'CPU s':>8}{'peak RSS GiB':>14}{'worker GiB':>12}"
    print(head)
    print("-" * len(head))
    for z, nbytes, t_write, r in rows:
        print(f"{nbytes / 1e9:>10.2f}{z:>6}{r['tiles']:>7}{r['blocks']:>7}{t_write:>9.1f}"
              f"{r['seconds']:>10.1f}{nbytes / r['seconds'] / 1e6:>10.1f}{r['cpu']:>8.1f}"
              f"{r['rss'] / 2**30:>14.3f}{r['rss_workers'] / 2**30:>12.3f}")
    if len(rows) > 1:
        first, last = rows[0][3], rows[-1][3]
        print(f"\npeak RSS, largest / smallest volume: {last['rss'] / first['rss']:.3f} (main), "
              f"{last['rss_workers'] / max(first['rss_workers'], 1):.3f} (workers); target <= 1.20")


def emtile_store_cleanup(*paths):
    """Free the disk as soon as a size is done (volumes can be several GB)."""
    import shutil

    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
