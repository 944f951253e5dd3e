"""``emtile segment``: a probability map into labelled cells, block by block, into an OME-Zarr label
image whose labels do not depend on the blocks."""

import click

from emtile.cli._storage import storage_option
from emtile.cli._types import IntTuple, defaults, pop_runner, progress_option, runner_options
from emtile.settings import CALIBRATIONS, METHODS, MODES, SEEDS, SegmentSettings

_D = defaults(SegmentSettings)


class Quantile(click.ParamType):
    """A number in (0, 1], or ``mean`` (None)."""

    name = "Q|mean"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if str(value).strip().lower() == "mean":
            return None
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} must be a number in (0, 1] or 'mean'", param, ctx)


@click.command()
@click.argument("pred", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--method", default=_D.method, show_default=True, type=click.Choice(METHODS),
              help="cc: connected components of the interior (p > threshold), boundaries "
                   "flooded from them. ws: seeds (--seeds) flooded into fragments by a watershed "
                   "on the boundary map, merged across faces whose boundary probability "
                   "(--merge-quantile) is at most --merge-threshold.")
@click.option("--mode", default=_D.mode, show_default=True, type=click.Choice(MODES),
              help="2d: each z-slice on its own (serial sections); 3d: connect through z. "
                   "auto: 3d only for a stack predicted by a 3-D model.")
@click.option("--threshold", default=_D.threshold, show_default=True, type=float,
              help="Cell interior is p > T (as emtile predict --threshold), T in [0, 1].")
@click.option("--min-size", default=_D.min_size, show_default=True, type=int,
              help="Objects of fewer interior pixels (p >= T) join the neighbour they share "
                   "the largest face with (dropped if they have none).")
@click.option("--merge-threshold", default=_D.merge_threshold, show_default=True,
              type=float,
              help="ws: merge neighbouring fragments while the boundary probability (1 - p) "
                   "on their shared face (--merge-quantile) is at most this, in [0, 1].")
@click.option("--seeds", default=_D.seeds, show_default=True, type=click.Choice(SEEDS),
              help="ws: seeds are the interior's connected components, or the maxima of its "
                   "distance to the boundary (several per cell). Affinities: the components "
                   "of the links, or the maxima of the distance to the unlinked pairs.")
@click.option("--merge-quantile", default=_D.merge_quantile, show_default=True, type=Quantile(),
              help="ws: measure a face by this quantile (0 < Q <= 1) of its pixels' boundary "
                   "probabilities, or by their mean.")
@click.option("--invert", is_flag=True, default=_D.invert,
              help="PRED is a boundary map (1 = membrane, e.g. another tool's): use 1 - p.")
@click.option("--keep-boundaries", is_flag=True, default=_D.keep_boundaries,
              help="Leave boundary pixels (p < T) 0 instead of giving them to the cells.")
@click.option("--block-size", default=_D.block_size,
              type=IntTuple(positive=False, example="1,1024,1024"),
              help="Block shape in pixels, one number per axis [default: about 4 M pixels; "
                   "2d: whole slices up to 1024x1024]. The labels do not depend on it.")
@click.option("--grow", default=_D.grow, type=int,
              help="How far (pixels) labels are carried: boundary pixels further from every "
                   "cell stay 0. It also sets the context each block reads [default: 32 for a "
                   "probability map, 4 for affinities].")
@click.option("--offsets", default=_D.offsets,
              help="Affinities without recorded offsets (a (C, Z, Y, X) TIFF, HDF5 file.h5:"
                   "dataset or Zarr array): one dz,dy,dx per channel, ';'-separated, e.g. "
                   "\"-1,0,0;0,-1,0;0,0,-1\" (the three nearest neighbours must be there). "
                   "An emtile affinity store records its own.")
@click.option("--recut", default=_D.recut, type=float,
              help="PRED is a segmentation made from affinities: write OUTPUT at this merge "
                   "threshold from its stored fragments and region graph (seconds; the bytes a "
                   "fresh run with --merge-threshold T gives); the other segmentation options are "
                   "the ones PRED was made with (giving one is refused).")
