"""``emtile bench``: the model alone against the whole predict path, on this machine."""

import json

import click

from emtile.cli._types import amp_option, device_option


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
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench(base, depth, tile, batch_size, device, tiles, channels_last, amp, num_workers, repeat,
          data, seed, as_json):
    """Time a random-weight U-Net alone on tiles in memory, then the full predict path on a
    Zarr volume of the same tiles; print both, their ratio, voxels/s and peak memory."""
    from emtile.bench import format_bench, run_bench

    result = run_bench(base=base, depth=depth, tile=tile, batch_size=batch_size, device=device,
                       tiles=tiles, channels_last=channels_last, amp=amp,
                       num_workers=num_workers, repeat=repeat, data=data, seed=seed)
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))
