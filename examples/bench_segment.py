"""``emtile segment`` measured: quality on ISBI, block invariance, peak memory, speed.

    python examples/bench_segment.py quality --model runs/isbi/best     # predict, segment, score
    python examples/bench_segment.py quality --pred pred.zarr --grid    # + a small settings grid
    python examples/bench_segment.py invariance --pred pred.zarr        # blocks 128..1024 px
    python examples/bench_segment.py memory --sizes-gb 0.4 4            # peak RSS, one process each
    python examples/bench_segment.py memory3d --model M --raw RAW        # affinities, cube and 8x
    python examples/bench_segment.py speed --pred pred.zarr             # against skimage watershed
    python examples/bench_segment.py throughput --compare OLD_TREE      # Mvoxel/s; 2 workers
    python examples/bench_segment.py records --blocks 100000            # files of pass 2's records
    python examples/bench_segment.py graph --fragments 350000 --reference  # the global step
    python examples/bench_segment.py robust --maps s0=runs/isbi3/seed0/pred.zarr ...  # issue 22

``quality`` scores slices 25-29 (``--slices``) of the ISBI 2012 training stack; ``--grid`` adds
thresholds 0.8, 0.85, 0.9 x merge quantiles 0.25, 0.5 and the mean x merge thresholds 0.2, 0.25,
0.3 (component seeds), cc at the three thresholds, and the defaults before quantile linkage. The
baseline is the challenge's own post-processing: the probability map thresholded at each of 0.0,
0.1, ..., 1.0 (boundaries thinned, ``emtile evaluate --sweep``), best mean V-Rand kept. ``emtile
segment`` (2-D) is scored with the same conventions: truth cells = 4-connected components of the
truth interior, truth membrane left out, predicted 0-pixels inside truth cells count as singletons
(:func:`emtile.metrics.segmentation_stats`). Beside V-Rand and V-Info: VOI split and merge (bits)
and the adapted Rand error with CREMI's conventions (scikit-image's ``variation_of_information``
and ``adapted_rand_error`` on the truth-interior pixels only), per slice, averaged.

``--oracle`` separates the agglomeration's error from the map's: the defaults' fragments (before
any merge) merged by the truth (each fragment joins the truth cell it overlaps most), scored; and
the faces between fragments of at least 300 px, measured by the median boundary probability of
their contacts: how many lie within a cell and how many between cells, the ROC AUC of the median
for telling them apart, and how many faces between cells a merge threshold that joins half the
faces within cells would also join.

``invariance`` segments the prediction with blocks of 128, 256, 512 and 1024 px and compares each
to the single-block run (the whole volume as one block): identical or not, adapted Rand error and
VOI between the two (0 when identical). ``--side 2048`` mirrors the prediction to 2048 x 2048
slices first, so that 1024-px blocks cut it too.

``memory`` mirrors a probability map (the ISBI truth, blurred, or ``--pred``) to volumes of the given
sizes (uint8, Z x side x side) and segments each in its own subprocess; peak RSS should not grow
with the volume (target: within 1.2x).

``memory3d`` (issue 21) does the same for affinities: the raw cube (``--raw``, e.g. FIB-25's 250³
as ``examples/train_fib25.py`` converts it) and the cube mirrored to ``--factor`` times its side on
every axis (2: 8x the voxels) are each predicted with ``--model`` (a 3-D affinity model: the
mirrored volume gets real affinities, not mirrored ones), then segmented with the defaults
(``--seeds``, ``--grow``) in a subprocess each; the peak RSS of the larger should be within 1.2x
the cube's. ``--keep DIR`` keeps the two affinity stores, ``--affinities SMALL LARGE`` segments
stores kept before. ``--repeat N`` segments each N times, interleaved, and compares the median
peaks: with two threads a run's peak depends on whether the threads' largest blocks coincide
(the same stores peaked at 0.60-0.68 and 0.71-0.84 GiB from run to run).

``speed`` times, in one process: scikit-image's ``watershed`` on the whole volume in memory
(markers: components of ``p > threshold``, in-plane connectivity; relief ``1 - p``), and
``emtile segment`` (cc, the same two steps, and ws) from store to store, in this process and on
a local cluster of ``--workers`` worker processes (``--cluster local --cluster-workers 2``; the
cluster's start-up is timed apart, as a cluster that is already running costs nothing to join).
Seconds per core are wall seconds x processes. Targets: emtile at least as fast per core; 1.6x
faster than skimage with 2 workers. ``--blocks-per-task``, ``--block-size`` as the command's.

``throughput`` (issue 23) mirrors a probability map (the ISBI truth, blurred, or ``--pred``) to
``--slices`` x 2048 x 2048 and ``--cluster-slices`` x 2048 x 2048 (uint8), and times ``emtile
segment`` with its defaults, each run in its own subprocess after a warm-up run on a small map
(imports and compiled kernels loaded, on every worker too): the small volume in this process
(blocks in one thread per core), the large one in this process restricted to one core (its CPU
affinity), in this process and on a local cluster of ``--workers`` workers. It prints Mvoxel/s, the
seconds of each pass, and the cluster's speed-up over this process (best of ``--rounds``).
``--compare TREE`` runs every measurement with another checkout's ``emtile/`` too (``git archive
OLD emtile | tar -x -C TREE``), interleaved, so the ratios are from one run. Targets: at least 10
Mvoxel/s on 8 x 2048 x 2048, and the 2-worker cluster at least 1.6x one process on one core on 64 x
2048 x 2048 (the issue's "one process" ran its blocks on one core; now a process uses every core,
so it is also printed against that). The cluster's driver is warmed up too (its own passes: the
map's histogram, the global step); ``--blocks-per-task`` sets the cluster runs' option.

``records`` writes the per-block records of pass 2 for a synthetic plan of ``--blocks`` blocks
(``--rows`` fragments a block; edges and face pairs in proportion) the way the driver does
(:mod:`emtile.segmenter.records`: parts of up to 1024 blocks; ``--per-part`` fewer, as when blocks
arrive slower than the driver's 2-s flush), reads them back a row of ``--row`` blocks at a time,
and counts the files; ``--layout per-block`` writes them as before version 2 (one array per block).

``graph`` times the global step (:func:`emtile.segmenter.graph.number_objects`: faces joined,
agglomeration at 0.5, ``min_size`` 60, numbering) on a random planar-like region graph of
``--fragments`` fragments with ``--faces`` faces each (about), in a subprocess, with the peak
memory it adds to what the records themselves take; ``--reference`` also times the Python
definition (:class:`~emtile.segmenter.graph.RegionGraph`) on the same graph.

``robust`` (issue 22) takes probability stores of the ISBI stack (``--maps NAME=PATH ...``; a
store of slices 25-29 alone, as ``examples/train_isbi.py`` writes them, is read whole), and for
each map and its monotone recalibrations ``p -> p ** gamma`` (``--gammas``, uint8 levels) scores
the best threshold of the grid 0.0..1.0 and ``emtile segment``'s defaults (and ``--also`` JSON
settings, e.g. ``'{"calibrate": "none"}'``); target: defaults >= best threshold - 0.002.
``--truth STORE --slices A:B`` scores another binary truth (1 = interior), e.g. FIB-25's 2-D
boundaries. ``reference`` prints the pooled levels of the maps at 64 steps of rank: the table of
:mod:`emtile.segmenter.levels`.

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
        split, merge = variation_of_information(ts, ps)  # H(seg|truth), H(truth|seg)
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
        full, whole = truth(a), read(pred_path)
        if whole.shape != full.shape:
            sys.exit(f"the prediction {pred_path} has shape {whole.shape}, the ISBI labels "
                     f"{full.shape}: give a prediction of the whole training stack (or --model)")
        t, p = full[z0:z1], whole[z0:z1]
        base = thresholded_scores(p, t)
        print(f"prediction {pred_path}, slices {z0}:{z1}")
        print(f"thresholded (best of 0.0..1.0 at {base['threshold']:g}): " + fmt(base))
        settings = [{}]
        if a.grid:
            settings += [dict(threshold=th, merge_threshold=m, merge_quantile=q)
                         for th in (0.8, 0.85, 0.9) for q in (0.25, 0.5, None)
                         for m in (0.2, 0.25, 0.3)]
            settings += [dict(method="cc", threshold=th) for th in (0.8, 0.85, 0.9)]
            settings += [dict(seeds="distance", threshold=0.7, merge_threshold=0.3,
                              merge_quantile=None, grow=16)]  # the defaults before quantiles
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
        out = {"thresholded": base, "segment": rows}
        if a.oracle:
            out["oracle"] = oracle(pred_path, tmp, (z0, z1), p, t)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2, default=float))


def oracle(pred_path, tmp, slices, p, t, *, min_px=300):
    """How much of the error is the agglomeration's, and how much the map's.

    The fragments are the defaults' before any merge (cc at the default threshold, no
    ``min_size``). Each is given the truth cell it overlaps most, and fragments given one cell
    are merged: about the best an agglomeration of these fragments could score (this one may
    also join fragments of a cell that do not touch). Then each face between two
    fragments whose smaller side has at least ``min_px`` pixels is measured by the median, over
    its contacts (4-neighbour pixel pairs of the two fragments), of the higher boundary
    probability of the pair, and labelled by the truth (same cell or not); the ROC AUC of that
    measure says how well any threshold on it can tell the merges to make from those to avoid.
    """
    from sklearn.metrics import roc_auc_score

    import emtile
    from emtile.metrics import truth_segments
    from emtile.settings import SegmentSettings

    emtile.segment(pred_path, tmp / "fragments.zarr", method="cc", min_size=0,
                   threshold=SegmentSettings().threshold, overwrite=True, progress=False)
    frag = read(tmp / "fragments.zarr")[slice(*slices)]
    q = 1 - (p.astype(np.float64) / (255 if p.dtype == np.uint8 else 1))
    merged, medians, same = np.zeros_like(frag, dtype=np.int64), [], []
    for z in range(len(t)):
        f, ts = frag[z].astype(np.int64), truth_segments(t[z])
        inside = (f > 0) & (ts > 0)
        n = int(f.max()) + 1
        overlap = np.bincount(f[inside] * (ts.max() + 1) + ts[inside],
                              minlength=n * (ts.max() + 1)).reshape(n, -1)
        cell = overlap.argmax(1)  # 0 only where a fragment overlaps no truth cell: its own
        cell = np.where(cell > 0, cell, np.arange(n) + ts.max() + 1)
        cell[0] = 0
        merged[z] = cell[f]
        sizes = np.bincount(f.ravel(), minlength=n)
        u, v, e = [], [], []
        for x, y, qx, qy in ((f[:, :-1], f[:, 1:], q[z][:, :-1], q[z][:, 1:]),
                             (f[:-1], f[1:], q[z][:-1], q[z][1:])):
            d = (x != y) & (x > 0) & (y > 0)
            u.append(np.minimum(x[d], y[d]))
            v.append(np.maximum(x[d], y[d]))
            e.append(np.maximum(qx[d], qy[d]))
        u, v, e = np.concatenate(u), np.concatenate(v), np.concatenate(e)
        order = np.lexsort((e, v, u))
        key = (u * n + v)[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        counts = np.diff(np.r_[starts, key.size])
        fu, fv = u[order][starts], v[order][starts]
        keep = np.minimum(sizes[fu], sizes[fv]) >= min_px
        medians.append(e[order][starts + (counts - 1) // 2][keep])  # lower median
        same.append((cell[fu] == cell[fv])[keep])
    medians, same = np.concatenate(medians), np.concatenate(same)
    s = segmentation_scores(merged, t)
    auc = float(roc_auc_score(same, -medians)) if 0 < same.sum() < same.size else float("nan")
    half = float(np.median(medians[same])) if same.any() else float("nan")
    out = {"v_rand_oracle": s["v_rand"], "faces_same": int(same.sum()),
           "faces_different": int((~same).sum()), "auc_median": auc,
           "half_same_at": half, "different_merged_at_half": int((~same & (medians <= half)).sum())}
    print(f"oracle: the defaults' fragments merged by the truth: V-Rand {s['v_rand']:.4f} "
          f"(what a perfect agglomeration of them would score)")
    print(f"faces of >= {min_px}-px fragments: {out['faces_same']} within a cell, "
          f"{out['faces_different']} between cells; ROC AUC of the face median {auc:.3f}; merging "
          f"faces up to {half:.3f} joins half of the first and {out['different_merged_at_half']} "
          f"of the second")
    return out


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
    r = emtile.segment(a.volume, a.output, method=a.method, seeds=a.seeds, grow=a.grow,
                       progress=False)
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


def memory3d(a):
    import shutil

    import emtile
    from emtile.bench import mirrored_volume

    if not (a.model and a.raw) and not a.affinities:
        sys.exit("memory3d needs --model (a 3-D affinity model) and --raw (a Z, Y, X volume), "
                 "or --affinities SMALL LARGE")
    if a.keep:
        Path(a.keep).mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="emtile-segmem3-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        for k, factor in enumerate((1, a.factor)):
            t0 = time.perf_counter()
            if a.affinities:  # predicted before (keep them with --keep)
                aff = Path(a.affinities[k])
                shape = emtile.open_volume(aff).shape[1:]
            else:
                raw = emtile.open_volume(a.raw)
                shape = tuple(n * factor for n in raw.shape)
                vol = tmp / f"raw-{factor}.zarr"
                mirrored_volume(vol, shape, source=a.raw)
                aff = (Path(a.keep) if a.keep else tmp) / f"aff-{factor}.zarr"
                emtile.predict(a.model, vol, aff, tile="auto", progress=False, overwrite=True)
                shutil.rmtree(vol, ignore_errors=True)
            rows.append((shape, time.perf_counter() - t0, aff, []))
        for _ in range(a.repeat):  # interleaved: both volumes see the same machine
            for shape, _, aff, runs in rows:
                out = tmp / "seg.zarr"
                grow = ["--grow", str(a.grow)] if a.grow else []
                done = subprocess.run([sys.executable, __file__, "run", "--volume", str(aff),
                                       "--output", str(out), "--method", a.method,
                                       "--seeds", a.seeds, *grow], capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"segment failed:\n{done.stderr}")
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                shutil.rmtree(out, ignore_errors=True)
    print(f"method {a.method}, seeds {a.seeds}, grow {a.grow or 'default'}, affinities of "
          f"{a.model or a.affinities}; one subprocess per run, {a.repeat} run(s) each")
    print(f"{'shape':>16}{'predict s':>11}{'blocks':>8}{'objects':>10}{'segment s':>11}"
          f"{'peak RSS GiB (median)':>23}  each run")
    for shape, predicted, _, runs in rows:
        r = runs[0]
        peaks = [x["rss"] / 2**30 for x in runs]
        print(f"{'x'.join(map(str, shape)):>16}{predicted:>11.1f}{r['blocks']:>8}"
              f"{r['objects']:>10}{np.median([x['seconds'] for x in runs]):>11.1f}"
              f"{np.median(peaks):>23.3f}  {' '.join(f'{v:.3f}' for v in peaks)}")
    ratio = (np.median([x["rss"] for x in rows[-1][3]])
             / np.median([x["rss"] for x in rows[0][3]]))
    print(f"peak RSS largest / smallest (medians): {ratio:.3f} (target <= 1.20)")


# --------------------------------------------------------------------------- speed


def speed(a):
    import emtile
    from emtile.distributed import start_cluster
    from scipy import ndimage
    from skimage.segmentation import watershed

    with tempfile.TemporaryDirectory(prefix="emtile-seg-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        src = prediction(a, tmp) if (a.pred or a.model) else write_probabilities(
            tmp / "synthetic.zarr", blurred_truth(a))
        p = read(src)
        if a.slices:
            p = p[a.slices[0]:a.slices[1]]
            src = write_probabilities(tmp / "slices.zarr", p)
        warm = write_probabilities(tmp / "warm.zarr", np.ascontiguousarray(p[:1, :64, :64]))
        t0 = time.perf_counter()
        plane = np.zeros((3, 3, 3), bool)
        plane[1] = ndimage.generate_binary_structure(2, 1)
        markers, _ = ndimage.label(p > a.threshold * 255, structure=plane)
        watershed(255 - p, markers, connectivity=plane)
        t_ws = time.perf_counter() - t0
        print(f"prediction {src} {p.shape}")
        print(f"skimage watershed, whole volume in memory, one process: {t_ws:.2f} s")
        kw = dict(threshold=a.threshold, overwrite=True, progress=False,
                  block_size=a.block_size, blocks_per_task=a.blocks_per_task)

        def timed(label, processes, **more):
            for method in ("cc", "ws"):
                emtile.segment(warm, tmp / "warm-seg.zarr", method=method, overwrite=True,
                               progress=False, **more)  # imports, compiled kernels loaded
                t0 = time.perf_counter()
                r = emtile.segment(src, tmp / "seg.zarr", method=method, **kw, **more)
                t = time.perf_counter() - t0
                print(f"emtile segment --method {method}{label}: {t:.2f} s, {r.blocks} blocks of "
                      f"{'x'.join(map(str, r.block))} ({t_ws / t:.2f}x skimage; per core "
                      f"{t_ws / (t * processes):.2f}x)")

        from emtile._process import usable_cores

        timed(f", this process ({usable_cores()} threads)", usable_cores())
        t0 = time.perf_counter()
        with start_cluster("local", workers=a.workers) as (client, info):
            for method in ("cc", "ws"):  # every worker: imports, compiled kernels loaded
                client.run(warm_up, warm, str(tmp / "warm-worker"), method)
            print(f"local cluster of {a.workers} workers started and warmed up in "
                  f"{time.perf_counter() - t0:.1f} s (not counted below)")
            timed(f" --cluster local --cluster-workers {a.workers}", a.workers, client=client)


def warm_up(warm, prefix, method):
    """Segment the small volume ``warm`` in this process (a worker's, through ``client.run``):
    the warm-up run on the cluster is one block, so it would load the kernels on one worker."""
    import os

    import emtile

    emtile.segment(warm, f"{prefix}-{os.getpid()}.zarr", method=method, overwrite=True,
                   progress=False)


# --------------------------------------------------------------------------- throughput


def throughput_one(a):
    """In a subprocess (``run-throughput``): warm up, then time one segment run."""
    import os

    import emtile
    from emtile.bench import peak_rss

    def warm(prefix):
        emtile.segment(a.warm, f"{prefix}-{os.getpid()}.zarr", overwrite=True, progress=False)

    if a.workers:
        from emtile.distributed import start_cluster

        with start_cluster("local", workers=a.workers) as (client, info):
            client.run(warm, a.output + "-warm")
            warm(a.output + "-warm-driver")  # the driver's own passes (histogram, global step)
            t0 = time.perf_counter()
            per = {} if a.blocks_per_task is None else {"blocks_per_task": a.blocks_per_task}
            r = emtile.segment(a.volume, a.output, client=client, progress=False, **per)
            seconds = time.perf_counter() - t0
    else:
        warm(a.output + "-warm")
        t0 = time.perf_counter()
        r = emtile.segment(a.volume, a.output, progress=False)
        seconds = time.perf_counter() - t0
    own, _ = peak_rss()
    return {"seconds": seconds, "voxels": int(np.prod(r.shape)), "objects": r.objects,
            "blocks": r.blocks, "rss": own, "passes": getattr(r, "pass_seconds", None)}


def throughput(a):
    import os
    import shutil

    import zarr

    from emtile.bench import mirrored_volume

    trees = [("this", None)] + ([("other", str(Path(a.compare).resolve()))] if a.compare else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="emtile-segtput-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        src = a.pred or write_probabilities(tmp / "synthetic.zarr", blurred_truth(a))
        volumes = {}
        for key, shape in [("warm", (1, 256, 256))] + [(z, (z, 2048, 2048)) for z in
                                                        sorted({a.slices, a.cluster_slices})]:
            vol = tmp / f"p-{'x'.join(map(str, shape))}.zarr"
            mirrored_volume(vol, shape, source=src)
            g = zarr.open_group(str(vol), mode="r+")
            g.attrs["emtile"] = dict(g.attrs["emtile"], kind="probabilities")
            volumes[key] = vol
        # workers: 0 = this process (blocks in one thread per core), -1 = this process on one
        # core (its affinity set to it: one thread), N = a local cluster of N workers
        runs = list(dict.fromkeys([(a.slices, 0), (a.cluster_slices, -1), (a.cluster_slices, 0),
                                   (a.cluster_slices, a.workers)]))
        print(f"load average before: {os.getloadavg()}", flush=True)
        for z, workers in [run for _ in range(a.rounds) for run in runs]:
            for name, tree in trees:
                env = dict(os.environ)
                if tree:
                    env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
                out = tmp / f"seg-{name}-{z}-{workers}.zarr"
                one_core = workers < 0 and hasattr(os, "sched_setaffinity")
                done = subprocess.run(
                    [sys.executable, __file__, "run-throughput", "--volume", str(volumes[z]),
                     "--output", str(out), "--warm", str(volumes["warm"]),
                     "--workers", str(max(0, workers))]
                    + (["--blocks-per-task", str(a.blocks_per_task)] if a.blocks_per_task else []),
                    capture_output=True, text=True,
                    env=env, cwd=tree or None,
                    preexec_fn=(lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
                    if one_core else None)
                if done.returncode:
                    sys.exit(f"segment failed ({name}):\n{done.stderr[-3000:]}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append((name, z, workers, r))
                where = {0: "this process", -1: "one core"}.get(workers, f"{workers} workers")
                print(f"{name:>6} {z:>3} x 2048^2 {where:>13}: {r['seconds']:7.2f} s "
                      f"{r['voxels'] / r['seconds'] / 1e6:6.2f} Mvoxel/s  {r['blocks']} blocks "
                      f"{r['objects']} objects  peak RSS {r['rss'] / 2**30:.2f} GiB"
                      + (f"  passes {r['passes']}" if r["passes"] else ""), flush=True)
                shutil.rmtree(out, ignore_errors=True)
        print(f"load average after: {os.getloadavg()}")
    best = {}  # (tree, slices, workers) -> the best seconds of the rounds
    for n, z, w, r in rows:
        best[n, z, w] = min(best.get((n, z, w), np.inf), r["seconds"])
    for name, _ in trees:
        t = {(z, w): v for (n, z, w), v in best.items() if n == name}
        c = t[(a.cluster_slices, a.workers)]
        print(f"{name}, {a.cluster_slices} slices: cluster of {a.workers} / this process on one "
              f"core {t[(a.cluster_slices, -1)] / c:.2f}x (target >= 1.6); / this process "
              f"(every core) {t[(a.cluster_slices, 0)] / c:.2f}x")
    if a.compare:
        for z, w in sorted({(z, w) for _, z, w, _ in rows}):
            t = {n: v for (n, zz, ww), v in best.items() if (zz, ww) == (z, w)}
            where = {0: "this process", -1: "one core"}.get(w, f"{w} workers")
            print(f"this / other, {z} slices, {where}: {t['other'] / t['this']:.2f}x faster")


# --------------------------------------------------------------------------- records


def synthetic_record(rng, rows):
    """A record shaped like a block's: ``rows`` fragments, 3 edges and 1 face pair per fragment."""
    from emtile.segmenter.records import pack

    k = int(rng.integers(rows // 2, rows + rows // 2 + 1))
    return pack(pairs=rng.integers(0, 2**40, (k, 2)), stats=rng.integers(0, 2**40, (k, 3)),
                edges=rng.integers(0, 2**40, (3 * k, 5)))


def write_per_block(group, i, record):
    """The layout before version 2: one array (zarr.json + one chunk file) per block."""
    rows, flat = record
    arr = group.create_array(f"records/{i}", shape=(max(1, flat.size),), dtype="int64",
                             chunks=(max(1, flat.size),), overwrite=True, compressors=None)
    arr[:] = flat
    arr.attrs["rows"] = list(rows)


def records(a):
    import os

    import zarr

    from emtile.segmenter.records import PART_BLOCKS, RecordStore

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="emtile-rec-", dir=a.workdir) as tmp:
        group = zarr.open_group(str(Path(tmp) / "temp"), mode="w", zarr_format=3)
        t0 = time.perf_counter()
        if a.layout == "per-block":
            for i in range(a.blocks):
                write_per_block(group, i, synthetic_record(rng, a.rows))
        else:
            store = RecordStore.create(group, a.blocks)
            per = min(a.per_part or PART_BLOCKS, PART_BLOCKS)
            order = rng.permutation(a.blocks) if a.shuffle else np.arange(a.blocks)
            for lo in range(0, a.blocks, per):
                store.write({int(i): synthetic_record(rng, a.rows) for i in order[lo:lo + per]})
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_stats = 0
        if a.layout != "per-block":
            store = RecordStore.open(group, a.blocks)
            for lo in range(0, a.blocks, a.row):
                n_stats += len(store.read(range(lo, min(lo + a.row, a.blocks)))[1])
        t_read = time.perf_counter() - t0
        files = size = 0
        for root, _, names in os.walk(Path(tmp) / "temp" / "records"):
            files += len(names)
            size += sum(os.path.getsize(Path(root) / n) for n in names)
    print(f"{a.blocks} blocks, layout {a.layout}: {files} files, {size / 2**20:.1f} MiB, "
          f"write {t_write:.1f} s" + (f", read back by rows of {a.row} blocks {t_read:.1f} s "
                                      f"({n_stats} fragment rows)" if n_stats else ""))


# --------------------------------------------------------------------------- graph


def random_region_graph(n, faces, seed=0):
    """A planar-like region graph: objects on a grid, ``faces`` faces per object (about) to
    objects up to a few grid steps away; random sums (10% without evidence), sizes, first
    pixels. Returns ``(first, size, edges)`` as :class:`RegionGraph` takes them."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    idx = np.arange(n)
    offsets = [1, side, side + 1, side - 1, 2, 2 * side][:max(1, int(np.ceil(faces)))]
    u, v = [], []
    for k, off in enumerate(offsets):
        ok = (idx + off < n) & (rng.random(n) < min(1.0, faces - k))
        u.append(idx[ok])
        v.append(idx[ok] + off)
    u, v = np.concatenate(u), np.concatenate(v)
    c = rng.integers(1, 40, u.size)
    c[rng.random(u.size) < 0.1] = 0
    s = c * rng.integers(0, 256, u.size)
    t = c + rng.integers(0, 5, u.size)
    return (rng.permutation(4 * n)[:n], rng.integers(1, 200, n),
            np.stack([u, v, s, c, t], axis=1).astype(np.int64))


def graph_one(a):
    """In a subprocess: the global step on a random graph; seconds and peak memory added."""
    from emtile.bench import peak_rss
    from emtile.segmenter.graph import RegionGraph, number_objects

    first, size, edges = random_region_graph(a.fragments, a.faces)
    n = first.size
    stats = np.stack([np.arange(1, n + 1), size, first], axis=1).astype(np.int64)
    records = edges.copy()
    records[:, :2] += 1  # ids 1..n, 0 is background
    pairs = np.zeros((0, 2), np.int64)
    number_objects(3, pairs, stats[:2], records[:0], merge_threshold=0.5, min_size=60)  # compile
    before = peak_rss()[0]
    t0 = time.perf_counter()
    number, count = number_objects(n + 1, pairs, stats, records, merge_threshold=0.5,
                                   min_size=60)
    out = {"fragments": n, "faces": int(edges.shape[0]), "seconds": time.perf_counter() - t0,
           "objects": count, "peak_added": peak_rss()[0] - before,
           "records_bytes": int(stats.nbytes + records.nbytes)}
    if a.reference:
        t0 = time.perf_counter()
        g = RegionGraph(first, size, edges)
        g.agglomerate(0.5)
        g.absorb_small(60)
        ids, ref_count = g.final_ids()
        out["reference_seconds"] = time.perf_counter() - t0
        out["identical"] = bool(ref_count == count and np.array_equal(number[1:], ids))
    return out


def graph(a):
    cmd = [sys.executable, __file__, "graph-one", "--fragments", str(a.fragments), "--faces",
           str(a.faces)] + (["--reference"] if a.reference else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"graph failed:\n{done.stderr}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{r['fragments']} fragments, {r['faces']} faces -> {r['objects']} objects: "
          f"{r['seconds']:.2f} s compiled")
    if "reference_seconds" in r:
        print(f"Python definition (RegionGraph): {r['reference_seconds']:.2f} s, identical "
              f"{r['identical']}")
    print(f"records {r['records_bytes'] / r['fragments']:.0f} B per fragment; peak memory added "
          f"by the global step {r['peak_added'] / r['fragments']:.0f} B per fragment "
          f"({r['peak_added'] / 2**20:.0f} MiB)")


# --------------------------------------------------------------------------- robust (issue 22)


def map_slices(path, slices):
    """uint8 levels of ``slices`` (start, stop) of a probability store of the ISBI stack (30
    slices) or of those slices alone (the recipe's predictions)."""
    p = read(path)
    if p.shape[0] != slices[1] - slices[0]:
        p = p[slices[0]:slices[1]]
    if p.dtype != np.uint8:
        p = np.clip(np.rint(p.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return p


def recalibrated(p, gamma):
    """``p -> p ** gamma`` on uint8 levels (a model more or less sure of itself)."""
    return np.clip(np.rint(255 * (p / 255.0) ** gamma), 0, 255).astype(np.uint8)


def robust(a):
    """Each map (``--maps NAME=PATH ...``) of slices ``--slices`` and its recalibrations
    ``p ** gamma`` (``--gammas``): the best threshold of the map against ``emtile segment``'s
    defaults (and ``--also`` settings); the target: defaults >= best threshold - 0.002."""
    import emtile

    z0, z1 = a.slices
    truth_ = (read(a.truth) if a.truth else truth(a))[z0:z1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="emtile-robust-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        for spec in a.maps:
            name, path = spec.split("=", 1)
            base_map = map_slices(path, (z0, z1))
            for gamma in a.gammas:
                p = base_map if gamma == 1 else recalibrated(base_map, gamma)
                pred = write_probabilities(tmp / f"{name}-{gamma:g}.zarr", p)
                best = thresholded_scores(p, truth_)
                row = {"map": name, "gamma": gamma, "best_threshold": best["threshold"],
                       "best_v_rand": best["v_rand"]}
                for label, kw in [("defaults", {})] + [(x, json.loads(x)) for x in a.also]:
                    t0 = time.perf_counter()
                    r = emtile.segment(pred, tmp / "s.zarr", overwrite=True, progress=False,
                                       **kw)
                    sc = segmentation_scores(read(tmp / "s.zarr"), truth_)
                    row[label] = {**sc, "objects": r.objects,
                                  "seconds": time.perf_counter() - t0,
                                  "warnings": r.report.warnings() if r.report else []}
                row["margin"] = row["defaults"]["v_rand"] - best["v_rand"]
                row["meets"] = row["margin"] >= -0.002
                rows.append(row)
                extra = "".join(f", {k} {row[k]['v_rand']:.4f}" for k in a.also)
                print(f"{name} p^{gamma:g}: best threshold {best['v_rand']:.4f} at "
                      f"{best['threshold']:g}; defaults {row['defaults']['v_rand']:.4f} "
                      f"({row['margin']:+.4f}, {'meets' if row['meets'] else 'MISSES'} the "
                      f"target){extra}", flush=True)
                for w in row["defaults"]["warnings"]:
                    print("   ", w)
    met = sum(r["meets"] for r in rows)
    print(f"{met} of {len(rows)} maps meet defaults >= best threshold - 0.002")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2, default=float) + "\n")


def reference(a):
    """The reference levels of :mod:`emtile.segmenter.levels`: the pooled histogram of the maps
    (``--maps NAME=PATH``, slices ``--slices``), as levels at 64 equal steps of rank."""
    from emtile.segmenter.levels import reference_from

    counts = np.zeros(256, np.int64)
    for spec in a.maps:
        counts += np.bincount(map_slices(spec.split("=", 1)[-1], a.slices).ravel(),
                              minlength=256)
    print(json.dumps(reference_from(counts).tolist()))


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
    common.add_argument("--seeds", default="components", choices=["components", "distance"])
    common.add_argument("--grow", type=int, default=None, help="segment's grow (default: its own)")
    q = sub.add_parser("quality", parents=[common], help="scores on ISBI slices")
    q.add_argument("--slices", type=lambda s: tuple(int(v) for v in s.split(":")),
                   default=(25, 30), help="slices scored, start:stop")
    q.add_argument("--grid", action="store_true", help="also a small grid of settings")
    q.add_argument("--json", help="write the scores here")
    q.add_argument("--oracle", action="store_true",
                   help="also the score of the fragments merged by the truth, and how well the "
                        "map's faces tell merges apart")
    i = sub.add_parser("invariance", parents=[common], help="blocks against one block")
    i.add_argument("--side", type=int, default=None, help="mirror slices to side x side first")
    m = sub.add_parser("memory", parents=[common], help="peak RSS against volume size")
    m.add_argument("--sizes-gb", type=float, nargs="+", default=[0.4, 4.0])
    m.add_argument("--side", type=int, default=2048, help="slice side (pixels)")
    m3 = sub.add_parser("memory3d", parents=[common], help="peak RSS, affinities of a cube and "
                        "of the cube mirrored")
    m3.add_argument("--raw", help="a (Z, Y, X) raw volume, e.g. runs/fib25/raw.zarr")
    m3.add_argument("--factor", type=int, default=2, help="mirrored to this many times each side")
    m3.add_argument("--keep", help="keep the predicted affinities in this folder")
    m3.add_argument("--affinities", nargs=2, metavar=("SMALL", "LARGE"),
                    help="affinity stores predicted before (--keep): segment only")
    m3.add_argument("--repeat", type=int, default=1,
                    help="segment each store this many times (interleaved); the medians are "
                         "compared (two threads' peaks coincide or not from run to run)")
    s = sub.add_parser("speed", parents=[common], help="against skimage watershed")
    s.add_argument("--threshold", type=float, default=0.9)
    s.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    s.add_argument("--block-size", type=lambda t: tuple(int(v) for v in t.split(",")),
                   default=None, help="Z,Y,X (default: the command's)")
    s.add_argument("--blocks-per-task", type=int, default=1)
    s.add_argument("--slices", type=lambda t: tuple(int(v) for v in t.split(":")), default=None,
                   help="only these slices, start:stop (a quick check)")
    rec = sub.add_parser("records", parents=[common], help="files of pass 2's records")
    rec.add_argument("--blocks", type=int, default=100_000)
    rec.add_argument("--rows", type=int, default=20, help="fragments per block, about")
    rec.add_argument("--layout", choices=["grouped", "per-block"], default="grouped")
    rec.add_argument("--per-part", type=int, default=None, help="blocks per part (at most 1024)")
    rec.add_argument("--shuffle", action="store_true", help="blocks finish in random order")
    rec.add_argument("--row", type=int, default=100, help="blocks read back at once")
    for name in ("graph", "graph-one"):
        g = sub.add_parser(name, parents=[common], help="the global step on a random graph"
                           if name == "graph" else argparse.SUPPRESS)
        g.add_argument("--fragments", type=int, default=350_000)
        g.add_argument("--faces", type=float, default=2.3, help="faces per fragment, about")
        g.add_argument("--reference", action="store_true", help="also the Python definition")
    for name in ("robust", "reference"):
        rb = sub.add_parser(name, parents=[common], help="defaults against the best threshold "
                            "on several maps" if name == "robust" else "the reference levels")
        rb.add_argument("--maps", nargs="+", required=True, metavar="NAME=PATH",
                        help="probability stores of the ISBI stack (or of --slices alone)")
        rb.add_argument("--slices", type=lambda t: tuple(int(v) for v in t.split(":")),
                        default=(25, 30), help="slices scored, start:stop")
        rb.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.5, 2.0])
        rb.add_argument("--truth", help="binary truth store (1 = interior) instead of the ISBI "
                        "labels, e.g. FIB-25's 2-D boundaries")
        rb.add_argument("--also", nargs="*", default=[], metavar="JSON",
                        help='other settings to score, e.g. \'{"calibrate": "none"}\'')
        rb.add_argument("--json", help="write the rows here")
    tp = sub.add_parser("throughput", parents=[common], help="Mvoxel/s, here and on a cluster")
    tp.add_argument("--slices", type=int, default=8)
    tp.add_argument("--cluster-slices", type=int, default=64)
    tp.add_argument("--workers", type=int, default=2)
    tp.add_argument("--compare", help="another checkout's tree (holding emtile/)")
    tp.add_argument("--rounds", type=int, default=1, help="rounds of every run (best kept)")
    tp.add_argument("--blocks-per-task", type=int, default=None,
                    help="blocks per Dask task of the cluster runs (default: the command's)")
    rt = sub.add_parser("run-throughput", parents=[common], help=argparse.SUPPRESS)
    rt.add_argument("--blocks-per-task", type=int, default=None)
    rt.add_argument("--volume")
    rt.add_argument("--output")
    rt.add_argument("--warm")
    rt.add_argument("--workers", type=int, default=0)
    r = sub.add_parser("run", parents=[common], help=argparse.SUPPRESS)
    r.add_argument("--volume")
    r.add_argument("--output")
    a = ap.parse_args(argv)
    if a.what in ("run", "graph-one", "run-throughput"):
        one = {"run": run_one, "graph-one": graph_one, "run-throughput": throughput_one}
        print(json.dumps(one[a.what](a)))
        return
    {"quality": quality, "invariance": invariance, "memory": memory, "memory3d": memory3d,
     "speed": speed,
     "records": records, "graph": graph, "robust": robust, "reference": reference,
     "throughput": throughput}[a.what](a)


if __name__ == "__main__":
    main()
