"""The shards ``emtile convert`` writes (light: no NumPy, no Zarr).

Convert writes a stack slab by slab (:func:`emtile.stacks.slab_depth`, about 64 MB) and each
slab as pieces that a pool of threads writes side by side. With Zarr v3's sharding codec a shard
is one file; zarr writes a shard assigned whole in one go, but a part of a shard is a
read-modify-write of its file. So the shards follow the slabs: a shard is whole slabs deep in z
(the slab depth is a whole multiple of the shard's z), and each piece a thread writes is one
row of whole shards, at every level. Every shard file is then written once, whole, by one
thread, and never by two slabs.

``"auto"`` (the default, :data:`SHARDS`): one slab deep, one row of chunks in y (a few rows
where pyramid levels halve the chunks too, so that every level's shards stay whole chunks), the
whole slice in x: about one file per slab per row of chunks per level, each at most a slab's
bytes. ``"none"``: unsharded, one file per chunk (the stores of emtile before sharding; reading
either kind is the same). A shape ``Z,Y,X``: whole multiples of the chunks (checked by
:func:`emtile.store.create_image`); a slab then holds whole shards in z, so a deep ``Z`` makes
slabs (and memory) larger than 64 MB.
"""

from emtile._errors import EmtileError

__all__ = ["SHARDS", "resolve_shards"]

#: What ``convert(shards=...)`` and ``emtile convert --shards`` take by default.
SHARDS = "auto"


def resolve_shards(shards, shape, chunks, depth, *, levels=1, halve=False):
    """The level-0 shard shape ``(Z, Y, X)`` a conversion writes, or None (unsharded).

    Parameters
    ----------
    shards : {"auto", "none"}, None or tuple of int
    shape : tuple of int
        ``(Z, Y, X)`` of the store.
    chunks : tuple of int
        Its chunks, already clipped to ``shape``.
    depth : int
        Slices per slab (a whole multiple of the chunks' z) for ``"auto"``.
    levels : int
        Resolution levels written.
    halve : bool
        Each level's chunks are halved in y and x (label images of ids): ``"auto"`` takes
        enough rows of chunks that every level's shard rows stay whole chunks.

    Examples
    --------
    >>> resolve_shards("auto", (100, 2048, 3000), (1, 1024, 1024), 16)
    (16, 1024, 3072)
    >>> resolve_shards("auto", (100, 2048, 2048), (1, 256, 256), 16, levels=4, halve=True)
    (16, 256, 2048)
    >>> resolve_shards("auto", (10, 1000, 1000), (1, 100, 100), 10, levels=3, halve=True)
    (10, 100, 1000)
    >>> resolve_shards("auto", (10, 1000, 1000), (1, 100, 100), 10, levels=4, halve=True)
    (10, 1000, 1000)
    >>> resolve_shards("auto", (5, 70, 90), (2, 32, 64), 5)
    (6, 32, 128)
    >>> resolve_shards("none", (100, 2048, 2048), (1, 1024, 1024), 16) is None
    True
    """
    if shards is None or shards == "none":
        return None
    z, y, x = (int(v) for v in shape)
    cz, cy, cx = (int(v) for v in chunks)
    whole_x = -(-x // cx) * cx
    if shards == "auto":
        rows = cy
        while halve and not _halves(rows, cy, levels) and rows < y:
            rows += cy  # a shard of rows that every level halves to whole (halved) chunks
        # a slab cut short by the stack's end may be no whole number of chunks: round up
        return (-(-int(depth) // cz) * cz, min(rows, -(-y // cy) * cy), whole_x)
    if isinstance(shards, str):
        raise EmtileError(f"shards={shards!r} is not auto, none or a shape Z,Y,X such as "
                          f"{depth},{cy},{whole_x}")
    try:
        out = tuple(int(v) for v in shards)
    except (TypeError, ValueError):
        raise EmtileError(f"shards={shards!r} is not auto, none or a shape Z,Y,X such as "
                          f"{depth},{cy},{whole_x}") from None
    if len(out) != 3 or min(out) < 1:
        raise EmtileError(f"shards={','.join(map(str, out))} must be 3 positive sizes Z,Y,X, "
                          f"e.g. {depth},{cy},{whole_x}")
    text = ",".join(map(str, out))
    clipped = tuple(min(s, -(-n // c) * c) for s, c, n in zip(out, (cz, cy, cx), (z, y, x)))
    if any(s % c for s, c in zip(clipped, (cz, cy, cx))):
        raise EmtileError(f"shards={text} must be whole multiples of the chunks {cz},{cy},{cx} "
                          f"along every axis (a shard holds whole chunks), e.g. "
                          f"{depth},{cy},{whole_x}")
    if halve and not all(s >= n or _halves(s, c, levels)
                         for s, c, n in zip(clipped[1:], (cy, cx), (y, x))):
        raise EmtileError(f"shards={text}: with levels={levels}, each level's shards must stay "
                          f"whole multiples of its halved chunks; use y and x sizes divisible by "
                          f"{2 ** (levels - 1)} times more chunks, or the whole slice")
    return out


def _halves(rows, cy, levels):
    """True when a shard of ``rows`` rows halves, level after level, to whole multiples of each
    level's chunks (``cy`` halved, at least 1), as :func:`emtile.store.level_shards` requires."""
    for level in range(1, levels):
        f = 2**level
        if rows % f or (rows // f) % max(1, cy // f):
            return False
    return True
