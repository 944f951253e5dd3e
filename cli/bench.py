"""``emtile bench``: the model alone against the whole predict path, on this machine; with
``--pipeline``, predict's data path alone (a null model) and where its time goes."""

import json

import click

from emtile.cli._types import IntTuple, amp_option, device_option


@click.command()
@click.option("--base", type=click.IntRange(min=1), default=64, show_default=True,
              help="U-Net channels at the first level (64 in the paper).")
@click.option("--depth", type=click.IntRange(min=0), default=4, show_default=True,
              help="U-Net depth (number of 2x2 max-pools).")
@click.option("--tile", type=click.IntRange(min=1), default=572, show_default=True,
              help="Input tile size; must be valid for --depth (572 -> 388 at depth 4).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tiles per forward pass, for both measurements.")
@device_option()
@click.option("--tiles", type=click.IntRange(min=1), default=8, show_default=True,
              help="Tiles timed in each measurement (the predicted volume is exactly this many "
                   "output tiles, up to 2x2 per slice).")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Run the model in channels_last memory format (faster on CPU).")
@amp_option("off")
@click.option("--workers", "num_workers", type=click.IntRange(min=0), default=None,
              help="DataLoader workers for predict (default: predict's default).")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Interleaved rounds of (model alone, predict); the best of each is shown.")
@click.option("--data", type=click.Path(exists=True), default=None,
              help="A stack whose slices are mirrored to build the test volume (e.g. ISBI's "
                   "train-volume.tif); default random data.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for the random weights, tiles and data.")
@click.option("--pipeline", is_flag=True,
              help="Time predict's data path alone instead: a null model with the U-Net's "
                   "geometry (it crops each tile to its valid output), so reading, "
                   "normalising, tiling, stitching and writing are all that cost; print "
                   "Mvoxel/s and the seconds of each part (--base is not used).")
@click.option("--shape", type=IntTuple(3, example="72,2048,2048"), default=None,
              help="With --pipeline: the volume's Z,Y,X instead of --tiles output tiles.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench(base, depth, tile, batch_size, device, tiles, channels_last, amp, num_workers, repeat,
          data, seed, pipeline, shape, as_json):
    """Time a random-weight U-Net alone on tiles in memory, then the full predict path on a
    Zarr volume of the same tiles; print both, their ratio, voxels/s and peak memory.

    With --pipeline, time predict's whole path with a model that costs nothing instead, and
    where the time goes: read and decode, normalise, tile assembly and mirroring, the (null)
    model and its transfers, stitch, encode and write."""
    if pipeline:
        from emtile.bench_pipeline import format_pipeline, run_pipeline

        result = run_pipeline(depth=depth, tile=tile, batch_size=batch_size, device=device,
                              tiles=tiles, shape=shape, channels_last=channels_last, amp=amp,
                              num_workers=num_workers, repeat=repeat, data=data, seed=seed)
        click.echo(json.dumps(result, indent=2) if as_json else format_pipeline(result))
        return
    if shape is not None:
        from emtile._errors import EmtileError

        raise EmtileError(f"shape={','.join(map(str, shape))} only applies with pipeline=True")
    from emtile.bench import format_bench, run_bench

    result = run_bench(base=base, depth=depth, tile=tile, batch_size=batch_size, device=device,
                       tiles=tiles, channels_last=channels_last, amp=amp,
                       num_workers=num_workers, repeat=repeat, data=data, seed=seed)
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))
