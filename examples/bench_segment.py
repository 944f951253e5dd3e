"""``emtile segment`` measured: quality on ISBI, block invariance, peak memory, speed.

    python examples/bench_segment.py quality --model runs/isbi/best     # predict, segment, score
    python examples/bench_segment.py quality --pred pred.zarr --grid    # + a small settings grid
    python examples/bench_segment.py invariance --pred pred.zarr        # blocks 128..1024 px
    python examples/bench_segment.py memory --sizes-gb 0.4 4            # peak RSS, one process each
    python examples/bench_segment.py speed --pred pred.zarr             # against skimage watershed

``quality`` scores slices 25-29 (``--slices``) of the ISBI 2012 training stack. The baseline is the
challenge's own post-processing: the probability map thresholded at each of 0.0, 0.1, ..., 1.0
(boundaries thinned, ``emtile evaluate --sweep``), best mean V-Rand kept. ``emtile segment``
(2-D) is scored with the same conventions: truth cells = 4-connected components of the truth
interior, truth membrane left out, predicted 0-pixels inside truth cells count as singletons
(:func:`emtile.metrics.segmentation_stats`). Beside V-Rand and V-Info: VOI split and merge (bits)
and the adapted Rand error with CREMI's conventions (scikit-image's ``variation_of_information``
and ``adapted_rand_error`` on the truth-interior pixels only), per slice, averaged.

``invariance`` segments the prediction with blocks of 128, 256, 512 and 1024 px and compares each
to the single-block run (the whole volume as one block): identical or not, adapted Rand error and
VOI between the two (0 when identical). ``--side 2048`` mirrors the prediction to 2048 x 2048
slices first, so that 1024-px blocks cut it too.

``memory`` mirrors a probability map (the ISBI truth, blurred, or ``--pred``) to volumes of the given
sizes (uint8, Z x side x side) and segments each in its own subprocess; peak RSS should not grow
with the volume (target: within 1.2x).

``speed`` times, in one process: scikit-image's ``watershed`` on the whole volume in memory
(markers: components of ``p >= threshold``, in-plane connectivity; relief ``1 - p``), and
``emtile segment`` (cc, the same two steps, and ws) from store to store. Seconds per core are
wall seconds x processes. Targets: emtile at least as fast per core; 1.6x faster with 2 workers
(needs ``--cluster``, not in this version).

Timings and memory need a quiet machine; the figures go in the closing note of the issue.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


# --------------------------------------------------------------------------- scores


def segmentation_scores(seg, truth):
    """Mean over slices of V-Rand, V-Info (ISBI), VOI split/merge and adapted Rand error (CREMI)
    of a label stack ``seg`` against the binary ``truth`` stack."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    from emtile.metrics import segmentation_stats, truth_segments

    rows = []
    for s, t in zip(seg, truth):
        tseg = truth_segments(t)
        st = segmentation_stats(tseg, s)
        inside = tseg > 0
        # CREMI: only truth-labelled pixels; a predicted 0 is one more segment there
        ts, ps = tseg[inside], s[inside].astype(np.int64)
        merge, split = variation_of_information(ts, ps)  # H(truth|seg), H(seg|truth)
        are = adapted_rand_error(ts, ps)[0]
        rows.append((st["v_rand"], st["v_info"], split, merge, are))
    m = np.mean(rows, axis=0)
    return {"v_rand": m[0], "v_info": m[1], "voi_split": m[2], "voi_merge": m[3],
            "adapted_rand_error": m[4]}


def thresholded_scores(pred, truth):
    """The challenge's baseline: best mean V-Rand over thresholds 0.0..1.0, and its scores."""
    import emtile
    from emtile.metrics import thin_boundaries

    r = emtile.evaluate(pred, truth, sweep=True, progress=False)
    t = r["sweep"]["best_v_rand"]["threshold"]
    p = pred.astype(np.float64) / (255 if pred.dtype == np.uint8 else 1)
    seg = np.stack([thin_boundaries(z > t) for z in p])  # Fiji thresholds strictly
    out = segmentation_scores(seg, truth)
    out.update(threshold=t, v_rand=r["sweep"]["best_v_rand"]["value"],
               v_info_best=r["sweep"]["best_v_info"]["value"])
    return out


# --------------------------------------------------------------------------- inputs


def prediction(a, work):
    """The probability store: --pred, or --model run over the ISBI training stack."""
    import emtile

    if a.pred:
        return str(a.pred)
    if not a.model:
        sys.exit("give --pred PRED (an emtile predict output) or --model MODEL")
    vol = work / "train.zarr"
    if not vol.exists():
        emtile.convert(a.data / "train-volume.tif", vol, progress=False)
    pred = work / "pred.zarr"
    emtile.predict(a.model, vol, pred, tile=572, progress=False, overwrite=True)
    return str(pred)


def truth(a):
    import tifffile

    return tifffile.imread(a.data / "train-labels.tif")


