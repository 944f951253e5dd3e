"""The output rules of :mod:`emtile.store` for an output on an object store (a URL).

:func:`check_output` and :func:`prepare_output` keep the promises of their local namesakes in
``store.py`` (which hands URLs to them): an output that is, holds or lies inside an input (or
the Zarr store that holds it) is refused before any work; an output that cannot be written
there is refused before any work; an existing complete store is kept unless ``overwrite``; an
incomplete emtile store is replaced or resumed; anything else under the prefix that is not a
Zarr store is never deleted. Removal is :func:`emtile.objremove.remove_store` (no rename).
"""

import uuid

from emtile._errors import EmtileError, one_line
from emtile.locations import Location, is_url
from emtile.objremove import ROOT, remove_store

__all__ = ["check_output", "prepare_output", "emtile_attrs", "is_complete", "is_zarr_store",
           "store_root"]


def _root_doc(loc):
    try:
        doc = loc.read_json(ROOT)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("zarr_format") == 3 else None


def is_zarr_store(output):
    """Whether a Zarr v3 group or array's ``zarr.json`` is at ``output`` (one GET)."""
    return _root_doc(Location(output)) is not None


def emtile_attrs(output):
    """The ``emtile`` attributes of the Zarr v3 group at ``output`` (one GET), or None."""
    doc = _root_doc(Location(output))
    if doc is None or doc.get("node_type") != "group":
        return None
    return (doc.get("attributes") or {}).get("emtile")


def is_complete(output):
    meta = emtile_attrs(output)
    return bool(meta and meta.get("complete"))


def store_root(loc):
    """The outermost Zarr store holding ``loc`` (itself when no prefix above it is one; a
    prefix between two stores, ``labels/`` without its group, does not stop the search)."""
    root = here = Location(loc)
    while "/" in here.path:  # a bucket (or host) is never a store
        here = here.parent
        if "/" in here.path and _root_doc(here) is not None:
            root = here
    return root


def _inputs(inputs, output):
    """``(spec, location)`` of every input on the same kind of place as ``output``."""
    for spec in inputs:
        if not (isinstance(spec, Location) or is_url(spec)):
            continue  # arrays, None, and local paths (never the same place as a URL)
        loc = Location(spec)
        yield spec, loc
        root = store_root(loc)
        if root != loc:
            yield spec, root


def check_output(output, *, inputs=()):
    """Refuse, before any work, a URL output that could destroy an input or cannot be written.

    Raises
    ------
    EmtileError
        If ``output`` is, holds or lies inside an input or the store holding it (URLs compared
        normalised: scheme, bucket, key); if it is read only (``http(s)://``); if a probe object
        beside it cannot be written and deleted (no bucket, no permission, no endpoint).
    """
    out = Location(output)
    if out.read_only:
        raise EmtileError(f"output {out.url!r} is read only ({out.scheme}://): write to a local "
                          f"path, s3:// or gs://")
    for spec, loc in _inputs(inputs, out):
        how = out.relation(loc)
        if how is not None:
            via = "" if loc == Location(spec) else f" (in its store {loc.url!r})"
            raise EmtileError(f"output {out.url!r} {how} the input {str(spec)!r}{via}: writing "
                              f"it could destroy the input; choose a location outside the input")
    probe = out.sibling(f".{out.name}.emtile-probe-{uuid.uuid4().hex[:12]}")
    try:
        probe.write_bytes(b"")
        probe.parent.delete([probe.name])
    except EmtileError:
        raise
    except Exception as exc:
        raise EmtileError(f"output {out.url!r} cannot be written: {one_line(exc)}") from None


def prepare_output(output, *, overwrite=False, resume=False):
    """Make the URL ``output`` ready for a new store, as :func:`emtile.store.prepare_output`:
    ``"new"`` (nothing under the prefix), ``"resume"`` (an incomplete emtile store, kept when
    ``resume``), ``"replaced"`` (an incomplete one removed, or any Zarr v3 group with
    ``overwrite``); a prefix holding objects but no Zarr v3 group is refused, never deleted."""
    out = Location(output)
    doc = _root_doc(out)
    if doc is None:
        if not out.keys():
            return "new"
        raise EmtileError(f"output {out.url!r} holds objects but no Zarr v3 store; choose "
                          f"another output (emtile never deletes them)")
    if doc.get("node_type") != "group":
        raise EmtileError(f"output {out.url!r} is a Zarr array, not a store emtile writes; "
                          f"choose another output")
    meta = (doc.get("attributes") or {}).get("emtile")
    if meta is not None and not meta.get("complete") and not meta.get("removing"):
        if resume:
            return "resume"
    elif not overwrite and not (meta or {}).get("removing"):  # a half-done removal is finished
        raise EmtileError(f"output {out.url!r} already exists; pass overwrite=True to replace it")
    remove_store(out)
    return "replaced"
