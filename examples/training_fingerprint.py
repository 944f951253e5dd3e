"""Is training (and prediction) still bit for bit what it was? Fingerprint a short run.

Runs two short deterministic trainings through the command line on ISBI 2012 slices (converted
to OME-Zarr first), then predicts with a model, and prints (or saves) SHA-256 digests of

- ``train.csv`` without its ``elapsed_s`` column (the losses are written with ``repr``, exactly),
- ``best/model.safetensors`` and ``last/model.safetensors`` (calibration included),
- every chunk file of the prediction (probabilities and mask).

Run A: batch norm, frozen for the last 30% (precise statistics), validation, calibration, fp32.
Run B: no batch norm, bf16 autocast (``--amp bf16``), SGD, poly schedule, ``bce+dice``.
Both pin the settings whose defaults issue 13 changed (class balance, precision, batch norm,
normalisation ``dtype``); its new ``train.csv`` columns and calibration rule (best/ keeps the
better model) still make digests taken before it differ.

A reshaping of the trainer must leave every digest unchanged on the same machine::

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python examples/training_fingerprint.py \\
        --out fp-before --json fp-before.json                       # before the change
    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python examples/training_fingerprint.py \\
        --out fp-after --model fp-before/a/best --compare fp-before.json   # after it

``--model`` predicts with a model kept from before the change instead of run A's ``best/``.
Digests depend on the machine (CPU kernels), the thread count and the torch version.
"""

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(os.environ.get("EMTILE_ISBI_DIR",
                           Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"))

RUNS = {
    "a": ["--train-slices", "0:4", "--val-slices", "4:6", "--iterations", "30", "--val-every", "10",
          "--base", "8", "--depth", "4", "--tile", "252", "--batch-norm", "--freeze-bn", "0.7",
          "--lr", "2e-3", "--seed", "3", "--workers", "1", "--class-balance", "1", "--amp", "off",
          "--normalize", "dtype"],
    "b": ["--train-slices", "0:4", "--val-slices", "4:5", "--iterations", "8", "--val-every", "4",
          "--base", "4", "--depth", "3", "--tile", "140", "--amp", "bf16", "--no-batch-norm",
          "--normalize", "dtype", "--optimizer", "sgd",
          "--momentum", "0.9", "--lr", "1e-2", "--schedule", "poly", "--loss", "bce+dice",
          "--class-balance", "0.5", "--seed", "7", "--workers", "0", "--no-calibrate",
          "--noise", "0.05", "--blur", "1.0"],
}


def emtile(*args):
    cmd = [sys.executable, "-m", "emtile.cli.main", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               NUMBA_NUM_THREADS=os.environ.get("NUMBA_NUM_THREADS", "1"))
    subprocess.run(cmd, check=True, env=env)


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def csv_digest(path):
    with open(path, newline="") as f:
        rows = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest(), len(rows)


def chunks_digest(store):
    h = hashlib.sha256()
    files = sorted(p for p in Path(store).rglob("*") if p.is_file() and p.name != "zarr.json")
    for p in files:
        h.update(str(p.relative_to(store)).encode())
        h.update(p.read_bytes())
    return h.hexdigest(), len(files)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with the ISBI 2012 TIFFs")
    ap.add_argument("--out", type=Path, default=Path("fingerprint-out"), help="work folder")
    ap.add_argument("--model", type=Path, default=None,
                    help="model folder to predict with (default: run A's best/)")
    ap.add_argument("--json", type=Path, default=None, help="write the digests here")
    ap.add_argument("--compare", type=Path, default=None,
                    help="digests of an earlier run: exit 1 if any differs")
    args = ap.parse_args()

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    raw, labels = out / "raw.zarr", out / "labels.zarr"
    emtile("convert", args.data / "train-volume.tif", raw, "--overwrite", "--no-progress")
    emtile("convert", args.data / "train-labels.tif", labels, "--labels", "--overwrite",
           "--no-progress")
    digests = {}
    for name, run_args in RUNS.items():
        emtile("train", "--raw", raw, "--labels", labels, "--out", out / name, "--overwrite",
               "--no-progress", *run_args)
        digests[f"{name}/train.csv"], _ = csv_digest(out / name / "train.csv")
        for folder in ("best", "last"):
            digests[f"{name}/{folder}"] = sha(out / name / folder / "model.safetensors")
    model = args.model or out / "a" / "best"
    emtile("predict", "--model", model, "--tile", "252", "--threshold", "0.5", "--roi",
           "0:3,:,:", raw, out / "pred.zarr", "--overwrite", "--no-progress")
    digests["predict"], _ = chunks_digest(out / "pred.zarr")
    text = json.dumps(digests, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        diff = [k for k in before if before[k] != digests.get(k)]
        print("identical" if not diff else f"DIFFERENT: {', '.join(diff)}")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
