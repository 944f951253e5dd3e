"""``emtile show``: comparison figures (raw / probability / mask / truth / errors /
segmentation) and training curves."""

import click

from emtile.cli._types import LABELS_HELP, Roi, SliceList


@click.command()
@click.argument("raw", required=False)
@click.option("--pred", default=None,
              help="Prediction: probabilities (pred.zarr) or a mask; a prediction of a region "
                   "(predict --roi) is drawn over the same region of RAW and --labels.")
@click.option("--labels", default=None, help=LABELS_HELP)
@click.option("--seg", default=None,
              help="Label image (emtile segment's seg.zarr): its instances in distinct colours "
                   "over RAW, titled with its scores when --labels is given.")
@click.option("--slices", type=SliceList(), default=None,
              help="Slices to draw, one row each, in RAW's numbering: 25,27 or 25:28 (default: "
                   "the first).")
@click.option("--roi", type=Roi(), default=None,
              help="Crop y0:y1,x0:x1 (or z0:z1,y0:y1,x0:x1); only that region is read.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Cell interior where probability > threshold (the rule of predict's mask and "
                   "evaluate too); the scores are also shown at the best threshold.")
@click.option("--invert", is_flag=True, help="PRED is a membrane probability: use 1 - p.")
@click.option("--log", "log", type=click.Path(), default=None,
              help="Draw the training curve of this run folder (train's --out) or its "
                   "train.csv instead; a run folder marks the batch-norm freeze and the "
                   "calibration.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Figure file to write: .png or .pdf.")
@click.option("--dpi", type=click.IntRange(30, 1200), default=150, show_default=True,
              help="Resolution of PNG output.")
@click.option("--title", default=None, help="Figure title.")
@click.option("--planes", is_flag=True,
              help="Draw a 3-D volume as three orthogonal planes (XY, XZ, YZ) through --at, "
                   "at the voxel size the stores record: --seg and --labels are then id "
                   "volumes (a segmentation and a ground truth, instances in colour over RAW), "
                   "--pred a probability map or affinities. Implied by --at, --channel and an "
                   "affinity --pred.")
@click.option("--at", default=None, metavar="Z,Y,X",
              help="Voxel where the planes cross [default: the volume's centre].")
@click.option("--channel", type=click.IntRange(min=0), default=None,
              help="Channel of an affinity --pred to draw [default: the mean of its "
                   "nearest-neighbour channels].")
def show(raw, pred, labels, seg, slices, roi, threshold, invert, log, output, dpi, title, planes,
         at, channel):
    """Draw RAW with --pred/--labels/--seg (panels per slice, an error overlay in EM terms,
    scores at the threshold and at the best one, a segmentation's instances in colour), a 3-D
    volume's orthogonal planes (--planes), or the training curve of --log RUN (or of RUN given
    as RAW); write it to -o fig.png|pdf."""
    from emtile.plot import show as run

    run(raw, pred=pred, labels=labels, seg=seg, slices=slices, roi=roi, threshold=threshold,
        invert=invert, log=log, output=output, dpi=dpi, title=title, planes=planes, at=at,
        channel=channel)
    click.echo(f"wrote {output}")
