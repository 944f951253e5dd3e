"""``recut``: a segmentation from affinities at another merge threshold, without its fragments.

A segmentation made from affinities keeps its fragments and region graph
(:mod:`emtile.segmenter.fragment_graph`). :func:`recut_stage` is one small blockwise stage over
them: its ``before`` agglomerates the stored graph at ``merge_threshold`` in the driver (the
same merges a fresh run makes, so the same ids) and writes the fragment -> object table into the
output's working group; each block maps its stored fragments through it and writes every
pyramid level. It reads no affinities, so it takes seconds where the fragments took minutes; it
resumes like every stage (markers, fingerprint of the segmentation and the threshold) and its
labels are the bytes ``emtile segment`` writes at that threshold (``tests/
test_segment_affinities.py``).

The output is a new label image; the segmentation it came from keeps the graph, so further
recuts start from that one.
"""

import functools
import os
import threading
import uuid
from dataclasses import dataclass

import numpy as np

from emtile._errors import EmtileError

__all__ = ["recut_stage", "RecutJob", "run_recut_blocks", "WORK"]

WORK = "emtile_recut"
_CACHE = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class RecutJob:
    """Paths and the block plan of a recut (small, frozen, picklable)."""

    source: str  # the segmentation that holds the graph
    output: str
    shape: tuple
    block: tuple
    levels: int
    run: str


def _open(job):
    with _LOCK:
        key = (job.output, job.run)
        if key not in _CACHE:
            import zarr

            from emtile.segmenter.fragment_graph import GRAPH

            _CACHE.clear()
            from emtile.store import zarr_target

            out = zarr.open_group(zarr_target(job.output, "r+"), mode="r+", zarr_format=3)
            _CACHE[key] = {"fragments": zarr.open_group(zarr_target(job.source),
                                                        mode="r")[GRAPH]["fragments"],
                           "levels": [out[str(k)] for k in range(job.levels)],
                           "ids": out[WORK]["ids"]}
        return _CACHE[key]


def run_recut_blocks(job, block_ids):
    """Per block: the stored fragments through the table, every level written. Returns the
    labelled voxels per block."""
    from emtile.segmenter.blocks import SegmentPlan
    from emtile.store import downsample

    plan = SegmentPlan(job.shape, job.block)
    arrays = _open(job)
    out = []
    for i in block_ids:
        start, stop = plan[i]
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        frag = np.asarray(arrays["fragments"][box]).astype(np.int64)
        lo, hi = int(frag.min()), int(frag.max())
        lut = np.asarray(arrays["ids"][lo:hi + 1])
        labels = lut[frag - lo].astype(arrays["levels"][0].dtype)
        count = int(np.count_nonzero(labels))
        for k, arr in enumerate(arrays["levels"]):
            if k:
                labels = downsample(labels, labels=True)
            y, x = start[1] >> k, start[2] >> k
            arr[start[0]:stop[0], y:y + labels.shape[1], x:x + labels.shape[2]] = labels
        out.append(count)
    return out


def _source(path):
    """The segmentation's group and its record, checked."""
    import zarr

    from emtile.segmenter.fragment_graph import GRAPH
    from emtile.store import is_zarr_store, zarr_target

    group = zarr.open_group(zarr_target(path), mode="r") if is_zarr_store(path) else None
    meta = group.attrs.asdict().get("emtile", {}) if group is not None else {}
    if group is None or GRAPH not in group or "segment" not in meta:
        raise EmtileError(f"recut= needs a segmentation made from affinities by emtile segment "
                          f"(it keeps fragments and region graph), but {path!r} is not one")
    if not meta.get("complete"):
        raise EmtileError(f"segmentation {path!r} is incomplete: run emtile segment again to "
                          f"finish it before a recut")
    if meta["segment"].get("method") != "ws":
        raise EmtileError(f"segmentation {path!r} was made with method "
                          f"{meta['segment'].get('method')!r}, which merges nothing: recut "
                          f"needs method='ws'")
    return group, meta


