"""The FIB-25 recipe: neurons segmented in 3-D from a 3-D U-Net's affinities, against the 2-D
baseline (a boundary model trained slice by slice, then ``segment --mode 3d``), scored by VOI on
the held-out z 150:250, for one seed or several.

    .venv/bin/python examples/train_fib25.py                      # seed 0, both pipelines
    .venv/bin/python examples/train_fib25.py --seeds 0,1 --out runs/fib25
    .venv/bin/python examples/train_fib25.py --only 2d            # the baseline alone

The data (``../shared/data/fib25``, or ``--data`` / ``EMTILE_FIB25_DIR``): a 250^3 FIB-SEM cube
at 10 nm with dense neuron ids. Its README's split: labels of z 0:150 train (here z 0:120 train
and z 120:150 validate), z 150:250 is scored; raw context is read across the split, as at
prediction time.

Both pipelines train a fixed number of iterations with a fixed number of torch threads
(``--threads``, 2) and a pinned precision (bf16 for 2-D, float32 for 3-D), so every machine
computes the same run; the budget (``--minutes``, per seed, both pipelines) is a check, not a
knob.

1. ``emtile.convert`` raw (voxel size 10 nm) and the ids (``ids=True``); boundary labels for
   the 2-D baseline (interior: a labelled voxel whose four in-plane neighbours carry its id);
2. 3-D: ``emtile.train`` (``ndim=3, target="affinities"``: :data:`SETTINGS_3D`) on z 0:120,
   validated by VOI on z 120:150; ``emtile.predict`` z 120:150 and z 150:250 (affinity stores);
3. 2-D baseline: the ISBI recipe's settings (:data:`SETTINGS_2D`) on the boundary labels,
   predicted the same way;
4. each pipeline's segmentation (``emtile.segment``: fragments, region graph, agglomeration for
   affinities; ``mode="3d"`` for the 2-D maps) with the seed and merge thresholds of lowest VOI
   on z 120:150 (:data:`GRID_THRESHOLDS` x :data:`GRID_MERGE`, and for affinities both
   :data:`GRID_SEEDS`; affinities re-cut the stored
   graph, ``recut=``), then z 150:250 segmented with them and scored: VOI split / merge and the
   adapted Rand error over the whole block (truth 0 left out); for affinities also the fragments
   merged by the truth (each fragment given the truth id it overlaps most), the bound the
   agglomeration could reach.

Writes ``OUT/seed<N>/report_3d.json`` and ``report_2d.json`` per seed (a report that exists is
not computed again; ``--overwrite`` does) and ``OUT/summary.json`` / ``OUT/summary.md``. With
``--tta`` the same trained models predict with test-time augmentation (3-D: the mean over the
six exchanges of the axes, on cubic tiles) and everything after is named ``..._tta``.
Targets (issue 21, VOI split + merge in bits): the 3-D pipeline at most 0.7x the 2-D baseline's
and at most 1.0, for every seed.
"""

import argparse
import ast
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from emtile.settings import SegmentSettings
from emtile.training.settings import TrainSettings

DATA = Path(os.environ.get("EMTILE_FIB25_DIR", Path(__file__).resolve().parents[1].parent
                           / "shared" / "data" / "fib25"))
VOXEL_SIZE = (10, 10, 10)
TRAIN, VAL, TEST = slice(0, 120), slice(120, 150), slice(150, 250)
THREADS = 2
TARGETS = {"ratio_to_2d": 0.7, "voi": 1.0}

#: The 3-D recipe: a small anisotropy-free network (10 nm isotropic: factors 2,2,2 twice), 72^3
#: tiles (32^3 outputs), 4,000 steps (21 minutes on 2 quiet cores; 1,500 steps scored 2.2-2.5
#: bits of VOI, 4,000 steps 1.9: README), float32 (bf16 was not faster for these 3-D
#: convolutions).
SETTINGS_3D = TrainSettings(train_slices=TRAIN, val_slices=VAL, ndim=3, target="affinities",
                            base=8, depth=2, factors="2,2,2;2,2,2", tile=72, iterations=4000,
                            val_every=500, amp="off", seed=0)
