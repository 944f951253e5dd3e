"""The job, the block plan and the passes of ``emtile segment``: labels, fragments, the global
step (per row of blocks) and the write pass.

A pass is a module-level function ``run_xxx_blocks(job, block_ids) -> [result per block]``: it
opens what it needs (cached per process), skips blocks already recorded done, computes, writes
whole chunks that no other block writes, and returns a small picklable result (None for a block
it skipped). The driver (:mod:`emtile.segmenter.driver`) records blocks as done, writes what the
results carry (label counts, the records of pass 2, the rows' tables).

Store layout (inside the output group, removed when the run completes)::

    emtile_segment/cells      uint32   per-block labels of the interior components (pass 1)
    emtile_segment/seeds      uint32   per-block labels of the watershed seeds (pass 1, ws)
    emtile_segment/counts     int64 (n_blocks, 2)  labels per block (cells, seeds); driver-written
    emtile_segment/offsets    int64 (n_blocks, 2)  first provisional id of each block's labels
    emtile_segment/fragments  uint64   provisional fragment id per pixel (pass 2); bit 63 set on
                                       boundary pixels (p < threshold)
    emtile_segment/records    grouped  each block's face pairs, fragment sizes and edges (pass 2),
                                       returned by the workers, written by the driver in parts
                                       of many blocks (:mod:`emtile.segmenter.records`)
    emtile_segment/table      int64    provisional id -> object id within its row (global step)
    emtile_segment/rows       int64 (n_rows, 6)  per row of blocks: objects, then the report's
                                       fragments, objects, faces, merge side, close calls
    emtile_segment/row_offsets int64 (n_rows,)  objects of the rows before (added when written)
    emtile_segment/ftable     int64    affinities: provisional id -> fragment id (global step)
    emtile_segment/done1..3   markers  blocks done per pass (labels, fragments, write)
    emtile_segment/done_rows  markers  rows done by the global step

The global step of a probability map is a pass of its own over the *rows* of blocks
(:func:`row_groups`: in 2d mode the blocks of each z-row, whose ids never meet another row's;
in 3d mode one row of every block): each row's graph is read from the records, agglomerated and
numbered 1..N in a worker, which returns the row's table; the driver writes the tables, and the
rows' object counts give each row's first id. Affinity runs keep their global step in the
driver (:mod:`emtile.segmenter.fragment_graph`).

With affinities, the write pass also writes each voxel's fragment id to ``emtile_graph/fragments``,
which stays (:mod:`emtile.segmenter.fragment_graph`). The write pass writes the labels at ``0``
and, with ``levels > 1``, every pyramid level of the block from the same labels (``k``: every
``2**k``-th pixel in y and x, so no level holds an id that level 0 does not); blocks start at
multiples of ``2**(levels - 1)`` in y and x and each level's chunks are halved, so a block owns
whole chunks at every level.
"""

import math
import threading
from dataclasses import dataclass

import numpy as np

from emtile import _faults
from emtile._allocator import keep_freed_memory
from emtile.segmenter import kernels, records

__all__ = ["SegmentJob", "SegmentPlan", "GraphJob", "RowGraph", "row_groups", "run_label_blocks",
           "run_fragment_blocks", "run_graph_rows", "run_write_blocks", "map_ids", "TEMP",
           "BOUNDARY_BIT"]

TEMP = "emtile_segment"
BOUNDARY_BIT = np.uint64(1 << 63)
_ID_MASK = np.uint64((1 << 63) - 1)


