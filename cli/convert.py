"""``emtile convert``: any stack -> chunked, compressed OME-Zarr."""

import click

from emtile.cli._types import IntTuple


@click.command()
@click.argument("input", metavar="INPUT")
@click.argument("output", metavar="OUTPUT")
@click.option("--labels", is_flag=True, help="Store a binary mask as uint8 {0,1} (accepts 0/1, 0/255, bool).")
@click.option("--threshold", type=float, default=None,
              help="With --labels: binarise as value > T (for masks with more than two values).")
@click.option("--channel", type=int, default=None, help="For RGB / multi-channel stacks: the channel to keep.")
@click.option("--dataset", default=None, help="HDF5 input: the dataset inside the file.")
@click.option("--chunks", type=IntTuple(), default=None,
              help="Chunk shape Z,Y,X (default 1,1024,1024 capped at the slice size: suits 2-D tiles).")
@click.option("--voxel-size", type=IntTuple(cast=float), default=None,
              help="Voxel size Z,Y,X in nm (default 1,1,1, recorded as unknown).")
@click.option("--levels", type=click.IntRange(min=1), default=1, show_default=True,
              help="Resolution levels for viewers (each halves y and x).")
@click.option("--compression", type=click.Choice(["zstd", "lz4", "lz4hc", "zlib", "blosclz", "none"]),
              default="zstd", show_default=True, help="Blosc compressor.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--allow-partial", is_flag=True,
              help="Convert the complete pages of a TIFF cut short (refused otherwise); the store "
                   "records what was expected and what was found, and 'emtile info' shows it.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def convert(input, output, labels, threshold, channel, dataset, chunks, voxel_size, levels,
            compression, overwrite, allow_partial, progress):
    """Convert INPUT (TIFF, PNG/TIFF folder or glob, Zarr, HDF5) to an OME-Zarr store OUTPUT.

    \b
    emtile convert stack.tif vol.zarr
    emtile convert labels.tif labels.zarr --labels
    emtile convert 'slices/*.png' vol.zarr --voxel-size 50,4,4 --levels 3
    """
    from emtile.volume import convert as run, format_info

    result = run(input, output, labels=labels, threshold=threshold, channel=channel,
                 dataset=dataset, chunks=chunks, voxel_size=voxel_size, levels=levels,
                 compression=compression, overwrite=overwrite, allow_partial=allow_partial,
                 progress=progress)
    click.echo(f"wrote {output}")
    click.echo(format_info(result))