#: The 2-D baseline: the ISBI recipe's settings (``emtile train``'s defaults), with a tile whose
#: output nearly covers a 250^2 slice (428 -> 244: training needs it inside the slice) and a
#: schedule scaled to the slices' area (250^2 vs 512^2: 2,000 steps instead of 3,800).
SETTINGS_2D = TrainSettings(train_slices=TRAIN, val_slices=VAL, tile=428, iterations=2000,
                            amp="bf16", seed=0)
#: Segmentation of each pipeline: the defaults, with the seed threshold and the merge threshold
#: chosen on the validation slices z 120:150 (never on the scored ones) from this grid.
#: grow is pinned at 32, the value the README's results were tuned with (4, the default for
#: affinities since, scored 1.877 against 1.898 on seed 0's 4,000-step test block at its tuned
#: thresholds; not tuned again). A face is scored by the first quartile of its pairs'
#: 1 - affinity (the 75th percentile of the affinities, MALA's and lsd's linkage): tuned the
#: same way, it beat the median (emtile's default, chosen on ISBI's 2-D maps) on both seeds,
#: with and without --tta, by 0.04-0.13 bits (README, "3-D").
SEGMENT_3D = SegmentSettings(grow=32, merge_quantile=0.25)
#: ``--tta``: the 3-D model's tiles are cubes (an axis exchange needs equal sizes) of the
#: largest size up to this that the network takes (164 -> 124 for the recipe's)
TTA_TILE = 164
SEGMENT_2D = SegmentSettings(mode="3d")
GRID_THRESHOLDS = (0.8, 0.9, 0.95, 0.98, 0.99)
GRID_MERGE = (0.1, 0.2, 0.3, 0.4, 0.5)
#: Affinities: fragments from the links' components, or from the maxima of the distance to the
#: unlinked pairs (emtile segment --seeds).
GRID_SEEDS = ("components", "distance")


def boundary_labels(ids):
    """Binary labels of cell interior from object ids, slice by slice: 1 where a voxel is
    labelled and its four in-plane neighbours (those inside the slice) carry the same id."""
    ids = np.asarray(ids)
    inside = ids != 0
    for axis in (1, 2):
        same = np.diff(ids, axis=axis) == 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        inside[tuple(lo)] &= same
        inside[tuple(hi)] &= same
    return inside.astype(np.uint8)


def prepare(data, out):
    """Raw, ids and the 2-D baseline's boundary labels as OME-Zarr stores under ``out``."""
    import tifffile

    import emtile

    raw, ids, bnd = out / "raw.zarr", out / "ids.zarr", out / "boundaries.zarr"
    if not raw.exists():
        emtile.convert(data / "raw.tif", raw, voxel_size=VOXEL_SIZE, progress=False)
    if not ids.exists():
        emtile.convert(data / "groundtruth.tif", ids, labels=True, ids=True,
                       voxel_size=VOXEL_SIZE, progress=False)
    if not bnd.exists():
        tif = out / "boundaries.tif"
        tifffile.imwrite(tif, boundary_labels(emtile.open_volume(ids)[...]) * 255)
        emtile.convert(tif, bnd, labels=True, voxel_size=VOXEL_SIZE, progress=False)
        tif.unlink()
    return raw, ids, bnd


def scores(seg_path, truth):
    """VOI split / merge (bits) and adapted Rand error of a segmentation against the truth ids
    of the same region (whole volume, ids as given, truth 0 left out)."""
    import emtile
    from emtile.scores3d import volume_scores

    v = volume_scores(truth, np.asarray(emtile.open_volume(seg_path)[...]))
    return {"voi_split": v["voi_split"], "voi_merge": v["voi_merge"],
            "voi": v["voi_split"] + v["voi_merge"],
            "adapted_rand_error": v["adapted_rand_error"]}


