"""``emtile evaluate``: ISBI 2012 and CREMI scores and pixel metrics of a prediction (or a
segmentation) against labels, per slice; CREMI's scores of two id volumes, over the whole
volume."""

import click

from emtile.cli._storage import storage_option
from emtile.cli._types import SliceList, progress_option


@click.command()
@click.argument("pred")
@click.argument("labels")
@click.option("--slices", type=SliceList(), default=None,
              help="Slices to score: a range 25:30 or a list 25,27 (default: all).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Cell interior where probability > threshold (the rule of predict's mask "
                   "and show too)  [default: 0.5; not for a label image]")
@click.option("--sweep", is_flag=True,
              help="Also sweep thresholds 0.0..1.0 (step 0.1) and report the best mean V-Rand "
                   "and V-Info (the ISBI 'maximal' scores). Not for a label image.")
@click.option("--invert", is_flag=True,
              help="PRED is a boundary map (1 = membrane, e.g. another tool's): use 1 - p. "
                   "ISBI labels are 255 = cell interior. Not for a label image.")
@click.option("--mode", type=click.Choice(["auto", "slices", "volume"]), default="auto",
              show_default=True,
              help="slices: per-slice scores against binary labels. volume: PRED and LABELS are "
                   "id volumes (a segmentation and instance ids), scored as one volume (VOI "
                   "split/merge, adapted Rand error; truth 0 left out). auto: volume when both "
                   "are id volumes (emtile segment's output, labels converted with --ids, "
                   "32/64-bit integers), else slices.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write every number and the settings to this JSON file.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write per-slice, mean, pixel and sweep rows to this CSV file.")
@progress_option()
@storage_option()
def evaluate(pred, labels, slices, threshold, sweep, invert, mode, json_path, csv_path,
             progress, storage_options):
    """Score PRED (probabilities or mask, e.g. pred.zarr) against LABELS (binary labels: 1 or
    255 = cell interior, 0 = membrane): the ISBI 2012 V-Rand / V-Info / Rand error, the CREMI
    VOI split / merge and adapted Rand error, and pixel metrics, per slice and averaged, each
    named by its threshold.

    PRED may come from any tool (TIFF, HDF5, Zarr without emtile metadata): uint8 is read as
    v / 255, uint16 as v / 65535, floats as they are (values in [0, 1]); --invert reads a
    boundary map (1 = membrane).

    A label image as PRED (emtile segment's seg.zarr, or any uint32/uint64/int32/int64 volume)
    is scored as a segmentation: its ids are the segments, 0 the boundary; there is no
    threshold, so --threshold, --sweep and --invert are refused.

    A prediction of a region (predict --roi) is scored against the same region of full-size
    LABELS (its offset is in its metadata); --slices then count in the labels' slices.

    Two id volumes (PRED a segmentation, LABELS instance ids: 'emtile convert --labels --ids',
    0 = unlabelled) are scored as one volume, not per slice: VOI split, VOI merge and the
    adapted Rand error as CREMI computes them (ids as given, truth 0 left out, a predicted 0
    one object); --slices 150:250 scores that block as one volume.
    """
    from emtile.evaluation import evaluate as run
    from emtile.reports import format_report

    result = run(pred, labels, slices=slices, threshold=threshold, sweep=sweep, invert=invert,
                 mode=mode, progress=progress, json_path=json_path, csv_path=csv_path,
                 storage_options=storage_options)
    click.echo(format_report(result))
    if json_path:
        click.echo(f"\nwrote {json_path}")
    if csv_path:
        click.echo(f"wrote {csv_path}")