@dataclass(frozen=True)
class SegmentJob:
    """Everything a block needs: paths and every option that changes the output bytes.

    Frozen and picklable (no arrays, no open stores). ``run`` is a token of the driver's run,
    so per-process caches never outlive it.
    """

    input: object  # the probability array, as emtile.open_volume opens it (str or Location)
    output: object  # the output group: a local path (str) or a URL's Location
    shape: tuple  # (Z, Y, X); a 2-D image is (1, Y, X)
    image_ndim: int  # 2 or 3: the input's own dimensions
    block: tuple  # (Z, Y, X)
    method: str  # "cc" or "ws"
    mode: str  # "2d" or "3d"
    threshold: float
    grow: int  # rounds of the boundary flood
    seed_cap: int  # ws: distance transform cap (pixels)
    seed_radius: int  # ws: maxima box radius (pixels)
    interior_rounds: int  # ws: rounds of the interior flood
    sampling: tuple  # (z, y, x) voxel size relative to x
    keep_boundaries: bool
    run: str
    levels: int = 1  # resolution levels of the output (each halves y and x)
    seeds: str = "distance"  # ws: "distance" (maxima of the distance transform) or "components"
    face_limit: int = -1  # ws, quantile linkage: highest altitude in the faces' histograms
    invert: bool = False  # a boundary map (1 = membrane): read 1 - p (emtile.maps)
    #: affinities: the channels of the nearest neighbours (-1,0,0), (0,-1,0), (0,0,-1) in the
    #: (C, Z, Y, X) input (:mod:`emtile.segmenter.affinity`); () for a probability map
    channels: tuple = ()
    #: calibrate="map": the map's level v reads as lut[v] (256 uint8 levels; () = as stored),
    #: from the whole map's histogram (:mod:`emtile.segmenter.levels`)
    lut: tuple = ()

    @property
    def axes(self):
        """Axes along which pixels are neighbours."""
        return (1, 2) if self.mode == "2d" else (0, 1, 2)

    def _per_axis(self, pixels):
        """``pixels`` steps along each neighbour axis (scaled by sampling for distances)."""
        return tuple(pixels if ax in self.axes else 0 for ax in range(3))

    @property
    def label_halo(self):
        """Context pass 1 reads: the seeds' distance cap plus the maxima box (ws with distance
        seeds), else none (components are joined across faces exactly)."""
        if not self.distance_seeds:
            return (0, 0, 0)
        r = self.seed_cap + self.seed_radius
        return tuple(int(math.ceil(r / self.sampling[ax] - 1e-9)) if ax in self.axes else 0
                     for ax in range(3))

    @property
    def affinity(self):
        return bool(self.channels)

    @property
    def distance_seeds(self):
        """ws seeded at the distance maxima (flooded over the interior first); with component
        seeds, ws's fragments are the interior components, as cc's."""
        return self.method == "ws" and self.seeds == "distance"

    @property
    def rounds(self):
        return self.grow + (self.interior_rounds if self.distance_seeds else 0)

    @property
    def fragment_halo(self):
        """Context pass 2 reads: two steps per flood round (the rounds, then the check that
        each key is carried back to its seed), plus the face plane."""
        return self._per_axis(2 * self.rounds + 1)