def oracle(fragments, truth):
    """The scores of the fragments merged by the truth: each fragment takes the truth id it
    overlaps most (truth 0 ignored; fragments over unlabelled voxels only keep their own id)."""
    from emtile.scores3d import volume_scores

    f, t = np.asarray(fragments).ravel(), np.asarray(truth).ravel()
    labelled = t != 0
    pairs, counts = np.unique(np.stack([f[labelled], t[labelled]]), axis=1, return_counts=True)
    order = np.lexsort((-counts, pairs[0]))  # by fragment, largest overlap first
    first = np.r_[True, np.diff(pairs[0, order]) != 0]
    best = dict(zip(pairs[0, order][first].tolist(), pairs[1, order][first].tolist()))
    shift = int(t.max()) + 1  # fragments with no labelled voxel keep ids above the truth's
    keys = np.unique(f)
    merged = np.array([best.get(k, k + shift) for k in keys.tolist()], dtype=np.uint64)
    s = volume_scores(np.asarray(truth), merged[np.searchsorted(keys, f)].reshape(np.shape(truth)))
    return {"voi_split": s["voi_split"], "voi_merge": s["voi_merge"],
            "voi": s["voi_split"] + s["voi_merge"]}


def _same(recorded, settings):
    """Whether a run's recorded settings are ``settings``: fields a run of an older emtile did
    not record take their defaults, and fields left None here are the trainer's to resolve."""
    have = TrainSettings.from_json(recorded).to_json()
    return all(have[k] == v for k, v in settings.to_json().items()
               if v is not None and have[k] is not None)


