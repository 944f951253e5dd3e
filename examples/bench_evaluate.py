"""Time `emtile evaluate --sweep` (11 thresholds, ISBI V-Rand/V-Info + pixel metrics) on 30x512x512.

The "prediction" is the ISBI training labels blurred (Gaussian, sigma 2 px in y/x) plus Gaussian
noise (sigma 0.15), stored as uint8 0-255 in a Zarr array, like `emtile predict` writes it.

    .venv/bin/python examples/bench_evaluate.py [--isbi ../shared/data/isbi2012] [--repeat 1]

Target (issue 5): under 30 s for the sweep on this 2-core machine.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isbi", default=os.environ.get("EMTILE_ISBI_DIR", here.parent / "shared" / "data" / "isbi2012"))
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    import tifffile
    import zarr
    from scipy import ndimage

    from emtile.evaluation import evaluate

    labels = tifffile.imread(Path(args.isbi) / "train-labels.tif")
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter((labels > 0).astype(np.float32), (0, 2, 2))
    p = np.clip(p + rng.normal(0, 0.15, p.shape).astype(np.float32), 0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        z = zarr.create_array(f"{tmp}/pred.zarr", shape=p.shape, dtype="uint8", chunks=(1, 512, 512))
        z[:] = np.round(p * 255).astype(np.uint8)
        labels_path = str(Path(args.isbi) / "train-labels.tif")
        for name, sweep in (("single threshold 0.5", False), ("sweep, 11 thresholds", True)):
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                r = evaluate(f"{tmp}/pred.zarr", labels_path, sweep=sweep, progress=False)
                times.append(time.perf_counter() - t0)
            extra = ""
            if sweep:
                s = r["sweep"]
                extra = (f"; best V-Rand {s['best_v_rand']['value']:.4f} at {s['best_v_rand']['threshold']:g}, "
                         f"best V-Info {s['best_v_info']['value']:.4f} at {s['best_v_info']['threshold']:g}")
            print(f"{name:22s} {labels.shape}: {min(times):6.2f} s (best of {args.repeat}); "
                  f"mean V-Rand {r['mean']['v_rand']:.4f}, V-Info {r['mean']['v_info']:.4f}{extra}")


if __name__ == "__main__":
    main()