@click.option("--calibrate", default=_D.calibrate, show_default=True,
              type=click.Choice(CALIBRATIONS),
              help="map: read the map's levels on the scale the defaults were tuned on (each "
                   "level becomes the reference level of the same rank in the whole map), so a "
                   "map more or less sure of itself is segmented alike. none: as stored. auto: "
                   "map unless --threshold or --merge-threshold is given (they then mean the "
                   "map's own levels).")
@click.option("--settings", "start", default="default", show_default=True,
              type=click.Choice(("default", "model")),
              help="default: emtile's defaults. model: the threshold and merge threshold that the "
                   "model which made PRED recorded when training tuned them on its validation "
                   "slices (emtile info MODEL shows them); options given here still win.")
@click.option("--report", is_flag=True,
              help="Also print the faces that merged close to --merge-threshold, and where the "
                   "threshold would cut the map when its own levels are used (one more read). "
                   "Fragments merged, where the threshold cut the map and warnings are printed "
                   "either way.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing OUTPUT (an interrupted run then starts over).")
@progress_option()
@runner_options()
@click.option("--levels", default=_D.levels, show_default=True, type=click.IntRange(min=1),
              help="Resolution levels: an OME-Zarr label pyramid for viewers (each level halves "
                   "y and x by sampling, so no level shows an id that level 0 does not), written "
                   "as blocks finish; block sizes in y and x must be divisible by 2^(N-1).")
@storage_option()
@click.pass_context
def segment(ctx, pred, output, overwrite, progress, storage_options, report, start, **options):
    """Segment the probability map PRED (written by emtile predict) into the label image OUTPUT.

    Every cell gets its own id (1..N, 0 = background), uint32 or uint64; OUTPUT is an OME-Zarr
    label image (NGFF image-label) with PRED's voxel size and position. The result is the same
    for every block size, in this process or on a cluster. An interrupted run started again
    (same PRED and options, without --overwrite) finishes the blocks that are missing, locally
    or on a cluster, in any mix.

    \b
    emtile segment pred.zarr seg.zarr
    emtile segment pred.zarr seg.zarr --settings model   (the model's tuned settings)
    emtile segment pred.zarr seg.zarr --report           (how sure: merges, close calls)
    emtile segment pred.zarr seg.zarr --cluster local --cluster-workers 2 --levels 4
    emtile segment pred.zarr seg.zarr --cluster tcp://10.0.0.5:8786
    emtile segment aff.zarr seg.zarr                  (an emtile affinity store)
    emtile segment aff.tif seg.zarr --offsets "-1,0,0;0,-1,0;0,0,-1"
    emtile segment seg.zarr seg_04.zarr --recut 0.4   (another merge threshold, no fragments)
    emtile segment s3://bucket/pred.zarr s3://bucket/seg.zarr   (an object store)

    PRED may also hold affinities (C, Z, Y, X): pairs above --threshold are linked, their
    components flooded into fragments, merged while 1 - affinity across a face is at most
    --merge-threshold; OUTPUT then keeps the fragments and the region graph for --recut.
    """
    from emtile.segmenter import segment as run

    runner = pop_runner(options)
    given = {name for name in ("threshold", "merge_threshold")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if options["calibrate"] == "auto" and given:
        options["calibrate"] = "none"  # a threshold given means the map's own level
    if start == "model":  # the model's tuned settings (equal to the defaults: scored calibrated)
        from emtile.tuned_settings import resolve

        tuned, note = resolve(pred, "model", given)
        options.update(tuned)
        click.echo(note)
    result = run(pred, output, SegmentSettings(**options), runner, overwrite=overwrite,
                 progress=progress, storage_options=storage_options, report=report)
    if any(result.blocks_resumed) and len(result.blocks_resumed) == 1:
        click.echo(f"resumed: {result.blocks_resumed[0]} of {result.blocks} blocks were done")
    elif any(result.blocks_resumed):
        labels, fragments, write = result.blocks_resumed
        click.echo(f"resumed: of {result.blocks} blocks, {labels} (labels), {fragments} "
                   f"(fragments) and {write} (write) were already done")
    click.echo(str(result))
    if result.report is not None:
        for line in result.report.lines(full=report):
            click.echo(line)
