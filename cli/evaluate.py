"""``emtile evaluate``: pixel metrics and ISBI 2012 scores of a prediction against labels."""

import csv
import json

import click

from emtile.cli._types import SliceList

_CSV_FIELDS = ["z", "threshold", "v_rand", "v_info", "rand_error", "pixel_error", "f1", "iou",
               "tp", "fp", "fn", "tn", "n", "singletons", "rand_precision", "rand_recall",
               "h_truth", "h_pred", "mutual_info", "empty"]


def format_table(result):
    """The terminal report: settings, a per-slice table with the mean, pixel metrics."""
    s, sweep = result["settings"], result["sweep"]
    lines = [
        f"prediction  {s['pred']}  ({s['prediction_kind']}{', inverted' if s['invert'] else ''})",
        f"labels      {s['labels']}",
        f"threshold   {s['threshold']:g}" + ("   (+ sweep 0.0..1.0 step 0.1)" if s["sweep"] else ""),
        "",
    ]
    head = f"{'slice':>6}  {'V-Rand':>8}  {'V-Info':>8}  {'Rand err':>8}  {'pix err':>8}  {'F1':>8}"
    if sweep:
        br, bi = sweep["best_v_rand"]["threshold"], sweep["best_v_info"]["threshold"]
        head += f"  {'V-Rand@' + format(br, 'g'):>10}  {'V-Info@' + format(bi, 'g'):>10}"
    lines += [head, "-" * len(head)]

    def row_text(label, d, best=None):
        text = (f"{label:>6}  {d['v_rand']:8.4f}  {d['v_info']:8.4f}  {d['rand_error']:8.4f}  "
                f"{d['pixel_error']:8.4f}  {d['f1']:8.4f}")
        if best is not None:
            text += f"  {best[0]:10.4f}  {best[1]:10.4f}"
        return text

    for d in result["slices"]:
        best = (d["v_rand_best"], d["v_info_best"]) if sweep else None
        lines.append(row_text(str(d["z"]), d, best) + ("  (empty truth: not in mean)" if d["empty"] else ""))
    m = result["mean"]
    lines.append("-" * len(head))
    lines.append(row_text("mean", m, (m["v_rand_best"], m["v_info_best"]) if sweep else None))
    if sweep:
        lines += ["", "threshold sweep (mean over slices):",
                  "  t      " + "".join(f"{t:>7.1f}" for t in sweep["thresholds"]),
                  "  V-Rand " + "".join(f"{v:7.4f}" for v in sweep["v_rand"]),
                  "  V-Info " + "".join(f"{v:7.4f}" for v in sweep["v_info"]),
                  f"  best V-Rand {sweep['best_v_rand']['value']:.4f} at {sweep['best_v_rand']['threshold']:g}"
                  f" (Rand error {sweep['best_rand_error']['value']:.4f}); "
                  f"best V-Info {sweep['best_v_info']['value']:.4f} at {sweep['best_v_info']['threshold']:g}"]
    p = result["pixel"]
    lines += ["", f"pixel metrics at threshold {p['threshold']:g} (foreground = cell interior), "
                  f"all {len(result['slices'])} slices:",
              f"  accuracy {p['accuracy']:.4f}  pixel error {p['pixel_error']:.4f}  "
              f"precision {p['precision']:.4f}  recall {p['recall']:.4f}  "
              f"F1/Dice {p['f1']:.4f}  IoU {p['iou']:.4f}",
              f"  confusion matrix [[TN, FP], [FN, TP]] = {p['confusion_matrix']}", "",
              p["classification_report"].rstrip()]
    return "\n".join(lines)


def write_csv(result, path):
    """One row per slice, a ``mean`` row, and (with a sweep) one row per threshold."""
    s = result["settings"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["# emtile evaluate", f"pred={s['pred']}", f"labels={s['labels']}",
                    f"threshold={s['threshold']}", f"sweep={s['sweep']}", f"invert={s['invert']}",
                    f"prediction_kind={s['prediction_kind']}", f"version={s['emtile_version']}"])
        extra = ["v_rand_best", "v_info_best"] if result["sweep"] else []
        w.writerow(["row"] + _CSV_FIELDS + extra)
        for d in result["slices"]:
            w.writerow(["slice"] + [d[k] for k in _CSV_FIELDS + extra])
        m = result["mean"]
        w.writerow(["mean"] + [m.get(k, "") if k not in ("z", "threshold") else
                               ("" if k == "z" else s["threshold"]) for k in _CSV_FIELDS + extra])
        p = result["pixel"]
        w.writerow(["pixel"] + ["", s["threshold"], "", "", "", p["pixel_error"], p["f1"], p["iou"],
                                p["tp"], p["fp"], p["fn"], p["tn"]] + [""] * (len(_CSV_FIELDS) - 12 + len(extra)))
        if result["sweep"]:
            sw = result["sweep"]
            for t, vr, vi in zip(sw["thresholds"], sw["v_rand"], sw["v_info"]):
                row = {"threshold": t, "v_rand": vr, "v_info": vi, "rand_error": 1.0 - vr}
                w.writerow(["sweep"] + [row.get(k, "") for k in _CSV_FIELDS + extra])


@click.command()
@click.argument("pred")
@click.argument("labels")
@click.option("--slices", type=SliceList(), default=None,
              help="Slices to score: a range 25:30 or a list 25,27 (default: all).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Cell interior where probability > threshold.")
@click.option("--sweep", is_flag=True,
              help="Also sweep thresholds 0.0..1.0 (step 0.1) and report the best mean V-Rand "
                   "and V-Info (the ISBI 'maximal' scores).")
@click.option("--invert", is_flag=True,
              help="PRED is a membrane probability (opposite polarity): use 1 - p. "
                   "ISBI labels are 255 = cell interior.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write every number and the settings to this JSON file.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write per-slice, mean, pixel and sweep rows to this CSV file.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def evaluate(pred, labels, slices, threshold, sweep, invert, json_path, csv_path, no_progress):
    """Score PRED (probabilities or mask) against binary LABELS: pixel metrics and the ISBI 2012
    V-Rand / V-Info / Rand error, per slice and averaged."""
    from emtile.metrics import evaluate as run

    result = run(pred, labels, slices=slices, threshold=threshold, sweep=sweep, invert=invert,
                 progress=not no_progress)
    click.echo(format_table(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        click.echo(f"\nwrote {json_path}")
    if csv_path:
        write_csv(result, csv_path)
        click.echo(f"wrote {csv_path}")
