"""How many augmented training patches per second one DataLoader worker makes.

Times :meth:`emtile.sampling.PatchDataset.sample` on the ISBI 2012 training slices, in one process
(what each worker does), step by step: reading the crop only, + elastic deformation, + flips and
intensity jitter, + the border weight map; then the full stream through a DataLoader with
``--workers`` processes. Compare the per-worker rate with the training step rate (iterations/s ×
batch size): the workers keep up when ``workers × per-worker rate`` exceeds it.

    python examples/bench_augment.py --tile 572 --depth 4 --n 40 --workers 1,2
"""

import argparse
import functools
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


def rate(fn, n):
    fn(0)  # warm-up (caches, first-call costs)
    t = time.perf_counter()
    for i in range(1, n + 1):
        fn(i)
    return n / (time.perf_counter() - t)


def main():
    import tifffile
    import torch

    from emtile.augment import Augmenter
    from emtile.losses import weight_map
    from emtile.sampling import PatchDataset
    from emtile.unet import UNet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with train-volume.tif / train-labels.tif")
    ap.add_argument("--tile", type=int, default=572, help="input patch size")
    ap.add_argument("--depth", type=int, default=4, help="U-Net depth (sets the output size)")
    ap.add_argument("--n", type=int, default=40, help="patches per measurement")
    ap.add_argument("--workers", default="1,2", help="DataLoader worker counts to try")
    args = ap.parse_args()

    raw = tifffile.imread(args.data / "train-volume.tif")[:25]
    labels = (tifffile.imread(args.data / "train-labels.tif")[:25] > 0).astype(np.uint8)
    out = UNet(base=1, depth=args.depth).output_size(args.tile)
    weights = functools.partial(weight_map, w0=10.0, sigma=5.0, class_weights=(1.6, 0.64))
    steps = [
        ("read crop only", None, None),
        ("+ elastic", Augmenter(flip=False, intensity=False), None),
        ("+ flips/rot90 + intensity", Augmenter(), None),
        ("+ border weight map (all)", Augmenter(), weights),
        ("all + noise + blur", Augmenter(noise=0.03, blur=1.0), weights),
    ]
    print(f"tile {args.tile} -> label patch {out}, one process (= one worker), torch threads 1")
    torch.set_num_threads(1)
    for name, augment, w in steps:
        ds = PatchDataset(raw, labels, input_size=args.tile, output_size=out, slices=range(25),
                          augment=augment, weights=w, seed=0)
        r = rate(ds.sample, args.n)
        print(f"  {name:28s} {r:7.1f} patches/s  ({1000 / r:6.1f} ms/patch)")

    ds = PatchDataset(raw, labels, input_size=args.tile, output_size=out, slices=range(25),
                      augment=Augmenter(), weights=weights, seed=0)
    for workers in (int(w) for w in args.workers.split(",")):
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                             prefetch_factor=4 if workers else None)
        it = iter(loader)
        next(it)  # start-up
        t = time.perf_counter()
        for _ in range(args.n):
            next(it)
        r = args.n / (time.perf_counter() - t)
        print(f"DataLoader, {workers} worker(s): {r:7.1f} patches/s total, "
              f"{r / max(workers, 1):7.1f} per worker")
        del it, loader


if __name__ == "__main__":
    main()
