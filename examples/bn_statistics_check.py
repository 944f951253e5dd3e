"""Score one batch-norm model folder three ways to see how much it depends on per-patch statistics.

    .venv/bin/python examples/bn_statistics_check.py runs/isbi/model/last --raw runs/isbi/raw.zarr \
        --labels runs/isbi/labels.zarr --slices 25:30

Rows (pixel error at 0.5 and V-Rand best over 0.0-1.0 on the given slices):

- ``running``: the model as saved, as ``emtile predict`` runs it;
- ``precise``: running statistics recomputed over ``--patches`` unaugmented training patches
  (:func:`emtile.training.batchnorm.precise_norm_stats`);
- ``per-tile``: every tile normalised by its own statistics, as training with one patch per step
  does. This is not tile-independent (the output depends on the tiling), so ``emtile predict``
  never does it; it only shows what the trained network can do.

A large gap between ``running`` and ``per-tile`` means the network learned to rely on per-patch
statistics: train with ``--freeze-bn`` (default 0.7).
"""

import argparse

import numpy as np
import torch

import emtile
from emtile.evaluation import evaluate
from emtile.model import load
from emtile.normalize import rule_of, statistics
from emtile.sampling import PatchDataset
from emtile.training.batchnorm import norm_layers, precise_norm_stats
from emtile.training.validation import predict_slices
from emtile.stacks import resolve_slices


def parse_slices(text):
    a, _, b = text.partition(":")
    return slice(int(a), int(b)) if b else [int(x) for x in text.split(",")]


def score(model, raw, truth, zs, scaling):
    prob = predict_slices(model, raw, zs, device="cpu", normalize=scaling)
    r = evaluate(prob, truth, sweep=True, progress=False)
    best = r["sweep"]["best_v_rand"]
    return r["pixel"]["pixel_error"], best["value"], best["threshold"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model folder (e.g. run/last)")
    ap.add_argument("--raw", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--slices", default="25:30", help="slices to score, e.g. 25:30")
    ap.add_argument("--train-slices", default="0:25", help="slices for the precise statistics")
    ap.add_argument("--patches", type=int, default=32)
    args = ap.parse_args()

    raw, labels = emtile.open_volume(args.raw), emtile.open_volume(args.labels)
    zs = resolve_slices(parse_slices(args.slices), raw.shape[0], name="slices")
    truth = np.stack([(np.asarray(labels[z]) != 0).astype(np.uint8) for z in zs])
    loaded = load(args.model)
    model = loaded.net
    norms = norm_layers(model)
    if not norms:
        raise SystemExit(f"{args.model} has no batch norm: nothing to compare")
    # the model's own input normalisation, on this volume (as emtile predict applies it)
    rule = loaded.normalization
    scaling = statistics(raw, rule_of(rule))["scaling"]
    rows = [("running", score(model, raw, truth, zs, scaling))]

    size = model.valid_sizes(1, 572)[-1]
    data = PatchDataset(raw, labels, input_size=size, output_size=model.output_size(size),
                        slices=parse_slices(args.train_slices), seed=0, normalize=scaling)
    precise_norm_stats(model, iter(data), args.patches, device=torch.device("cpu"))
    rows.append((f"precise ({args.patches} patches)", score(model, raw, truth, zs, scaling)))

    for m in norms:  # batch statistics at inference
        m.track_running_stats, m.running_mean, m.running_var = False, None, None
    rows.append(("per-tile", score(model, raw, truth, zs, scaling)))

    print(f"{'statistics':24s} {'pixel error':>11s} {'V-Rand':>8s} {'thr':>4s}")
    for name, (pe, vr, t) in rows:
        print(f"{name:24s} {pe:11.4f} {vr:8.4f} {t:4.1f}")


if __name__ == "__main__":
    main()
