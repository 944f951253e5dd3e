"""``emtile info``: what a volume, a model or a training run is."""

import json

import click

from emtile.cli._storage import storage_option


@click.command()
@click.argument("path")
@click.option("--stats", is_flag=True, help="Volumes: also compute min/max/mean, chunk by chunk.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@storage_option()
def info(path, stats, as_json, storage_options):
    """Describe PATH: a volume (shape, dtype, chunks, sizes, voxel size, completeness; a
    prediction's model, options, region and mask), a model folder or package (architecture,
    valid tile sizes, training data, voxel size, normalisation, calibration, scores) or a
    training run folder."""
    from emtile import describe

    d = describe.info(path, stats=stats, progress=stats and not as_json,
                      storage_options=storage_options)
    click.echo(json.dumps(d, indent=2, default=str) if as_json else describe.format_info(d))
