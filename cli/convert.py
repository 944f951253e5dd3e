"""``emtile convert``: any stack -> chunked, compressed OME-Zarr."""

import click

from emtile.cli._storage import storage_option
from emtile.cli._types import IntTuple, Shards, progress_option
from emtile.convert_shards import SHARDS


@click.command()
@click.argument("input", metavar="INPUT")
@click.argument("output", metavar="OUTPUT")
@click.option("--labels", is_flag=True, help="Store a binary mask as uint8 {0,1} (accepts 0/1, 0/255, bool).")
@click.option("--ids", is_flag=True,
              help="With --labels: keep the object ids (instance labels, 0 = unlabelled) instead "
                   "of binarising; uint8/16/32/64 as INPUT is, signed or float ids in the "
                   "smallest unsigned type that holds them (negative or fractional values are "
                   "refused).")
@click.option("--threshold", type=float, default=None,
              help="With --labels: binarise as value > T (for masks with more than two values). "
                   "Not with --ids.")
@click.option("--channel", type=int, default=None, help="For RGB / multi-channel stacks: the channel to keep.")
@click.option("--dataset", default=None, help="HDF5 input: the dataset inside the file.")
@click.option("--chunks", type=IntTuple(3, example="1,1024,1024"), default=None,
              help="Chunk shape Z,Y,X (default 1,1024,1024 capped at the slice size: suits 2-D tiles).")
@click.option("--voxel-size", type=IntTuple(cast=float, example="50,4,4"), default=None,
              help="Voxel size Z,Y,X (Y,X for a single image) in --unit. Default: what the "
                   "input records (OME-XML, ImageJ spacing/unit, TIFF resolution tags, an "
                   "OME-Zarr input's scale), else unknown (recorded as 1 nm, shown as unknown). "
                   "'emtile info' says where it came from. ISBI 2012: 50,4,4 (its TIFFs record "
                   "none).")
@click.option("--unit", type=click.Choice(["nm", "um", "µm", "mm", "angstrom"]), default="nm",
              show_default=True,
              help="Unit of --voxel-size; stores record nanometres (--voxel-size 0.05,0.004,0.004 "
                   "--unit um is 50,4,4 nm).")
@click.option("--levels", type=click.IntRange(min=1), default=1, show_default=True,
              help="Resolution levels for viewers (each halves y and x).")
@click.option("--compression", type=click.Choice(["zstd", "lz4", "lz4hc", "zlib", "blosclz", "none"]),
              default="zstd", show_default=True, help="Blosc compressor.")
@click.option("--shards", type=Shards(), default=SHARDS, show_default=True,
              help="Zarr v3 shards at every level: auto (one slab of about 64 MB deep, one row "
                   "of chunks high, the whole slice wide: each shard file written once, whole, "
                   "by one thread), none (one file per chunk), or a shard shape Z,Y,X of whole "
                   "chunks (slabs are then whole shards deep).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--allow-partial", is_flag=True,
              help="Convert the complete pages of a TIFF cut short (refused otherwise); the store "
                   "records what was expected and what was found, and 'emtile info' shows it.")
@progress_option()
@storage_option()
def convert(input, output, labels, ids, threshold, channel, dataset, chunks, voxel_size, unit,
            levels, compression, shards, overwrite, allow_partial, progress, storage_options):
    """Convert INPUT (TIFF, PNG/TIFF folder or glob, Zarr, HDF5) to an OME-Zarr store OUTPUT.

    The voxel size is --voxel-size if given, else the one INPUT's metadata records.

    \b
    emtile convert stack.tif vol.zarr
    emtile convert labels.tif labels.zarr --labels
    emtile convert groundtruth.tif truth.zarr --labels --ids --voxel-size 10,10,10
    emtile convert 'slices/*.png' vol.zarr --voxel-size 50,4,4 --levels 3
    emtile convert stack.tif vol.zarr --shards none
    emtile convert stack.tif s3://bucket/vol.zarr     (an object store)
    """
    from emtile.converter import convert as run
    from emtile.describe import format_info

    result = run(input, output, labels=labels, ids=ids, threshold=threshold, channel=channel,
                 dataset=dataset, chunks=chunks, voxel_size=voxel_size, unit=unit, levels=levels,
                 compression=compression, overwrite=overwrite, allow_partial=allow_partial,
                 progress=progress, shards=shards, storage_options=storage_options)
    click.echo(f"wrote {output}")
    click.echo(format_info(result))
