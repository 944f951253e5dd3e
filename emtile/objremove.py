"""Removing an emtile store on an object store, where there is no rename.

On a local disk :func:`emtile.store.remove_store` renames the store away first, so a kill part-way
leaves no half store under the output's name. An object store has no rename (a "move" is a copy
of every object), so :func:`remove_store` keeps the same promise by ordering the deletes instead:

1. the root ``zarr.json`` is rewritten with ``emtile.complete = false`` and no fingerprints or
   other attributes (one PUT, atomic): from here on the store is an incomplete emtile store
   that no stage resumes (no fingerprint matches), so :func:`emtile.store.prepare_output` replaces
   it and ``emtile info`` says incomplete;
2. every done-marker array (``emtile_blocks``, the working groups ``emtile_segment/`` and
   ``emtile_recut/``) goes next,
   its ``zarr.json`` first;
3. then every other object, the root ``zarr.json`` last.

A kill at any point leaves either nothing or that incomplete, unresumable group, which the next
``prepare_output`` removes the same way; never a store that looks complete or resumable.
"""

from emtile._errors import EmtileError
from emtile.locations import Location

__all__ = ["remove_store", "removal_order", "ROOT"]

ROOT = "zarr.json"
# done-markers and working data: markers.MARKERS, segmenter.blocks.TEMP, segmenter.recut.WORK
# (spelled out: this module stays free of NumPy and Zarr)
_MARKER_PREFIXES = ("emtile_blocks", "emtile_segment", "emtile_recut")


def removal_order(keys):
    """The keys of a store in the order :func:`remove_store` deletes them (without the root
    ``zarr.json``, deleted last)."""
    keys = [k for k in keys if k != ROOT]

    def rank(key):
        head = key.split("/", 1)[0]
        if head in _MARKER_PREFIXES:
            return (0, not key.endswith(ROOT), key)  # metadata first: the array vanishes at once
        return (1, False, key)

    return sorted(keys, key=rank)


def remove_store(output):
    """Delete the emtile Zarr store at ``output`` (a URL or a local path's Location) in the order
    the module docstring gives. Anything that is not a Zarr v3 group is refused."""
    loc = Location(output)
    if loc.read_only:
        raise EmtileError(f"output {loc.url!r} is read only ({loc.scheme}://)")
    root = loc.read_json(ROOT)
    if not isinstance(root, dict) or root.get("node_type") != "group":
        raise EmtileError(f"refusing to delete {loc.url!r}: it is not a Zarr v3 group")
    attrs = root.get("attributes") or {}
    meta = attrs.get("emtile") or {}
    root["attributes"] = {"emtile": {"format": meta.get("format", 1), "kind": meta.get("kind"),
                                     "complete": False, "removing": True}}
    loc.write_json(root, ROOT)
    from emtile import _faults

    _faults.point("store.removing")
    order = removal_order(loc.keys())
    markers = [k for k in order if k.split("/", 1)[0] in _MARKER_PREFIXES]
    loc.delete([k for k in markers if k.endswith(ROOT)])  # one batch may be deleted in any order
    loc.delete([k for k in markers if not k.endswith(ROOT)])
    loc.delete(order[len(markers):])
    loc.delete([ROOT])
