"""``emtile predict``: run a model folder over a volume, tile by tile, into an OME-Zarr store."""

import click

from emtile.cli._storage import storage_option
from emtile.cli._types import (Roi, Shards, Sizes, amp_option, defaults, device_option,
                               pop_runner, progress_option, runner_options)
from emtile.settings import BLENDS, DTYPES, PredictSettings

_D = defaults(PredictSettings)


class TileSize(Sizes):
    """A positive integer tile size, one per axis (``Z,Y,X`` for a 3-D model), or ``auto``."""

    name = "N|Z,Y,X|auto"
    words = ("auto",)
    invalid = ("is not a tile size: give an integer such as 572, one per axis such as "
               "20,132,132, or auto")
    nonpositive = "the tile size must be positive"


@click.command()
@click.argument("input", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--model", "model", required=True, type=click.Path(),
              help="Model folder written by emtile train (RUN/best) or emtile.save_model, or a "
                   "bioimage.io package (.zip) written by emtile export. The model's recorded "
                   "input normalisation is applied to INPUT.")
@click.option("--tile", default=_D.tile, show_default=True, type=TileSize(),
              help="Input tile size (valid for the model's depth, e.g. 572 at depth 4; Z,Y,X for "
                   "a 3-D model, e.g. 20,132,132), or auto: the size that computes the fewest "
                   "pixels for this volume. Default: 572 for a 2-D model, auto for a 3-D one.")
@click.option("--batch-size", default=_D.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Tiles per forward pass.")
@click.option("--workers", "num_workers", default=_D.num_workers, type=click.IntRange(min=0),
              help="DataLoader worker processes reading tiles [default: 0 on CPU (read in this process), "
                   "up to 4 on CUDA].")
@device_option()
@amp_option(_D.amp)
@click.option("--blend", default=_D.blend, show_default=True, type=click.Choice(BLENDS),
              help="Weighting of overlapping tile outputs (used with --overlap).")
@click.option("--overlap", default=_D.overlap, show_default=True, type=click.IntRange(min=0),
              help="Minimum output overlap between neighbouring tiles, in pixels.")
@click.option("--tta", is_flag=True, default=_D.tta,
              help="Test-time augmentation: average over 8 flips/transposes (affinity models: "
                   "over exchanges of alike axes, 6 if isotropic).")
@click.option("--roi", default=_D.roi, type=Roi(),
              help="Region to predict, start:stop per axis, e.g. 0:5,0:256,0:256.")
@click.option("--dtype", default=_D.dtype, show_default=True, type=click.Choice(DTYPES),
              help="Storage type of the probabilities (uint8 stores round(255 p)).")
@click.option("--threshold", default=_D.threshold, type=click.FloatRange(0, 1),
              help="Also write a binary mask at OUTPUT/labels/mask: cell interior where p > T "
                   "(the rule of evaluate and show too). Not for an affinity model: no mask "
                   "is defined for affinities.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing OUTPUT (an interrupted run then starts over).")
@progress_option()
@click.option("--compile", is_flag=True, default=_D.compile,
              help="torch.compile the model (faster at small widths; 10-20 s to compile).")
@click.option("--threads", default=_D.threads, type=click.IntRange(min=1),
              help="Torch threads per process on the CPU [default: this process's setting; on a "
                   "local cluster, cores / workers; on other clusters 1]. A resumed run must use "
                   "the same count.")
@runner_options()
@click.option("--levels", default=_D.levels, show_default=True, type=click.IntRange(min=1),
              help="Resolution levels: an OME-Zarr pyramid for viewers (each level halves y and "
                   "x; probabilities by the mean, the mask by sampling), written as blocks finish.")
@click.option("--shards", default=_D.shards, show_default=True, type=Shards(),
              help="Zarr v3 sharding of every array written: auto = one shard file per block "
                   "per level (blocks own whole shards), none = one file per chunk, or a shard "
                   "shape Z,Y,X (whole output chunks dividing the block). The array bytes are "
                   "the same either way.")
@storage_option()
def predict(input, output, model, overwrite, progress, storage_options, **options):
    """Predict INPUT (TIFF, image folder, Zarr, HDF5) into the OME-Zarr store OUTPUT.

    A 2-D model runs slice by slice over a (Z, Y, X) stack. An interrupted run started again
    (same input, model and options, without --overwrite) finishes the blocks that are missing,
    locally or on a cluster; the output bytes are the same either way.

    \b
    emtile predict --model m/best --tile 572 vol.zarr pred.zarr
    emtile predict --model m/best vol.zarr pred.zarr --cluster local --cluster-workers 2
    emtile predict --model m/best vol.zarr pred.zarr --cluster tcp://10.0.0.5:8786
    emtile predict --model m/best s3://bucket/vol.zarr s3://bucket/pred.zarr
    """
    from emtile.predictor import predict as run

    runner = pop_runner(options)
    result = run(model, input, output, PredictSettings(**options), runner, overwrite=overwrite,
                 progress=progress, storage_options=storage_options)
    if result.tile_probe:
        timed = ", ".join(f"{t}: {s:.2f} s" for t, s in sorted(result.tile_probe.items()))
        click.echo(f"tile auto: timed the model per tile ({timed}); fastest run: "
                   f"{result.tile[-1]}")
    if result.blocks_resumed:
        click.echo(f"resumed: {result.blocks_resumed} of {result.blocks} blocks were already done")
    click.echo(str(result))
