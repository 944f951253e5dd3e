"""Where ``emtile predict`` reads its tiles on a CPU whose cores torch already uses.

    .venv/bin/python examples/bench_predict_overlap.py                      # base 16, tile 572
    .venv/bin/python examples/bench_predict_overlap.py --base 64 --tiles 8 --rounds 4

Times, in one process and interleaved round by round (the machine's drift hits all alike): the
model alone on one tile in memory, run as many times as the volume has tiles; ``emtile.predict``
reading each group of tiles between forward passes (the default when torch's threads use every
core: :func:`emtile.predictor.run_blocks`); and ``emtile.predict`` with the reader thread (the
default on a GPU, or when cores are left free). Each round pairs the three, so the ratios are
taken within a round; the median over rounds is reported beside the best times.

The volume is exactly ``--tiles`` output tiles of random uint8 data (as ``emtile bench``).
Set ``OMP_NUM_THREADS`` on purpose and check ``uptime``: a busy machine gives no figures.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--tile", type=int, default=572)
    p.add_argument("--tiles", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args(argv)

    import torch

    import emtile.predictor as predictor
    from emtile.bench import mirrored_volume, tiles_volume_shape
    from emtile.unet import UNet

    torch.manual_seed(0)
    model = UNet(base=a.base, depth=4).eval()
    out = model.output_size(a.tile)
    x = torch.rand(1, 1, a.tile, a.tile).contiguous(memory_format=torch.channels_last)
    rule = predictor._cores_saturated
    modes = {"between passes": lambda device: device.type == "cpu",
             "reader thread": lambda device: False}
    times = {"model alone": [], **{m: [] for m in modes}}
    with tempfile.TemporaryDirectory(prefix="emtile-overlap-") as tmp:
        tmp = Path(tmp)
        kw = dict(tile=a.tile, device="cpu", progress=False, overwrite=True)
        mirrored_volume(tmp / "warm.zarr", (1, out, out), seed=0)
        predictor.predict(model, tmp / "warm.zarr", tmp / "warm-pred.zarr", **kw)
        mirrored_volume(tmp / "vol.zarr", tiles_volume_shape(model, a.tile, a.tiles), seed=0)
        print(f"UNet base {a.base}, tile {a.tile}, {a.tiles} tiles, {torch.get_num_threads()} "
              f"torch threads, {len(os.sched_getaffinity(0))} cores, load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        try:
            for _ in range(a.rounds):
                model.to(memory_format=torch.channels_last)
                with torch.inference_mode():
                    model(x)
                    t0 = time.perf_counter()
                    for _ in range(a.tiles):
                        model(x)
                    times["model alone"].append(time.perf_counter() - t0)
                for mode, saturated in modes.items():
                    predictor._cores_saturated = saturated
                    t0 = time.perf_counter()
                    predictor.predict(model, tmp / "vol.zarr", tmp / "pred.zarr", **kw)
                    times[mode].append(time.perf_counter() - t0)
        finally:
            predictor._cores_saturated = rule
    base = times["model alone"]
    for mode, t in times.items():
        paired = statistics.median(v / m for v, m in zip(t, base))
        print(f"{mode:15s} best {min(t):6.2f} s  median {statistics.median(t):6.2f} s  "
              f"/ model alone: best/best {min(t) / min(base):.3f}, median of rounds {paired:.3f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
