"""``emtile bench``: the model alone against the whole predict path, on this machine; with
``--pipeline``, predict's data path alone (a null model) and where its time goes."""

import json

import click

from emtile.cli._types import IntTuple, Sizes, amp_option, device_option


class Tile(Sizes):
    """A tile size: one positive integer (a square in 2-D, a cube in 3-D) or ``Z,Y,X``."""

    invalid = ("is not a tile size: give an integer such as 572, or Z,Y,X such as 172,172,172 "
               "with --ndim 3")
    nonpositive = "the tile size must be positive"


class Factors(click.ParamType):
    """Down-sampling factors per level: ``z,y,x`` triples separated by ``;``."""

    name = "Z,Y,X;Z,Y,X;..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            out = tuple(tuple(int(v) for v in level.split(",")) for level in str(value).split(";"))
        except ValueError:
            self.fail(f"{value!r} is not a list of factors: give one z,y,x per level, separated "
                      f"by ';', e.g. 1,2,2;2,2,2", param, ctx)
        return out


@click.command()
@click.option("--base", type=click.IntRange(min=1), default=64, show_default=True,
              help="U-Net channels at the first level (64 in the paper).")
@click.option("--depth", type=click.IntRange(min=0), default=4, show_default=True,
              help="U-Net depth (number of 2x2 max-pools).")
@click.option("--ndim", type=click.Choice(["2", "3"]), default="2", show_default=True,
              help="A 2-D U-Net predicting slice by slice, or a 3-D one over Z,Y,X tiles.")
@click.option("--tile", type=Tile(), default=None,
              help="Input tile size; must be valid for the network (572 -> 388 at depth 4 in "
                   "2-D, the default there). With --ndim 3: Z,Y,X or one size for a cube "
                   "(default: the smallest valid size per axis with an output of at least 64).")
@click.option("--factors", type=Factors(), default=None,
              help="With --ndim 3: down-sampling factors per level, z,y,x each, e.g. "
                   "'1,2,2;2,2,2' for depth 2 (default: from --voxel-size).")
@click.option("--voxel-size", type=IntTuple(3, cast=float, example="10,10,10"), default=None,
              help="With --ndim 3: the voxel size Z,Y,X in nm that the default --factors follow "
                   "[default: 10,10,10].")
@click.option("--out-channels", type=click.IntRange(min=1), default=1, show_default=True,
              help="Output channels (e.g. 3 or 5 affinities); predict writes them uint8.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tiles per forward pass, for both measurements.")
@device_option()
@click.option("--tiles", type=click.IntRange(min=1), default=8, show_default=True,
              help="Tiles timed in each measurement (the predicted volume is exactly this many "
                   "output tiles: up to 2x2 per slice in 2-D, a box of them in 3-D).")
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
def bench(base, depth, ndim, tile, factors, voxel_size, out_channels, batch_size, device, tiles,
          channels_last, amp, num_workers, repeat, data, seed, pipeline, shape, as_json):
    """Time a random-weight U-Net alone on tiles in memory, then the full predict path on a
    Zarr volume of the same tiles; print both, their ratio, voxels/s and peak memory.

    With --pipeline, time predict's whole path with a model that costs nothing instead, and
    where the time goes: read and decode, normalise, tile assembly and mirroring, the (null)
    model and its transfers, stitch, encode and write."""
    ndim = int(ndim)
    if pipeline:
        from emtile._errors import EmtileError

        if ndim != 2 or factors is not None or voxel_size is not None or out_channels != 1:
            raise EmtileError("pipeline=True times the 2-D path only: leave ndim, factors, "
                              "voxel_size and out_channels at their defaults")
        tile = 572 if tile is None else tile
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
                       tiles=tiles, ndim=ndim, factors=factors, voxel_size=voxel_size,
                       out_channels=out_channels, channels_last=channels_last, amp=amp,
                       num_workers=num_workers, repeat=repeat, data=data, seed=seed)
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))