def trained(raw, labels, out, settings, overwrite):
    """Train into ``out``, or reuse the finished run there with the same settings; returns
    ``{"iterations", "best", "train_minutes", "reused"}``."""
    import emtile

    if out.exists() and not overwrite:
        d = emtile.info(out)
        if (d.get("what") == "run" and _same(d.get("settings") or {}, settings)
                and d.get("iterations_done", 0) >= settings.iterations
                and "best" in d.get("folders", [])):
            last = Path(d["log"]).read_text().strip().splitlines()[-1]
            return {"iterations": d["iterations_done"], "best": d.get("best"),
                    "train_minutes": float(last.split(",")[-1]) / 60, "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = emtile.train(raw, labels, out, settings, overwrite=True, progress=False)
    return {"iterations": result["iteration"], "best": result.get("best"),
            "train_minutes": (time.perf_counter() - t0) / 60, "reused": False}


def tune(pred, truth, base, work, *, affinities):
    """The seeds, seed threshold and merge threshold of lowest VOI on the validation prediction
    ``pred``: every point of the grid (affinities: both seeds, one segmentation per seed
    threshold, recut at each merge threshold; maps: one segmentation per pair, the base's
    seeds). Returns ``(settings, table)``."""
    import emtile

    work.mkdir(parents=True, exist_ok=True)
    table = []
    for seeds in GRID_SEEDS if affinities else (base.seeds,):
        for t in GRID_THRESHOLDS:
            first = work / f"{seeds}_t{t}.zarr"
            settings = dataclasses.replace(base, seeds=seeds, threshold=t,
                                           merge_threshold=GRID_MERGE[0])
            emtile.segment(pred, first, settings, overwrite=True, progress=False)
            for m in GRID_MERGE:
                seg = first if m == GRID_MERGE[0] else work / f"{seeds}_t{t}_m{m}.zarr"
                if seg != first and affinities:
                    emtile.segment(first, seg, recut=m, overwrite=True, progress=False)
                elif seg != first:
                    emtile.segment(pred, seg, dataclasses.replace(settings, merge_threshold=m),
                                   overwrite=True, progress=False)
                table.append(dict(scores(seg, truth), seeds=seeds, threshold=t,
                                  merge_threshold=m))
    best = min(table, key=lambda r: r["voi"])
    shutil.rmtree(work)
    chosen = dataclasses.replace(base, seeds=best["seeds"], threshold=best["threshold"],
                                 merge_threshold=best["merge_threshold"])
    return chosen, table


def run_pipeline(kind, raw, labels, truths, settings, out, overwrite, tta=False):
    """Train, predict the validation and scored slices, tune the segmentation on the first and
    score the second, for one pipeline (``"3d"`` or ``"2d"``) of one seed. ``tta``: predict
    with test-time augmentation (3-D: the six axis exchanges, on cubic tiles of
    :data:`TTA_TILE`); its files are named ``..._tta``."""
    import emtile

    affinities = kind == "3d"
    run = trained(raw, labels, out / f"model_{kind}", settings, overwrite)
    best = out / f"model_{kind}" / "best"
    name_tta = "_tta" if tta else ""
    tile = _cube_tile(best) if tta and affinities else "auto"
    t = time.perf_counter()
    preds = {}
    for name, zs in (("val", VAL), ("test", TEST)):
        preds[name] = out / f"pred_{kind}{name_tta}_{name}.zarr"
        emtile.predict(best, raw, preds[name], roi=(zs, slice(None), slice(None)), tile=tile,
                       tta=tta, overwrite=True, progress=False)
    predict_s = time.perf_counter() - t
    base = SEGMENT_3D if affinities else SEGMENT_2D
    chosen, table = tune(preds["val"], truths["val"], base, out / f"tune_{kind}{name_tta}",
                         affinities=affinities)
    t = time.perf_counter()
    seg = out / f"seg_{kind}{name_tta}.zarr"
    emtile.segment(preds["test"], seg, chosen, overwrite=True, progress=False)
    report = dict(run, seed=settings.seed, settings=settings.to_json(), tta=tta,
                  segment=chosen.to_json(), tuning=table, predict_s=predict_s,
                  segment_s=time.perf_counter() - t, scores=scores(seg, truths["test"]))
    fragments = seg / "emtile_graph" / "fragments"
    if fragments.exists():
        import zarr

        report["oracle"] = oracle(zarr.open_array(str(fragments), mode="r")[...],
                                  truths["test"])
    return report


def _cube_tile(model):
    """The largest cubic tile of at most :data:`TTA_TILE` a side that ``model`` takes."""
    from emtile.model import load

    sm = load(model).net.shape_map
    sizes = set.intersection(*(set(sm.valid_sizes(1, TTA_TILE, a)) for a in range(3)))
    return (max(sizes),) * 3


def cached(path, overwrite, make):
    """The report at ``path``, computed by ``make()`` (and written) unless it exists."""
    if path.exists() and not overwrite:
        print(f"{path} exists (--overwrite computes it again)")
        return json.loads(path.read_text())
    report = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _row(seed, r3, r2, budget_minutes):
    def cell(r, key):
        return "-" if r is None else f"{r['scores'][key]:.3f}"

    ratio = (r3["scores"]["voi"] / r2["scores"]["voi"]) if r3 and r2 else None
    minutes = sum(r["train_minutes"] for r in (r3, r2) if r)
    ok = (ratio is not None and ratio <= TARGETS["ratio_to_2d"]
          and r3["scores"]["voi"] <= TARGETS["voi"])
    orc = (r3 or {}).get("oracle")
    return (f"| {seed} | {cell(r3, 'voi_split')} | {cell(r3, 'voi_merge')} | {cell(r3, 'voi')} | "
            f"{'-' if not orc else format(orc['voi'], '.3f')} | {cell(r2, 'voi_split')} | "
            f"{cell(r2, 'voi_merge')} | {cell(r2, 'voi')} | "
            f"{'-' if ratio is None else format(ratio, '.2f')} | {minutes:.1f} "
            f"({'fits' if minutes <= budget_minutes else 'OVER'}) | {'yes' if ok else 'NO'} |")


def summary_markdown(rows, budget_minutes):
    """The summary table (markdown): per seed, both pipelines' VOI and the targets."""
    lines = ["| seed | 3-D split | 3-D merge | 3-D VOI | oracle VOI (truth-merged fragments) | "
             "2-D split | 2-D merge | 2-D VOI | 3-D / 2-D | training min | targets met |",
             "|" + "---|" * 11]
    lines += [_row(seed, r3, r2, budget_minutes) for seed, r3, r2 in rows]
    lines += ["", f"VOI in bits on z 150:250 (truth 0 left out). Targets: 3-D VOI at most "
                  f"{TARGETS['ratio_to_2d']}x the 2-D baseline's and at most {TARGETS['voi']}; "
                  f"training of both pipelines within {budget_minutes:g} minutes per seed."]
    return "\n".join(lines) + "\n"


def overridden(ap, settings, items, **fields):
    """``settings`` with ``fields`` and each ``KEY=VALUE`` of ``items`` (a Python literal, else
    the text) replaced."""
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    for item in items:
        key, _, value = item.partition("=")
        if key not in names:
            ap.error(f"{item}: {key!r} is not a training setting")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # plain text, such as factors=2,2,2;2,2,2
        fields[key] = value
    return dataclasses.replace(settings, **fields)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with raw.tif, groundtruth.tif")
    ap.add_argument("--out", type=Path, default=Path("runs/fib25"), help="working folder")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1")
    ap.add_argument("--only", choices=("3d", "2d", "both"), default="both")
    ap.add_argument("--iterations-3d", type=int, default=SETTINGS_3D.iterations)
    ap.add_argument("--iterations-2d", type=int, default=SETTINGS_2D.iterations)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (the recipe: 2)")
    ap.add_argument("--minutes", type=float, default=60.0,
                    help="the budget each seed's training (both pipelines) is checked against")
    ap.add_argument("--overwrite", action="store_true", help="compute existing reports again")
    ap.add_argument("--tta", action="store_true",
                    help="predict with test-time augmentation (3-D: six axis exchanges, 2-D: "
                         "eight flips / transposes); reports report_<kind>_tta.json")
    for kind in ("3d", "2d"):
        ap.add_argument(f"--set{kind}", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one of SETTINGS_{kind.upper()} (a Python literal), "
                             f"e.g. --set{kind} base=4")
    args = ap.parse_args()
    settings = {"3d": overridden(ap, SETTINGS_3D, args.set3d, iterations=args.iterations_3d),
                "2d": overridden(ap, SETTINGS_2D, args.set2d, iterations=args.iterations_2d)}

    import torch

    import emtile

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    raw, ids, bnd = prepare(args.data, args.out)
    volume = emtile.open_volume(ids)
    truths = {"val": np.asarray(volume[VAL]), "test": np.asarray(volume[TEST])}
    rows = []
    tta = "_tta" if args.tta else ""
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = args.out / f"seed{seed}"
        r3 = r2 = None
        if args.only in ("3d", "both"):
            s3 = dataclasses.replace(settings["3d"], seed=seed)
            r3 = cached(out / f"report_3d{tta}.json", args.overwrite,
                        lambda: run_pipeline("3d", raw, ids, truths, s3, out, args.overwrite,
                                             args.tta))
        if args.only in ("2d", "both"):
            s2 = dataclasses.replace(settings["2d"], seed=seed)
            r2 = cached(out / f"report_2d{tta}.json", args.overwrite,
                        lambda: run_pipeline("2d", raw, bnd, truths, s2, out, args.overwrite,
                                             args.tta))
        rows.append((seed, r3, r2))
        print(_row(seed, r3, r2, args.minutes))
    table = summary_markdown(rows, args.minutes)
    summary = {"seeds": [r[0] for r in rows], "threads": args.threads,
               "budget_minutes": args.minutes, "targets": TARGETS, "tta": args.tta,
               "reports": [{"seed": s, "3d": r3, "2d": r2} for s, r3, r2 in rows]}
    (args.out / f"summary{tta}.json").write_text(json.dumps(summary, indent=2, default=str)
                                                 + "\n")
    (args.out / f"summary{tta}.md").write_text(table)
    print(table)
    print(f"wrote {args.out / f'summary{tta}.json'} and {args.out / f'summary{tta}.md'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