def blurred_truth(a, sigma=2.0, noise=0.1, seed=0):
    """A probability map from the truth: blurred in-plane, noisy, uint8 (no model needed)."""
    from scipy import ndimage

    lab = truth(a)
    rng = np.random.default_rng(seed)
    p = ndimage.gaussian_filter((lab > 0).astype(np.float32), (0, sigma, sigma))
    p = np.clip(p + rng.normal(0, noise, p.shape), 0, 1)
    return np.round(p * 255).astype(np.uint8)


def write_probabilities(path, p, *, voxel=(50.0, 4.0, 4.0)):
    from emtile.store import create_image, mark_complete

    g = create_image(path, p.shape, p.dtype, kind="probabilities", voxel_size=voxel)
    g["0"][...] = p
    mark_complete(g)
    return str(path)


def read(path, name="0"):
    import zarr

    return np.asarray(zarr.open_group(str(path), mode="r")[name][...])


# --------------------------------------------------------------------------- quality


def quality(a):
    import emtile

    with tempfile.TemporaryDirectory(prefix="emtile-seg-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        pred_path = prediction(a, tmp)
        z0, z1 = a.slices
        t = truth(a)[z0:z1]
        p = read(pred_path)[z0:z1]
        base = thresholded_scores(p, t)
        print(f"prediction {pred_path}, slices {z0}:{z1}")
        print(f"thresholded (best of 0.0..1.0 at {base['threshold']:g}): " + fmt(base))
        settings = [{}]
        if a.grid:
            settings += [dict(threshold=th, merge_threshold=m) for th in (0.5, 0.7, 0.9)
                         for m in (0.3, 0.5)] + [dict(method="cc", threshold=th)
                                                 for th in (0.5, 0.9)]
        rows = []
        for kw in settings:
            t0 = time.perf_counter()
            r = emtile.segment(pred_path, tmp / "seg.zarr", overwrite=True, progress=False, **kw)
            seg = read(tmp / "seg.zarr")[z0:z1]
            s = segmentation_scores(seg, t)
            s["seconds"] = time.perf_counter() - t0
            rows.append({"settings": r.settings, **s})
            print(f"segment {json.dumps(kw) if kw else '(defaults)'}: " + fmt(s)
                  + f"  V-Rand {s['v_rand'] - base['v_rand']:+.4f} vs thresholded")
        if a.json:
            Path(a.json).write_text(json.dumps({"thresholded": base, "segment": rows}, indent=2,
                                               default=float))


def fmt(s):
    return (f"V-Rand {s['v_rand']:.4f}  V-Info {s['v_info']:.4f}  VOI split {s['voi_split']:.4f} "
            f"merge {s['voi_merge']:.4f}  adapted Rand error {s['adapted_rand_error']:.4f}")


# --------------------------------------------------------------------------- invariance


def invariance(a):
    import emtile
    from emtile.bench import mirrored_volume
    from skimage.metrics import adapted_rand_error, variation_of_information

    with tempfile.TemporaryDirectory(prefix="emtile-seg-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        if a.pred or a.model:
            src = prediction(a, tmp)
        else:
            src = write_probabilities(tmp / "synthetic.zarr", blurred_truth(a))
        if a.side:
            z = emtile.open_volume(src).shape[0]
            mirrored_volume(tmp / "mirrored.zarr", (z, a.side, a.side), source=src)
            import zarr

            g = zarr.open_group(str(tmp / "mirrored.zarr"), mode="r+")
            g.attrs["emtile"] = dict(g.attrs["emtile"], kind="probabilities")
            src = str(tmp / "mirrored.zarr")
        shape = emtile.open_volume(src).shape
        print(f"prediction {src} {shape}, method {a.method}")
        kw = dict(method=a.method, progress=False, overwrite=True)
        t0 = time.perf_counter()
        emtile.segment(src, tmp / "one.zarr", block_size=shape, **kw)
        print(f"single block: {time.perf_counter() - t0:.1f} s")
        one = read(tmp / "one.zarr")
        for side in (128, 256, 512, 1024):
            t0 = time.perf_counter()
            r = emtile.segment(src, tmp / "b.zarr", block_size=(1, side, side), **kw)
            seg = read(tmp / "b.zarr")
            same = np.array_equal(seg, one)
            are = adapted_rand_error(one.ravel(), seg.ravel(), ignore_labels=())[0]
            voi = sum(variation_of_information(one.ravel(), seg.ravel()))
            print(f"blocks {side:>5} px ({r.blocks:>4} blocks, {time.perf_counter() - t0:6.1f} s): "
                  f"identical {same}, adapted Rand error {are:.6f}, VOI {voi:.6f}")


# --------------------------------------------------------------------------- memory


def run_one(a):
    import emtile
    from emtile.bench import peak_rss

    t0 = time.perf_counter()
    r = emtile.segment(a.volume, a.output, method=a.method, progress=False)
    own, _ = peak_rss()
    return {"seconds": time.perf_counter() - t0, "rss": own, "objects": r.objects,
            "blocks": r.blocks}


def memory(a):
    import shutil

    import zarr

    from emtile.bench import mirrored_volume

    rows = []
    with tempfile.TemporaryDirectory(prefix="emtile-segmem-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        src = a.pred or write_probabilities(tmp / "synthetic.zarr", blurred_truth(a))
        for gb in a.sizes_gb:
            z = max(1, round(gb * 1e9 / a.side**2))
            vol = tmp / f"p-{gb:g}.zarr"
            mirrored_volume(vol, (z, a.side, a.side), source=src)
            g = zarr.open_group(str(vol), mode="r+")
            g.attrs["emtile"] = dict(g.attrs["emtile"], kind="probabilities")
            out = tmp / f"seg-{gb:g}.zarr"
            done = subprocess.run([sys.executable, __file__, "run", "--volume", str(vol),
                                   "--output", str(out), "--method", a.method],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"segment failed:\n{done.stderr}")
            rows.append((gb, z, json.loads(done.stdout.strip().splitlines()[-1])))
            shutil.rmtree(vol, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    print(f"method {a.method}, volumes Z x {a.side} x {a.side} uint8, one subprocess each")
    print(f"{'GB':>6}{'Z':>6}{'blocks':>8}{'objects':>10}{'seconds':>9}{'peak RSS GiB':>14}")
    for gb, z, r in rows:
        print(f"{gb:>6g}{z:>6}{r['blocks']:>8}{r['objects']:>10}{r['seconds']:>9.1f}"
              f"{r['rss'] / 2**30:>14.3f}")
    if len(rows) > 1:
        print(f"peak RSS largest / smallest: {rows[-1][2]['rss'] / rows[0][2]['rss']:.3f} "
              f"(target <= 1.20)")


# --------------------------------------------------------------------------- speed


def speed(a):
    import emtile
    from scipy import ndimage
    from skimage.segmentation import watershed

    with tempfile.TemporaryDirectory(prefix="emtile-seg-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        src = prediction(a, tmp) if (a.pred or a.model) else write_probabilities(
            tmp / "synthetic.zarr", blurred_truth(a))
        p = read(src)
        t0 = time.perf_counter()
        plane = np.zeros((3, 3, 3), bool)
        plane[1] = ndimage.generate_binary_structure(2, 1)
        markers, _ = ndimage.label(p >= round(a.threshold * 255), structure=plane)
        watershed(255 - p, markers, connectivity=plane)
        t_ws = time.perf_counter() - t0
        print(f"prediction {src} {p.shape}; one process")
        print(f"skimage watershed, whole volume in memory: {t_ws:.2f} s")
        for method in ("cc", "ws"):
            t0 = time.perf_counter()
            emtile.segment(src, tmp / "seg.zarr", method=method, threshold=a.threshold,
                           overwrite=True, progress=False)
            t = time.perf_counter() - t0
            print(f"emtile segment --method {method}: {t:.2f} s ({t_ws / t:.2f}x skimage per core)")


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=Path, default=DATA, help="folder with the ISBI 2012 TIFFs")
    common.add_argument("--workdir", type=Path, default=None, help="where temporary stores go")
    common.add_argument("--pred", help="an emtile predict output (probabilities)")
    common.add_argument("--model", help="a model folder: predict the ISBI training stack first")
    common.add_argument("--method", default="ws", choices=["cc", "ws"])
    q = sub.add_parser("quality", parents=[common], help="scores on ISBI slices")
    q.add_argument("--slices", type=lambda s: tuple(int(v) for v in s.split(":")),
                   default=(25, 30), help="slices scored, start:stop")
    q.add_argument("--grid", action="store_true", help="also a small grid of settings")
    q.add_argument("--json", help="write the scores here")
    i = sub.add_parser("invariance", parents=[common], help="blocks against one block")
    i.add_argument("--side", type=int, default=None, help="mirror slices to side x side first")
    m = sub.add_parser("memory", parents=[common], help="peak RSS against volume size")
    m.add_argument("--sizes-gb", type=float, nargs="+", default=[0.4, 4.0])
    m.add_argument("--side", type=int, default=2048, help="slice side (pixels)")
    s = sub.add_parser("speed", parents=[common], help="against skimage watershed")
    s.add_argument("--threshold", type=float, default=0.9)
    r = sub.add_parser("run", parents=[common], help=argparse.SUPPRESS)
    r.add_argument("--volume")
    r.add_argument("--output")
    a = ap.parse_args(argv)
    if a.what == "run":
        print(json.dumps(run_one(a)))
        return
    {"quality": quality, "invariance": invariance, "memory": memory, "speed": speed}[a.what](a)


if __name__ == "__main__":
    main()
