"""How many augmented training patches per second one DataLoader worker makes.

Times :meth:`emtile.sampling.PatchDataset.sample` on the ISBI 2012 training slices, in one process
(what each worker does), step by step: reading the crop only, + elastic deformation, + flips and
intensity jitter, + the border weight map; then the full stream through a DataLoader with
``--workers`` processes. Compare the per-worker rate with the training step rate (iterations/s ×
batch size): the workers keep up when ``workers × per-worker rate`` exceeds it.

    .venv/bin/python examples/bench_augment.py --tile 572 --depth 4 --n 40 --workers 1,2
    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python examples/bench_augment.py --compare-warp 300

``--compare-warp N`` instead times the elastic deformation with emtile's Numba kernel against the
same deformation done by ``scipy.ndimage.map_coordinates(mode="mirror")`` (bilinear image,
nearest labels) on N random 572² patches of the ISBI slices, alternating which goes first, and
counts the pixels where the two differ. The ratio of one run is usable on a loaded machine.
"""

import argparse
import functools
import os
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


def scipy_elastic(image, label, rng, *, image_shape, label_shape, sigma=10.0, grid=3):
    """:func:`emtile.augment.elastic` done with ``scipy.ndimage.map_coordinates`` (the same field)."""
    from scipy import ndimage

    from emtile.augment import displacement_field

    field = displacement_field(image_shape, rng, sigma=sigma, grid=grid)
    start = [(a - b) // 2 for a, b in zip(image.shape, image_shape)]
    inner = [(a - b) // 2 for a, b in zip(image_shape, label_shape)]
    coords = np.indices(image_shape, dtype=np.float64)
    for d in range(2):
        coords[d] += start[d]
        coords[d] += field[d]
    out_image = ndimage.map_coordinates(np.ascontiguousarray(image, np.float32), coords, order=1,
                                        mode="mirror", output=np.float32)
    box = (slice(None),) + tuple(slice(i, i + n) for i, n in zip(inner, label_shape))
    out_label = ndimage.map_coordinates(label, coords[box], order=0, mode="mirror")
    return out_image, out_label


def compare_warp(raw, labels, tile, out, n):
    """Numba kernel vs SciPy on ``n`` patches, interleaved; prints ms/patch, ratio, differences."""
    from emtile.augment import Augmenter, elastic

    crop = tile + 2 * Augmenter().margin
    pick = np.random.default_rng(0)
    shapes = dict(image_shape=(tile, tile), label_shape=(out, out))
    times, diff_image, diff_label, worst = [0.0, 0.0], 0, 0, 0.0
    for k in range(n + 1):  # patch 0 warms up (Numba compiles or loads its cache)
        z = int(pick.integers(len(raw)))
        image = np.pad(raw[z], crop, mode="reflect")
        label = np.pad(labels[z], crop, mode="reflect")
        y, x = (int(pick.integers(s - crop + 1)) for s in image.shape)
        image, label = image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]
        result = [None, None]
        for which in ((0, 1) if k % 2 else (1, 0)):
            fn = elastic if which == 0 else scipy_elastic
            t = time.perf_counter()
            result[which] = fn(image, label, np.random.default_rng([1, k]), **shapes)
            if k:
                times[which] += time.perf_counter() - t
        diff_image += int(np.count_nonzero(result[0][0] != result[1][0]))
        diff_label += int(np.count_nonzero(result[0][1] != result[1][1]))
        worst = max(worst, float(np.abs(result[0][0] - result[1][0]).max()))
    numba_ms, scipy_ms = (1000 * t / n for t in times)
    print(f"elastic deformation, {n} patches {tile}² (labels {out}²), crop {crop}², "
          f"OMP/NUMBA threads {os.environ.get('OMP_NUM_THREADS', '?')}/"
          f"{os.environ.get('NUMBA_NUM_THREADS', '?')}, load average {os.getloadavg()[0]:.1f}")
    print(f"  Numba kernel   {numba_ms:7.2f} ms/patch")
    print(f"  SciPy          {scipy_ms:7.2f} ms/patch  ({scipy_ms / numba_ms:.2f}x the kernel's time)")
    print(f"  image pixels that differ: {diff_image} of {n * tile * tile} (largest difference "
          f"{worst:.3g}); label pixels that differ: {diff_label} of {n * out * out}")


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
    ap.add_argument("--compare-warp", type=int, default=0, metavar="N",
                    help="compare the elastic warp with SciPy's on N patches instead")
    args = ap.parse_args()

    raw = tifffile.imread(args.data / "train-volume.tif")[:25]
    labels = (tifffile.imread(args.data / "train-labels.tif")[:25] > 0).astype(np.uint8)
    out = UNet(base=1, depth=args.depth).output_size(args.tile)
    if args.compare_warp:
        compare_warp(raw.astype(np.float32) / 255, labels, args.tile, out, args.compare_warp)
        return
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