@dataclass(frozen=True)
class SegmentPlan:
    """Regular blocks of ``block`` pixels over ``shape`` (the last ones cut by the edge).

    ``len(plan)``, ``plan[i] -> (start, stop)``; nothing is materialised.
    """

    shape: tuple
    block: tuple

    @property
    def counts(self):
        return tuple(-(-n // b) for n, b in zip(self.shape, self.block))

    def __len__(self):
        return math.prod(self.counts)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        pos = np.unravel_index(i, self.counts)
        start = tuple(int(p) * b for p, b in zip(pos, self.block))
        stop = tuple(min(a + b, n) for a, b, n in zip(start, self.block, self.shape))
        return start, stop

    def read_box(self, i, halo):
        """Block ``i`` grown by ``halo`` per axis, clipped to the volume."""
        start, stop = self[i]
        return (tuple(max(0, a - h) for a, h in zip(start, halo)),
                tuple(min(n, b + h) for b, h, n in zip(stop, halo, self.shape)))

    def overlapping(self, start, stop):
        """``(block id, block start, block stop)`` of every block meeting the box."""
        ranges = [range(a // b, (s - 1) // b + 1) for a, s, b in zip(start, stop, self.block)]
        out = []
        for pos in np.ndindex(*(len(r) for r in ranges)):
            idx = tuple(r[p] for r, p in zip(ranges, pos))
            i = int(np.ravel_multi_index(idx, self.counts))
            out.append((i, *self[i]))
        return out


def _sl(start, stop):
    return tuple(slice(a, b) for a, b in zip(start, stop))


# --------------------------------------------------------------------------- per-process cache

_CACHE = {}
_CACHE_LOCK = threading.Lock()


def _open(job):
    """Input array, output group and its temporary arrays, opened once per process and run."""
    key = (job.output, job.run)
    with _CACHE_LOCK:
        found = _CACHE.get(key)
        if found is None:
            import zarr

            from emtile.maps import open_probability_map
            from emtile.volume import open_volume

            _CACHE.clear()  # one run at a time per process
            from emtile.store import zarr_target

            group = zarr.open_group(zarr_target(job.output, "r+"), mode="r+", zarr_format=3)
            source = (open_volume(job.input) if job.channels else  # affinities: as stored
                      open_probability_map(job.input, invert=job.invert, native_uint8=True))
            found = {"input": source, "group": group, "temp": group[TEMP]}
            _CACHE[key] = found
        return found


def _array(job, name):
    """The temporary array ``name`` (or ``"0"``, ``"1"``, ...: the output's levels), opened once
    per process and run. The table is never cached: the driver rewrites it on a resumed run."""
    cache = _open(job)
    arrays = cache.setdefault("arrays", {})
    if name not in arrays:
        arrays[name] = cache["group"][name] if name.isdigit() else cache["temp"][name]
    return arrays[name]


def _offsets(job):
    """First provisional id of each block's (cells, seeds) labels, read once per process."""
    cache = _open(job)
    if "offsets" not in cache:
        cache["offsets"] = np.asarray(cache["temp"]["offsets"][:])
    return cache["offsets"]


def _read_p(job, start, stop):
    arr = _open(job)["input"]
    if job.image_ndim == 2:
        p = np.asarray(arr[start[1]:stop[1], start[2]:stop[2]])[None]
    else:
        p = np.asarray(arr[_sl(start, stop)])
    if job.lut:
        from emtile.segmenter.levels import apply_lut

        _check_values(p, job, start)
        p = apply_lut(p, job.lut)
    return p


def _levels(job, start, stop):
    """Affinity input: the nearest-neighbour levels over ``[start, stop + 1)``."""
    from emtile.segmenter.affinity import read_levels

    return read_levels(_open(job)["input"], job.channels, start, stop, job.shape, job.input)


def _affinity_interior(job, start, stop):
    """Affinity input: ``(interior, alt, levels, lut)`` over ``[start, stop)``. The interior:
    voxels with a link (component seeds), or the core, voxels whose every pair is linked
    (distance seeds: a contact between two objects is then a boundary, as a membrane is in a
    probability map, so the distance maxima and the interior flood stay on one side of it)."""
    from emtile.segmenter.affinity import link_lut, signals

    levels = _levels(job, start, stop)
    lut = link_lut(job.threshold)
    inside, alt, core = signals(levels, start, stop, job.shape, lut)
    return (core if job.distance_seeds else inside), alt, levels, lut


def _check_values(p, job, start):
    if p.dtype.kind == "f" and not (np.all(p >= 0) and np.all(p <= 1)):
        from emtile._errors import EmtileError

        bad = p[~((p >= 0) & (p <= 1))].flat[0]
        raise EmtileError(f"prediction {job.input!r} holds {bad} near {start}: a probability map "
                          f"has values in [0, 1] (is it a raw image?)")


def _done(job, name, ids):
    """Which of ``ids`` the markers ``name`` record as done (a retry or a re-run skips them).

    Reads only the span of markers the ids cover. The driver may be rewriting a marker chunk at
    this moment: a read that fails counts as "not done" (the block is computed again, giving
    the same bytes)."""
    ids = np.asarray(ids, np.int64)
    if not ids.size:
        return np.zeros(0, bool)
    lo, hi = int(ids.min()), int(ids.max()) + 1
    try:
        flags = np.asarray(_open(job)["temp"][name][lo:hi])
    except Exception:  # a chunk being rewritten by the driver
        return np.zeros(ids.size, bool)
    return flags[ids - lo] != 0


# --------------------------------------------------------------------------- pass 1: labels


def run_label_blocks(job, block_ids):
    """Pass 1: per block, label the interior components (and, for ws, the seeds) of its write
    region; write them to ``cells`` (``seeds``). Returns ``(n_cells, n_seeds)`` per block."""
    keep_freed_memory()  # a Dask worker's first segment task sets it (emtile._allocator)
    plan = SegmentPlan(job.shape, job.block)
    done = _done(job, "done1", block_ids)
    out = []
    for i, skip in zip(block_ids, done):
        if skip:
            out.append(None)
            continue
        start, stop = plan[i]
        r0, r1 = plan.read_box(i, job.label_halo)
        w0 = [a - o for a, o in zip(start, r0)]
        w1 = [b - o for b, o in zip(stop, r0)]
        own = _sl(w0, w1)
        if job.affinity:
            from emtile.segmenter.affinity import link_labels

            # the links' components on the write region (its levels: one plane past each
            # upper face)
            mask, _, levels, lut = _affinity_interior(job, r0, r1)
            box = np.ascontiguousarray(levels[(slice(None),) + _sl(w0, [b + 1 for b in w1])])
            cells, n_cells = link_labels(box, np.ascontiguousarray(mask[own]), lut)
        else:
            p = _read_p(job, r0, r1)
            _check_values(p, job, start)
            mask = kernels.interior_mask(p, job.threshold)
            cells, n_cells = kernels.label_components(mask[own], axes=job.axes)
        _array(job, "cells")[_sl(start, stop)] = cells
        n_seeds = 0
        if job.distance_seeds:
            peaks = kernels.seed_maxima(mask, cap=job.seed_cap, radius=job.seed_radius,
                                        axes=job.axes, sampling=job.sampling)
            seeds, n_seeds = kernels.label_components(peaks[own], axes=job.axes)
            _array(job, "seeds")[_sl(start, stop)] = seeds
        _faults.point("segment.labels.written")  # test-only: written, not yet reported
        out.append((int(n_cells), n_seeds))
    return out


# --------------------------------------------------------------------------- pass 2: fragments


#: provisional ids below this stay uint32 (pass 1 stores them so): 4 bytes a voxel of the read
#: box instead of 8, and no int64 copy (ids at or above it, more than 4 G labels, take int64)
NARROW_IDS = 1 << 32


def _provisional(job, plan, name, column, r0, r1):
    """Labels ``name`` over the box ``[r0, r1)`` as provisional ids (each block's offset added):
    uint32 as stored when every id in the box is below :data:`NARROW_IDS`, else int64."""
    from emtile.segmenter.pixels import add_offsets

    local = np.asarray(_array(job, name)[_sl(r0, r1)])
    offsets = _offsets(job)
    found = list(plan.overlapping(r0, r1))
    boxes = np.array([[max(x, y) - y0 for x, y, y0 in zip(a, r0, r0)]
                      + [min(x, y) - y0 for x, y, y0 in zip(b, r1, r0)] for _, a, b in found],
                     np.int64).reshape(-1, 6)
    add = np.array([offsets[i, column] for i, _, _ in found], np.int64)
    if local.size and int(add.max()) + int(local.max()) >= NARROW_IDS:
        local = local.astype(np.int64)
    elif not local.flags.writeable:
        local = local.copy()
    add_offsets(local, boxes, add)
    return local


def _fragments(job, plan, r0, r1):
    """Provisional fragment ids over the read box (exact on the write region and one plane past
    its upper faces), the interior mask, the altitude, the ids that are joined across faces, the
    keys' sources (None for affinities) and the affinity levels."""
    if job.affinity:
        inside, alt, levels, lut = _affinity_interior(job, r0, r1)
    else:
        p = _read_p(job, r0, r1)
        inside = kernels.interior_mask(p, job.threshold)
        alt = kernels.altitude(p)
        levels = lut = None
    # affinities with distance seeds: a step costs its pair's altitude, so the floods cross a
    # contact between two objects (unlinked pairs) only at that price, whatever the mean
    # altitudes of the voxels on either side
    pair_levels = levels if job.affinity and job.distance_seeds else None
    cells = _provisional(job, plan, "cells", 0, r0, r1)
    labels = cells
    joined = [cells]
    if job.distance_seeds:
        seeds = _provisional(job, plan, "seeds", 1, r0, r1)
        joined.append(seeds)
        key = kernels.flood(seeds > 0, inside & (seeds == 0), alt, rounds=job.interior_rounds,
                            axes=job.axes, origin=r0, volume_shape=job.shape, levels=pair_levels)
        # unreached interior keeps its component as a fragment
        labels = kernels.source_labels(key, seeds, origin=r0, volume_shape=job.shape,
                                       fill=np.where(inside, cells, 0))
    key = kernels.flood(inside, ~inside, alt, rounds=job.grow, axes=job.axes, origin=r0,
                        volume_shape=job.shape, levels=pair_levels)
    if job.affinity:  # the faces are scored by their pairs, not by the sources: frag in place
        frag = kernels.source_labels(key, labels, origin=r0, volume_shape=job.shape, out=key)
        return frag, inside, alt, joined, None, (levels, lut)
    frag = kernels.source_labels(key, labels, origin=r0, volume_shape=job.shape)
    # read where frag > 0 (the key is set); in place: the key is not needed again
    source = np.bitwise_and(key, np.int64(kernels.INDEX_LIMIT - 1), out=key)
    return frag, inside, alt, joined, source, (levels, lut)


def run_fragment_blocks(job, block_ids):
    """Pass 2: per block, flood the seeds into fragments over its read box; write the write
    region's provisional fragment ids to ``fragments``. Returns each block's record (face pairs,
    fragment stats, edges; :func:`emtile.segmenter.records.pack`), which the driver stores."""
    keep_freed_memory()  # a Dask worker's first segment task sets it (emtile._allocator)
    from emtile.segmenter.pixels import stored_ids

    plan = SegmentPlan(job.shape, job.block)
    done = _done(job, "done2", block_ids)
    out = []
    for i, skip in zip(block_ids, done):
        if skip:
            out.append(None)
            continue
        start, stop = plan[i]
        r0, r1 = plan.read_box(i, job.fragment_halo)
        frag, inside, alt, joined, source, (levels, lut) = _fragments(job, plan, r0, r1)
        w0 = tuple(a - o for a, o in zip(start, r0))
        w1 = tuple(b - o for b, o in zip(stop, r0))
        own = _sl(w0, w1)
        stats = kernels.fragment_stats(frag[own], inside[own], origin=start,
                                       volume_shape=job.shape)
        if job.affinity:
            from emtile.segmenter import affinity

            pairs = affinity.link_face_pairs(joined[0], levels, lut, start=w0, stop=w1)
            if job.distance_seeds:  # seeds are voxel components (of the core's maxima)
                pairs = np.concatenate([pairs, kernels.face_pairs(joined[1], start=w0,
                                                                  stop=w1, axes=job.axes)])
            edges = affinity.pair_edges(frag, levels, start=w0, stop=w1)
        else:
            pairs = np.concatenate([kernels.face_pairs(lab, start=w0, stop=w1, axes=job.axes)
                                    for lab in joined])
            bins = kernels.altitude_bins(job.face_limit) if job.face_limit >= 0 else None
            edges = kernels.adjacent_pairs(frag, alt, source, start=w0, stop=w1,
                                           axes=job.axes, origin=r0, volume_shape=job.shape,
                                           sampling=job.sampling, bins=bins)
        stored = stored_ids(frag[own], inside[own], BOUNDARY_BIT)
        _array(job, "fragments")[_sl(start, stop)] = stored
        _faults.point("segment.fragments.written")  # test-only: written, not yet reported
        out.append(records.pack(pairs=pairs, stats=stats, edges=edges))
    return out


# --------------------------------------------------------------------------- the global step


@dataclass(frozen=True)
class GraphJob:
    """The global step's job: the blocks' job and the settings of the merges (picklable)."""

    job: SegmentJob
    min_size: int
    merge_threshold: object  # float (ws) or None (cc)
    merge_quantile: object  # float (quantile linkage) or None


@dataclass(frozen=True)
class RowGraph:
    """One row's global step: ``numbers`` gives its cell ids ``lo[0]..`` and then its seed ids
    ``lo[1]..`` their object (1..``count`` within the row; 0 for none), and ``signs`` the row's
    report (fragments, objects, faces, merge side, close calls)."""

    lo: tuple
    cells: int
    numbers: np.ndarray
    count: int
    signs: tuple


def row_groups(job, plan):
    """Blocks whose ids can meet in the global step, one range per *row*: in 2d mode each row of
    blocks along z (slices never join), in 3d mode all of them."""
    if job.mode == "3d":
        return [range(len(plan))]
    per = len(plan) // plan.counts[0]
    return [range(k * per, (k + 1) * per) for k in range(plan.counts[0])]


def row_of(job, plan, i):
    """The row of block ``i``."""
    return 0 if job.mode == "3d" else int(np.unravel_index(i, plan.counts)[0])


def _records(job, n_blocks):
    """Pass 2's records, opened once per process and run."""
    cache = _open(job)
    with _CACHE_LOCK:
        if "records" not in cache:
            cache["records"] = records.RecordStore.open(cache["temp"], n_blocks)
        return cache["records"]


def run_graph_rows(gjob, rows):
    """The global step, per row of blocks: join ids across faces, agglomerate (ws), absorb
    small objects, number the objects 1..N by first pixel. Returns a :class:`RowGraph` per row
    (None for a row already recorded done); the driver writes the tables."""
    keep_freed_memory()  # a Dask worker's first segment task sets it (emtile._allocator)
    from emtile.segmenter.graph import number_objects
    from emtile.segmenter.report import SegmentReport

    job = gjob.job
    plan = SegmentPlan(job.shape, job.block)
    groups = row_groups(job, plan)
    done = _done(job, "done_rows", rows)
    cache = _open(job)
    if "counts" not in cache:
        cache["counts"] = np.asarray(cache["temp"]["counts"][:])
    counts, offsets = cache["counts"], _offsets(job)
    store = _records(job, len(plan))
    out = []
    for k, skip in zip(rows, done):
        if skip:
            out.append(None)
            continue
        group = groups[k]
        b0, b1 = group[0], group[-1]
        # the row's provisional ids: one run of cell ids and one of seed ids
        lo = offsets[b0] + 1
        hi = offsets[b1] + counts[b1] + 1  # exclusive
        nc = int(hi[0] - lo[0])

        def local(x):
            return np.where(x < hi[0], x - lo[0] + 1, x - lo[1] + 1 + nc)

        pairs, stats, edges = store.read(group)
        stats[:, 0] = local(stats[:, 0])
        edges[:, :2] = local(edges[:, :2])
        report = SegmentReport()
        number, count = number_objects(
            1 + nc + int(hi[1] - lo[1]), local(pairs), stats, edges, min_size=gjob.min_size,
            merge_threshold=gjob.merge_threshold, merge_quantile=gjob.merge_quantile,
            report=report)
        out.append(RowGraph(lo=(int(lo[0]), int(lo[1])), cells=nc, numbers=number[1:],
                            count=int(count),
                            signs=(report.fragments, report.objects, report.faces,
                                   report.merge_side, report.close)))
    return out


def _row_offsets(job):
    """Objects of the rows before each row, read once per process."""
    cache = _open(job)
    if "row_offsets" not in cache:
        cache["row_offsets"] = np.asarray(cache["temp"]["row_offsets"][:])
    return cache["row_offsets"]


# --------------------------------------------------------------------------- the write pass


def map_ids(job, stored, dtype, table="table", shift=0):
    """Output ids (``dtype``) of the provisional ids ``stored`` as pass 2 stored them
    (:data:`BOUNDARY_BIT` set on boundary pixels, which ``keep_boundaries`` leaves 0; id 0 stays
    0), read from the stored table: one contiguous read when the ids are dense (a block's and
    its neighbours'), else the ids found. ``shift`` is added to every nonzero id of the table
    (a row's first id)."""
    from emtile.segmenter.pixels import id_range, map_stored

    table = _open(job)["temp"][table]  # not cached: a resumed run rewrites it
    out = np.zeros(stored.shape, dtype)
    lo, hi = id_range(stored, BOUNDARY_BIT)
    if hi < 0:
        return out
    if hi - lo < 4 * stored.size:
        lut = np.asarray(table[lo:hi + 1], np.int64)
        lut[lut > 0] += shift
        map_stored(stored, lut, lo, BOUNDARY_BIT, bool(job.keep_boundaries), out)
        return out
    frag = (stored & _ID_MASK).astype(np.int64)
    if job.keep_boundaries:
        frag[(stored & BOUNDARY_BIT) != 0] = 0
    ids, inverse = np.unique(frag, return_inverse=True)
    mapped = np.zeros(ids.size, np.int64)
    mapped[ids > 0] = np.asarray(table.get_coordinate_selection(ids[ids > 0]))
    mapped[mapped > 0] += shift
    out[...] = mapped[inverse.reshape(frag.shape)]
    return out


def run_write_blocks(job, block_ids):
    """The write pass: per block, map its provisional fragment ids to output ids (plus its row's
    first id) and write ``0`` and every further pyramid level. Returns the number of nonzero
    output pixels per block."""
    keep_freed_memory()  # a Dask worker's first segment task sets it (emtile._allocator)
    from emtile.store import downsample

    plan = SegmentPlan(job.shape, job.block)
    levels = [_array(job, str(k)) for k in range(job.levels)]
    done = _done(job, "done3", block_ids)
    out = []
    for i, skip in zip(block_ids, done):
        if skip:
            out.append(None)
            continue
        start, stop = plan[i]
        stored = np.asarray(_array(job, "fragments")[_sl(start, stop)])
        shift = 0 if job.affinity else int(_row_offsets(job)[row_of(job, plan, i)])
        labels = map_ids(job, stored, levels[0].dtype, shift=shift)
        count = int(np.count_nonzero(labels))
        if job.affinity:  # the fragments, kept for recut
            from emtile.segmenter.fragment_graph import GRAPH

            frags = _open(job)["group"][GRAPH]["fragments"]
            frags[_sl(start, stop)] = map_ids(job, stored, np.uint64, "ftable")
        for k, arr in enumerate(levels):
            if k:
                labels = downsample(labels, labels=True)
            y, x = start[1] >> k, start[2] >> k  # blocks start at multiples of 2**k
            box = (slice(y, y + labels.shape[1]), slice(x, x + labels.shape[2]))
            if job.image_ndim == 2:
                arr[box] = labels[0]
            else:
                arr[(slice(start[0], stop[0]),) + box] = labels
        _faults.point("segment.write.written")  # test-only: written, not yet reported
        out.append(count)
    return out
