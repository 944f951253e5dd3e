"""``emtile info``: what a volume is and whether it is complete."""

import json

import click


def _size(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def format_partial(partial):
    """One line for a store converted with --allow-partial: what was expected, what was found."""
    found = "x".join(str(n) for n in partial["found"])
    return f"converted {found} (the complete pages); expected {partial['expected']}"


def format_info(d):
    """Readable lines for the dict that :func:`emtile.info` returns."""
    complete = {True: "yes", False: "NO (interrupted or still being written)", None: "-"}[d["complete"]]
    lines = [
        f"path          {d['path']}",
        f"shape         {d['shape'] or '-'}",
        f"dtype         {d['dtype'] or '-'}",
        f"chunks        {d['chunks'] or '-'}",
        f"compressor    {d['compressor'] or '-'}",
        f"uncompressed  {_size(d['bytes_uncompressed'])}",
    ]
    if d.get("bytes_on_disk_level0") is not None and d["bytes_uncompressed"] is not None:
        ratio = d["bytes_uncompressed"] / max(d["bytes_on_disk_level0"], 1)
        lines.append(f"on disk       {_size(d['bytes_on_disk_level0'])} (ratio {ratio:.2f}); "
                     f"whole store {_size(d['bytes_on_disk'])}")
    else:
        lines.append(f"on disk       {_size(d['bytes_on_disk'])}")
    if d["voxel_size"]:
        vs = " x ".join(f"{v:g}" for v in d["voxel_size"].values())
        note = f"  ({d['voxel_size_note']})" if d.get("voxel_size_note") else ""
        lines.append(f"voxel size    {vs} nm ({','.join(d['voxel_size'])}){note}")
    if d["levels"]:
        lines.append(f"levels        {d['levels']}")
    if d["kind"]:
        lines.append(f"kind          {d['kind']}")
    lines.append(f"complete      {complete}")
    if d.get("partial"):
        lines.append(f"partial       YES: {format_partial(d['partial'])}")
    for key in ("min", "max", "mean"):
        if key in d:
            lines.append(f"{key:<13} {d[key]:.6g}")
    return "\n".join(lines)


@click.command()
@click.argument("path")
@click.option("--stats", is_flag=True, help="Also compute min/max/mean, chunk by chunk.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(path, stats, as_json):
    """Describe the volume at PATH: shape, dtype, chunks, sizes, voxel size, completeness."""
    from emtile.volume import info as run

    d = run(path, stats=stats, progress=stats and not as_json)
    click.echo(json.dumps(d, indent=2) if as_json else format_info(d))
