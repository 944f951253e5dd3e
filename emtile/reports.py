"""The reports of an evaluation: the text ``emtile evaluate`` prints (:func:`format_report`), and
the result written as CSV (:func:`write_csv`) or JSON (:func:`write_json`).

Each takes the result dict of :func:`emtile.evaluation.evaluate`, per slice or (``mode``
``"volume"``) of a whole volume.
"""

from emtile.metrics import SCORES
from emtile.scores3d import VOLUME_SCORES

__all__ = ["format_report", "write_csv", "write_json"]

_CSV_FIELDS = ["z", "threshold", "v_rand", "v_info", "rand_error", "voi_split", "voi_merge",
               "adapted_rand_error", "pixel_error", "f1", "iou", "tp", "fp", "fn", "tn", "n",
               "singletons", "rand_precision", "rand_recall", "h_truth", "h_pred", "mutual_info",
               "empty"]

#: The report's per-slice table: (heading, key, width).
_TABLE = (("V-Rand", "v_rand", 10), ("V-Info", "v_info", 10), ("RandErr", "rand_error", 11),
          ("VOIsplit", "voi_split", 9), ("VOImerge", "voi_merge", 9),
          ("ARE", "adapted_rand_error", 8), ("pixErr", "pixel_error", 10), ("F1", "f1", 8))


def format_report(result):
    """The report ``emtile evaluate`` prints for the ``result`` of
    :func:`emtile.evaluation.evaluate`: the settings, a per-slice table with the mean, the
    threshold sweep and the pixel metrics."""
    s, sweep = result["settings"], result["sweep"]
    if s.get("mode") == "volume":
        return _volume_report(result)
    label_image = s.get("label_image", False)
    region = (f"  (a region: slices {s['slices'][0]}..{s['slices'][-1]} of the labels, offset "
              f"{','.join(map(str, s['offset']))})" if s.get("offset") else "")
    lines = [
        f"prediction  {s['pred']}  ({s['prediction_kind']}{', inverted' if s['invert'] else ''})"
        + region,
        f"labels      {s['labels']}",
        ("scored as   a segmentation: no threshold (predicted 0 = boundary)" if label_image else
         f"threshold   {s['threshold']:g} (cell interior where p > {s['threshold']:g})"
         + ("   (+ sweep 0.0..1.0 step 0.1)" if s["sweep"] else "")),
        "",
    ]
    at = "" if label_image else "@" + format(s["threshold"], "g")
    columns = [(name + at, key, max(width, len(name + at))) for name, key, width in _TABLE]
    head = f"{'slice':>6}" + "".join(f"  {name:>{w}}" for name, _, w in columns)
    if sweep:
        br, bi = sweep["best_v_rand"]["threshold"], sweep["best_v_info"]["threshold"]
        head += f"  {'V-Rand@' + format(br, 'g') + '*':>11}  {'V-Info@' + format(bi, 'g') + '*':>11}"
    lines += [head, "-" * len(head)]

    def row_text(label, d, best=None):
        text = f"{label:>6}" + "".join(f"  {d[key]:{w}.4f}" for _, key, w in columns)
        if best is not None:
            text += f"  {best[0]:11.4f}  {best[1]:11.4f}"
        return text

    for d in result["slices"]:
        best = (d["v_rand_best"], d["v_info_best"]) if sweep else None
        lines.append(row_text(str(d["z"]), d, best) + ("  (empty truth: not in mean)" if d["empty"] else ""))
    m = result["mean"]
    lines.append("-" * len(head))
    lines.append(row_text("mean", m, (m["v_rand_best"], m["v_info_best"]) if sweep else None))
    lines += ["V-Rand, V-Info: ISBI 2012 (truth membrane left out; a predicted 0 inside a cell "
              "is a singleton).",
              "VOIsplit = H(pred|truth), VOImerge = H(truth|pred), in bits; ARE = adapted Rand "
              "error; both CREMI's way",
              "(truth membrane left out; predicted 0 one segment)."]
    if sweep:
        lines += _sweep_lines(sweep, format(s["threshold"], "g"))
    p = result["pixel"]
    what = (f"pixel metrics of the labelled pixels (id != 0 as cell interior; meaningful when the "
            f"segmentation keeps its boundaries), all {len(result['slices'])} slices:"
            if label_image else
            f"pixel metrics at threshold {p['threshold']:g} (foreground = cell interior), "
            f"all {len(result['slices'])} slices:")
    lines += ["", what,
              f"  accuracy {p['accuracy']:.4f}  pixel error {p['pixel_error']:.4f}  "
              f"precision {p['precision']:.4f}  recall {p['recall']:.4f}  "
              f"F1/Dice {p['f1']:.4f}  IoU {p['iou']:.4f}",
              f"  confusion matrix [[TN, FP], [FN, TP]] = {p['confusion_matrix']}", "",
              p["classification_report"].rstrip()]
    return "\n".join(lines)


