"""``emtile info``: what a volume is and whether it is complete."""

import json

import click


@click.command()
@click.argument("path")
@click.option("--stats", is_flag=True, help="Also compute min/max/mean, chunk by chunk.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(path, stats, as_json):
    """Describe the volume at PATH: shape, dtype, chunks, sizes, voxel size, completeness."""
    from emtile.volume import format_info, info as run

    d = run(path, stats=stats, progress=stats and not as_json)
    click.echo(json.dumps(d, indent=2) if as_json else format_info(d))
