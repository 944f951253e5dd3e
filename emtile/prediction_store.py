"""What a prediction store holds besides its probabilities: the shards its blocks own, and the
record of an affinity model's channels.

Shards. Every array of a prediction (probabilities, mask, every pyramid level) can be stored with
Zarr v3's sharding codec (:func:`emtile.store.create_image` ``shards=``). A block writes its whole
box of every level in one assignment, so when the shards are the block plan's blocks (``"auto"``)
or divide them, each shard file is written once, whole, by the one block that owns it (zarr
replaces a file atomically): two processes never write the same file, and a killed run leaves
each shard written whole or not at all. The chunks stay the shards' inner chunks, so readers
still read small pieces.

Affinities. A model whose metadata records ``"target": "affinities"`` and its ``"offsets"``
(:func:`emtile.model.target_record`) predicts one channel per offset; its store names each
channel by its offset (NGFF ``omero.channels[].label``, ``"aff -1,0,0"``) and records the target
and offsets in ``attrs["emtile"]``, which the segmenter reads. What a binary mask of affinities
would mean is not defined, so such a prediction writes none (``threshold=`` is refused).
"""

from emtile._errors import EmtileError

__all__ = ["resolve_shards", "affinity_record", "channel_names", "NO_MASK_NOTE"]

#: Why an affinity prediction has no ``labels/mask`` (its provenance and ``emtile info`` say it).
NO_MASK_NOTE = ("no mask for an affinity model: a binary mask of affinities is not defined "
                "(segment the affinities instead)")


def resolve_shards(shards, plan):
    """The level-0 shard shape (one size per axis of the plan's region) that ``shards`` asks
    for, or None (unsharded).

    ``"auto"``: the block shape, so every block owns whole shards (one file per block per
    level; a block that took in the short tail of an axis owns two along it). ``"none"`` / None:
    unsharded. A shape: one size per axis of the output, each a whole multiple of the output
    chunks that divides the block (or holds the whole axis), else a one-line error naming
    ``shards=``.
    """
    if shards is None or shards == "none":
        return None
    region = plan.grid.region_shape
    chunks, block = tuple(plan.chunks), tuple(plan.block_shape)
    if shards == "auto":
        return tuple(min(b, -(-n // c) * c) for b, c, n in zip(block, chunks, region))
    shards = tuple(int(s) for s in shards)
    names = "zyx"[-len(region):] if len(region) <= 3 else None
    if len(shards) != len(region):
        raise EmtileError(f"shards={shards} must give one size per axis of the output "
                          f"({','.join(names or [])}: shape {region})")
    for ax, (s, c, b, n) in enumerate(zip(shards, chunks, block, region)):
        whole = s >= n and b >= n  # one shard for the axis only where one block spans it
        if not whole and (s % c or b % s):
            raise EmtileError(
                f"shards={shards} along {names[ax] if names else ax}: {s} must be a whole "
                f"multiple of the output chunk ({c}) that divides the block ({b}), so that a "
                f"block owns whole shards; e.g. shards={block}")
    return tuple(min(s, -(-n // c) * c) for s, c, n in zip(shards, chunks, region))


def affinity_record(model, channels, threshold):
    """``{"target": "affinities", "offsets": [...]}`` for an affinity model (checked against
    its ``channels`` and ``threshold``), {} for a boundary model."""
    if model.target != "affinities":
        return {}
    offsets = [list(o) for o in model.offsets]
    if len(offsets) != channels:
        raise EmtileError(f"the model records {len(offsets)} affinity offsets but predicts "
                          f"{channels} channels: its metadata's offsets must name every channel")
    if threshold is not None:
        raise EmtileError(f"threshold={threshold} writes a binary mask, which is not defined "
                          f"for an affinity model: leave threshold out")
    return {"target": "affinities", "offsets": offsets}


def channel_names(offsets):
    """``["aff -1,0,0", ...]``: each affinity channel named by its offset."""
    return ["aff " + ",".join(str(int(v)) for v in o) for o in offsets]