def _volume_report(result):
    """The report of whole-volume scores (``mode="volume"``)."""
    s, v = result["settings"], result["volume"]
    zs = s["slices"]
    where = (f"slices {zs[0]}..{zs[-1]}" + ("" if len(zs) == zs[-1] - zs[0] + 1 else
                                            f" ({len(zs)} of them)") if zs else "no slices")
    region = (f", a region at offset {','.join(map(str, s['offset']))}" if s.get("offset")
              else "")
    lines = [f"prediction  {s['pred']}  ({s['prediction_kind']})",
             f"labels      {s['labels']}  ({s['truth_kind']})",
             f"scored as   one volume: {where}{region}; {v['n']:,} of {v['voxels']:,} voxels "
             f"labelled (truth 0 left out)", ""]
    if v["empty"]:
        lines.append("no labelled voxel (truth > 0): nothing to score (0, 0, 0 reported)")
    lines += [f"VOI split   {v['voi_split']:.4f} bits  (H(pred|truth): objects split)",
              f"VOI merge   {v['voi_merge']:.4f} bits  (H(truth|pred): objects merged)",
              f"VOI         {v['voi']:.4f} bits  (split + merge)",
              f"ARE         {v['adapted_rand_error']:.4f}  (adapted Rand error; Rand precision "
              f"{v['rand_precision']:.4f}, recall {v['rand_recall']:.4f})",
              f"objects     {v['truth_ids']:,} truth ids; {v['pred_ids']:,} predicted ids on "
              f"the labelled voxels" + (f" (0 among them, on {v['pred_zero']:,} voxels: one "
                                        f"object)" if v["pred_zero"] else ""),
              "",
              "CREMI's scores over the whole volume: ids as given (no connected components), "
              "truth 0 left out, a predicted 0 one object."]
    return "\n".join(lines)


def _sweep_lines(sweep, t):
    lines = ["", "threshold sweep (mean over slices):",
             "  t        " + "".join(f"{t:>7.1f}" for t in sweep["thresholds"])]
    for name, key in (("V-Rand", "v_rand"), ("V-Info", "v_info"), ("VOIsplit", "voi_split"),
                      ("VOImerge", "voi_merge"), ("ARE", "adapted_rand_error")):
        lines.append(f"  {name:<8} " + "".join(f"{v:7.4f}" for v in sweep[key]))
    lines.append(f"  best V-Rand {sweep['best_v_rand']['value']:.4f} at "
                 f"{sweep['best_v_rand']['threshold']:g} (Rand error "
                 f"{sweep['best_rand_error']['value']:.4f}); best V-Info "
                 f"{sweep['best_v_info']['value']:.4f} at {sweep['best_v_info']['threshold']:g}"
                 f"  (* the sweep's best threshold; the other columns are at {t})")
    edge = sweep["best_v_rand"]["threshold"]
    if edge in (sweep["thresholds"][1], sweep["thresholds"][-2]) and len(sweep["v_rand"]) > 2:
        lines.append(f"  note: the best V-Rand threshold {edge:g} is at the edge of the "
                     f"challenge's grid (0.0 and 1.0 leave no interior or no membrane): the "
                     f"maximum may lie beyond it")
    return lines


def write_csv(result, path):
    """The ``result`` of :func:`emtile.evaluation.evaluate` as CSV: a settings line, one row per
    slice, a ``mean`` row, a ``pixel`` row and (with a sweep) one row per threshold. Columns are
    named in the second line (``_CSV_FIELDS``: ``z``, ``threshold`` (empty for a label image),
    the ISBI and CREMI scores, the pixel metrics and counts, the entropies); a row leaves empty
    what it does not have."""
    s = result["settings"]
    import csv

    if s.get("mode") == "volume":
        return _write_volume_csv(result, path)
    threshold = "" if s["threshold"] is None else s["threshold"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["# emtile evaluate", f"pred={s['pred']}", f"labels={s['labels']}",
                    f"threshold={threshold}", f"sweep={s['sweep']}", f"invert={s['invert']}",
                    f"prediction_kind={s['prediction_kind']}",
                    f"label_image={s.get('label_image', False)}",
                    f"version={s['emtile_version']}"])
        fields = _CSV_FIELDS + (["v_rand_best", "v_info_best"] if result["sweep"] else [])
        w.writerow(["row"] + fields)

        def row(kind, values):
            w.writerow([kind] + ["" if values.get(k) is None else values[k] for k in fields])

        for d in result["slices"]:
            row("slice", d)
        row("mean", {**result["mean"], "threshold": threshold})
        p = result["pixel"]
        pixel_keys = ("pixel_error", "f1", "iou", "tp", "fp", "fn", "tn")
        row("pixel", {"threshold": threshold, **{k: p[k] for k in pixel_keys}})
        if result["sweep"]:
            sw = result["sweep"]
            for i, t in enumerate(sw["thresholds"]):
                row("sweep", {"threshold": t, **{k: sw[k][i] for k in SCORES}})


#: The columns of a whole-volume CSV (one ``volume`` row).
_VOLUME_FIELDS = list(VOLUME_SCORES) + ["n", "voxels", "truth_ids", "pred_ids", "pred_zero",
                                        "h_truth", "h_pred", "mutual_info", "empty"]


def _runs(zs):
    """Slice indices as ``150:250`` (contiguous) or ``1,3,4``."""
    if zs and len(zs) == zs[-1] - zs[0] + 1:
        return f"{zs[0]}:{zs[-1] + 1}"
    return ",".join(map(str, zs))


def _write_volume_csv(result, path):
    """A whole-volume result as CSV: a settings line, the column names, one ``volume`` row."""
    import csv

    s = result["settings"]
    zs = s["slices"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["# emtile evaluate", f"pred={s['pred']}", f"labels={s['labels']}",
                    "mode=volume", f"slices={_runs(zs)}",
                    f"prediction_kind={s['prediction_kind']}", f"truth_kind={s['truth_kind']}",
                    f"version={s['emtile_version']}"])
        w.writerow(["row"] + _VOLUME_FIELDS)
        w.writerow(["volume"] + [result["volume"][k] for k in _VOLUME_FIELDS])


def write_json(result, path):
    """The ``result`` of :func:`emtile.evaluation.evaluate`, every number and setting, as JSON."""
    import json

    with open(path, "w") as f:
        json.dump(result, f, indent=2)