class _Steps:
    def __init__(self, job, settings):
        self.job, self.settings, self.count = job, settings, 0
        self.dtype = np.dtype(np.uint32)

    def table(self, group):
        """Before the pass (every run): the stored graph agglomerated at the new threshold."""
        import zarr

        from emtile.segmenter.fragment_graph import agglomerate, read_graph

        from emtile.store import zarr_target

        first, size, faces, attrs = read_graph(zarr.open_group(zarr_target(self.job.source),
                                                               mode="r"))
        ids, self.count = agglomerate(first, size, faces, method=attrs["method"],
                                      merge_threshold=self.settings["merge_threshold"],
                                      merge_quantile=attrs["merge_quantile"],
                                      min_size=attrs["min_size"])
        group[WORK].create_array("ids", shape=ids.shape, chunks=(min(ids.size, 2**20),),
                                 dtype="int64", fill_value=0, overwrite=True)[...] = ids
        dtype = np.dtype(np.uint32 if self.count <= np.iinfo(np.uint32).max else np.uint64)
        for k in range(self.job.levels):
            arr = group[str(k)]
            if arr.dtype != dtype:
                group.create_array(str(k), shape=arr.shape, chunks=arr.chunks, dtype=dtype,
                                   fill_value=0, compressors=arr.compressors,
                                   dimension_names=arr.metadata.dimension_names,
                                   overwrite=True)
        self.dtype = dtype

    def finish(self, group):
        from emtile.store import remove_store

        from emtile.locations import Location

        output = self.job.output
        remove_store(Location(output) / WORK if isinstance(output, Location) else
                     os.path.join(output, WORK))
        return {"objects": self.count}


def _create(job, group_attrs, recorded, source):
    from emtile import __version__, store

    voxel, translation = store.placement(group_attrs)
    image = (group_attrs.get("ome", {}).get("image-label") or {}).get("source", {}).get("image")
    if image is not None and isinstance(source, str) and isinstance(job.output, str):
        image = os.path.relpath(os.path.join(os.path.abspath(source), image),
                                os.path.abspath(job.output))  # the image, seen from the output
    elif image is not None:  # a URL: the image as a URL (or relative within one bucket)
        image = store.relative_source(_child(source, image), job.output)
    group = store.create_label_image(
        job.output, job.shape, np.uint32, chunks=job.block, voxel_size=voxel,
        name="segmentation", levels=job.levels, source=image,
        physical=list(translation) if translation is not None else None,
        attrs={"segment": recorded, "source": group_attrs["emtile"].get("source"),
               "recut_of": str(source), "version": __version__})
    group.create_group(WORK)
    return group


def _child(source, image):
    """The URL of ``image`` (a path relative to the store ``source``)."""
    from emtile.locations import Location

    loc = Location(source)
    for part in image.split("/"):
        loc = loc.parent if part == ".." else loc if part in ("", ".") else loc / part
    return loc


def recut_stage(segmentation, output, merge_threshold):
    """The :class:`emtile.blockwise.Stage` of a recut and its hooks: ``(stage, steps)``."""
    from emtile import store
    from emtile.blockwise import Pass, Stage
    from emtile.markers import content_token
    from emtile.segmenter.blocks import SegmentPlan
    from emtile.segmenter.fragment_graph import GRAPH

    from emtile.locations import Location

    source = segmentation if isinstance(segmentation, Location) and not segmentation.is_local \
        else str(segmentation)
    group, meta = _source(source)
    store.check_output(output, inputs=[source])
    frags = group[GRAPH]["fragments"]
    levels = len(store.multiscales(group.attrs.asdict())["datasets"])
    recorded = dict(meta["segment"], merge_threshold=float(merge_threshold))
    output = output if isinstance(output, Location) and not output.is_local else str(output)
    job = RecutJob(source=source, output=output, shape=tuple(frags.shape),
                   block=tuple(frags.chunks), levels=levels, run=uuid.uuid4().hex)
    plan = SegmentPlan(job.shape, job.block)
    steps = _Steps(job, recorded)

    def describe(i):
        start, stop = plan[i]
        return f"block {i} (voxels {', '.join(f'{a}:{b}' for a, b in zip(start, stop))})"

    p = Pass(name="recut", fn=run_recut_blocks, job=job, plan=plan, describe=describe,
             markers="done", point="segment.recut.recorded", before=steps.table)
    fingerprint = {"input": source.url if isinstance(source, Location) else
                   os.path.realpath(source), "input_token": content_token(source),
                   "merge_threshold": float(merge_threshold), "levels": levels}
    stage = Stage(name="recut", output=output, inputs=(source,), fingerprint=fingerprint,
                  create=functools.partial(_create, job, group.attrs.asdict(), recorded,
                                           source),
                  passes=(p,), markers_group=WORK, finish=steps.finish)
    return stage, steps
