"""``emtile evaluate``: pixel metrics and ISBI 2012 scores of a prediction against labels."""

import click

from emtile.cli._types import SliceList, progress_option


@click.command()
@click.argument("pred")
@click.argument("labels")
@click.option("--slices", type=SliceList(), default=None,
              help="Slices to score: a range 25:30 or a list 25,27 (default: all).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Cell interior where probability > threshold (the rule of predict's mask "
                   "and show too).")
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
@progress_option()
def evaluate(pred, labels, slices, threshold, sweep, invert, json_path, csv_path, progress):
    """Score PRED (probabilities or mask, e.g. pred.zarr) against LABELS (binary labels: 1 or
    255 = cell interior, 0 = membrane): pixel metrics and the ISBI 2012 V-Rand / V-Info / Rand
    error, per slice and averaged, each named by its threshold.

    A prediction of a region (predict --roi) is scored against the same region of full-size
    LABELS (its offset is in its metadata); --slices then count in the labels' slices.
    """
    from emtile.metrics import evaluate as run, format_report

    result = run(pred, labels, slices=slices, threshold=threshold, sweep=sweep, invert=invert,
                 progress=progress, json_path=json_path, csv_path=csv_path)
    click.echo(format_report(result))
    if json_path:
        click.echo(f"\nwrote {json_path}")
    if csv_path:
        click.echo(f"wrote {csv_path}")
