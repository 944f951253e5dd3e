"""Does z context help on ISBI? An anisotropic 3-D boundary network against 2-D ones (issue 21).

    .venv/bin/python examples/isbi_z_context.py --out runs/isbi_z            # three arms, seed 0
    .venv/bin/python examples/isbi_z_context.py --iterations 200 --out runs/isbi_z_short  # a check

ISBI 2012's stack is serial sections: 4 x 4 nm pixels, 50 nm between sections. Every arm trains
on slices 0-24 for the same number of steps (``--iterations``) with the same in-plane tile
(``--tile``), is chosen on validation V-Rand of slices 25-29 (as ``examples/train_isbi.py``), and
predicts and scores slices 25-29 as the challenge does (``train_isbi.score``: V-Rand at its best
threshold):

- ``2d``: the ISBI recipe (``train_isbi.SETTINGS``: the 2-D network, its weighted loss and
  calibration) at this tile and number of steps;
- ``3d-flat``: a 3-D network with no z context (every kernel ``1,3,3``, factors ``1,2,2``: a 2-D
  network run section by section) trained as a 3-D boundary run (``ndim=3, target="boundaries"``:
  MALA-balanced loss, the 3-D augmentation of anisotropic data: missing and shifted sections);
- ``3d``: the same network with ``3,3,3`` kernels at its coarsest level: each output section
  sees 2 sections on either side (input 5 sections: two 3x3x3 convolutions, :data:`Z_CONTEXT`).

``3d`` against ``3d-flat`` is the effect of the z context alone; against ``2d``, of the whole 3-D
path. A 3-D step reads 5 sections for one output section, so it costs that many
times a 2-D step: the table gives each arm's training minutes. ``--arms`` picks the arms.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_isbi import DATA, SETTINGS, THREADS, prepare, score  # noqa: E402  (the recipe's)

ARMS = ("2d", "3d-flat", "3d")
DEPTH = 4
FACTORS = ";".join(["1,2,2"] * DEPTH)
Z_CONTEXT = 4  # sections the 3d arm's two 3x3x3 convolutions at the coarsest level read


def arm_settings(arm, iterations, tile, seed):
    """The :class:`~emtile.training.settings.TrainSettings` of one arm."""
    s = dataclasses.replace(SETTINGS, iterations=iterations, tile=tile, seed=seed)
    if arm == "2d":
        return s
    bottom = "3,3,3" if arm == "3d" else "1,3,3"
    # the 3-D run's own loss (affinity_loss) and augmentation; 2-D-only fields at their defaults
    defaults = {f.name: f.default for f in dataclasses.fields(s)
                if f.name in ("loss", "w0", "sigma", "class_balance", "foreground", "noise",
                              "blur")}
    z = 1 + (Z_CONTEXT if arm == "3d" else 0)
    return dataclasses.replace(s, **defaults, ndim=3, target="boundaries", factors=FACTORS,
                               depth=DEPTH, kernels=";".join(["1,3,3"] * DEPTH + [bottom]),
                               tile=(z, tile, tile), amp="off")


def run_arm(arm, raw, labels, truth, settings, out, overwrite):
    import emtile

    report_path = out / "report.json"
    if report_path.exists() and not overwrite:
        print(f"{arm}: {report_path} exists (--overwrite runs it again)")
        return json.loads(report_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = emtile.train(raw, labels, out / "model", settings, overwrite=True, progress=False)
    train_min = (time.perf_counter() - t0) / 60
    pred = out / "pred.zarr"
    emtile.predict(out / "model" / "best", raw, pred, tile="auto",
                   roi=(slice(25, 30), slice(None), slice(None)), dtype="float32",
                   overwrite=True, progress=False)
    report = {"arm": arm, "settings": settings.to_json(), "iterations": result["iteration"],
              "best_iteration": (result.get("best") or {}).get("iteration"),
              "train_minutes": train_min, "scores": score(pred, truth)}
    report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    s = report["scores"]
    print(f"{arm}: {report['iterations']} steps in {train_min:.1f} min; V-Rand {s['v_rand']:.4f} "
          f"at {s['v_rand_threshold']:g}, pixel error {s['pixel_error']:.4f}, V-Info "
          f"{s['v_info']:.4f}")
    return report


def table(reports):
    lines = ["| arm | tile | steps | training min | V-Rand (best threshold) | V-Rand @0.5 | "
             "pixel error @0.5 | V-Info (best) |", "|" + "---|" * 8]
    for r in reports:
        s, tile = r["scores"], r["settings"]["tile"]
        tile = "x".join(map(str, tile)) if isinstance(tile, (list, tuple)) else str(tile)
        lines.append(f"| {r['arm']} | {tile} | {r['iterations']} | {r['train_minutes']:.1f} | "
                     f"{s['v_rand']:.4f} at {s['v_rand_threshold']:g} | {s['v_rand_at_0.5']:.4f} | "
                     f"{s['pixel_error']:.4f} | {s['v_info']:.4f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with the ISBI 2012 TIFFs")
    ap.add_argument("--out", type=Path, default=Path("runs/isbi_z"), help="working folder")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {ARMS}")
    ap.add_argument("--iterations", type=int, default=1000, help="training steps of every arm")
    ap.add_argument("--tile", type=int, default=380, help="in-plane tile of every arm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in ARMS for a in arms):
        ap.error(f"--arms {args.arms!r}: choose from {', '.join(ARMS)}")

    import torch

    import emtile

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    raw, labels = prepare(args.data, args.out)
    truth = (np.asarray(emtile.open_volume(labels)[25:30]) != 0).astype(np.uint8)
    reports = [run_arm(arm, raw, labels, truth,
                       arm_settings(arm, args.iterations, args.tile, args.seed),
                       args.out / f"{arm}-seed{args.seed}", args.overwrite) for arm in arms]
    md = table(reports)
    (args.out / "summary.md").write_text(md)
    (args.out / "summary.json").write_text(json.dumps(reports, indent=2, default=str) + "\n")
    print(md)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
