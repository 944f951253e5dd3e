"""The driver of ``emtile segment``: checks, the output store, the passes and the global step.

The process that calls :func:`segment` is the driver. It checks the input and the options (one
line each), prepares the output store once, hands the blocks of each pass to
:func:`emtile.distributed.map_blocks` (in this process, on a given client, or on a cluster it
starts or joins for the run: ``cluster``), writes what the blocks' results carry (label counts,
the records of pass 2: :mod:`emtile.segmenter.records`, the rows' tables of the global step)
and then records the blocks as done, and alone marks the store complete, after removing its
working arrays. Workers write only their blocks' chunks. The global step
(:mod:`emtile.segmenter.graph`) runs between the fragments and the write pass: for a probability
map as a pass over the rows of blocks, in the workers (:func:`blocks.run_graph_rows`); for
affinities in the driver (:mod:`emtile.segmenter.fragment_graph`).

A run killed at any point and started again with the same input and options resumes: the blocks
recorded as done in each pass are skipped, and the global step is recomputed from the per-block
records in the store (it is deterministic), so the labels are identical to an uninterrupted run.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np

from emtile._errors import EmtileError
from emtile.blockwise import Pass, Runner, Stage, run_stage
from emtile.geometry import check_levels
from emtile.segmenter import blocks, kernels
from emtile.segmenter.blocks import TEMP, SegmentJob, SegmentPlan
from emtile.segmenter.report import SegmentReport
from emtile.segmenter.records import PART_BLOCKS, PART_BYTES, RecordStore, record_nbytes
from emtile.settings import METHODS, MODES, SEEDS, SegmentSettings, split_overrides

__all__ = ["segment", "segment_stage", "SegmentResult", "METHODS", "MODES", "SEEDS"]

BLOCK_PX = 2**22  # pixels per default block
_FLUSH_EVERY = 64  # label counts buffered before they and the markers are written (or _FLUSH_S)
_FLUSH_S = 2.0
#: Voxels of blocks per Dask task by default (``blocks_per_task`` not given): a block pass runs
#: about 7-11 Mvoxel/s per core, so a task lasts a second or two, and a task's overhead (some ms
#: of the scheduler's, the worker's and this process's CPU) stays small. Measured with
#: ``examples/bench_segment.py throughput`` (64 x 2048², 2 workers on 2 cores, blocks of 2^22
#: voxels): 1.51-1.63x one core with one block per task, 1.58-1.76x with 2, 1.63-1.74x with 4.
TASK_VOXELS = 2**24
_TABLE_CHUNK = 2**18
UINT32_IDS = int(np.iinfo(np.uint32).max)  # more objects than this: uint64 labels


@dataclass
class SegmentResult:
    """What :func:`segment` did."""

    output: str
    shape: tuple
    dtype: str
    objects: int
    method: str
    mode: str
    block: tuple
    blocks: int
    blocks_resumed: tuple  # blocks each pass (labels, fragments, write) found done already
    seconds: float
    settings: dict  # every option that shaped the labels (also in the store's attributes)
    levels: int = 1  # resolution levels written
    cluster: str = ""  # the cluster it ran on ("" for this process)
    report: SegmentReport = None  # how sure it is (emtile.segmenter.report); None for a recut
    #: wall seconds of each pass ("labels", "fragments", "graph", "write"; "recut"), and
    #: "levels" (the map's histogram, before the passes)
    pass_seconds: dict = None

    def __str__(self):
        block = "x".join(str(b) for b in self.block)
        levels = f", {self.levels} levels" if self.levels > 1 else ""
        where = f" on {self.cluster}" if self.cluster else ""
        return (f"{self.output}: {self.objects} objects, {self.shape} {self.dtype}{levels}, "
                f"method {self.method}, mode {self.mode}, {self.blocks} blocks of {block}, "
                f"{self.seconds:.1f} s{where}")


# --------------------------------------------------------------------------- input


@dataclass
class _Prediction:
    path: str
    shape: tuple  # as stored
    dtype: np.dtype
    voxel: tuple  # (z, y, x) nm
    translation: tuple  # (z, y, x) nm or None
    model_ndim: int
    offsets: tuple = ()  # affinities: one (dz, dy, dx) per channel
    channels: tuple = ()  # affinities: the channels of the three nearest neighbours


def _ome(path):
    """The root group attributes of a Zarr store at ``path``, or None."""
    import zarr

    from emtile.store import is_zarr_store

    from emtile.store import open_zarr

    if not is_zarr_store(path):
        return None
    try:
        node = open_zarr(path)
    except Exception:
        return None
    return node.attrs.asdict() if isinstance(node, zarr.Group) else None


def _open_prediction(path, offsets=None):
    """Open and check PRED: an emtile probability store, or a float array in [0, 1]; or
    affinities (an emtile affinity store, or a (C, Z, Y, X) array with ``offsets``)."""
    from emtile.locations import Location
    from emtile.store import placement
    from emtile.volume import open_volume

    if not (isinstance(path, Location) and not path.is_local):  # a URL keeps its options
        path = str(path)
    if isinstance(path, str) and (".h5:" in path or ".hdf5:" in path):  # file.h5:dataset
        path = path.replace(".h5:", ".h5/").replace(".hdf5:", ".hdf5/")
    attrs = _ome(path)
    arr = open_volume(path)
    meta = (attrs or {}).get("emtile") or {}
    kind = meta.get("kind")
    dtype = np.dtype(arr.dtype)
    if (kind == "probabilities" and meta.get("target") == "affinities") or \
            (kind is None and len(arr.shape) == 4):
        from emtile.segmenter.affinity import open_affinities

        shape, offs, channels = open_affinities(path, arr, meta, offsets)
        voxel, translation = placement(attrs or {})
        return _Prediction(path, shape, dtype, voxel, translation, 3, offs, channels)
    if offsets is not None:
        raise EmtileError(f"offsets={offsets!r} is for affinities, but {path!r} holds one "
                          f"probability map of shape {tuple(arr.shape)}: leave offsets out")
    if kind is not None and kind != "probabilities":
        raise EmtileError(f"prediction {path!r} is an emtile {kind} store, not a probability map: "
                          f"give the output of emtile predict")
    from emtile.maps import map_scale

    map_scale(dtype, path)  # uint8 (v / 255), uint16 (v / 65535) or floats, from any tool
    if len(arr.shape) not in (2, 3) or 0 in arr.shape:
        raise EmtileError(f"prediction {path!r} has shape {tuple(arr.shape)}: expected one "
                          f"probability map, (Y, X) or (Z, Y, X) (one output channel)")
    if kind == "probabilities" and not meta.get("complete"):
        raise EmtileError(f"prediction {path!r} is incomplete (its emtile predict run did not "
                          f"finish): run emtile predict again to finish it")
    voxel, translation = placement(attrs or {})
    model_ndim = (meta.get("provenance") or {}).get("model_ndim", 2)
    return _Prediction(path, tuple(int(s) for s in arr.shape), dtype, voxel, translation,
                       int(model_ndim))


# --------------------------------------------------------------------------- options


#: ``grow`` when None: a probability map's membranes are tens of pixels wide at ISBI's 4 nm (the
#: 2-D defaults), an affinity map's boundaries the few voxels with an unlinked pair. On FIB-25
#: (seed 0's 4,000-step affinities, z 150:250, distance seeds at 0.8, merge 0.4) grow 4 scored
#: a VOI of 1.877 against 1.898 with 32, and a block reads 2 x 4 + 1 voxels of context per side
#: instead of 65 (more with distance seeds: two steps per interior round besides).
GROW = {"map": 32, "affinities": 4}


def _check_options(pred, settings):
    """The checks that need the prediction: ``(mode, shape3, block, grow)``."""
    mode, grow = settings.mode, settings.grow
    if grow is None:
        grow = GROW["affinities" if pred.channels else "map"]
    if pred.channels:
        if mode == "2d":
            raise EmtileError(f"mode='2d' does not apply to affinities {pred.path!r}: they "
                              f"link voxels in 3-D; use mode='3d' or 'auto'")
        if settings.invert:
            raise EmtileError(f"invert=True does not apply to affinities {pred.path!r} (1 = the "
                              f"same object): it reads a boundary map as 1 - p; leave it out")
    if mode == "auto":
        mode = "3d" if pred.model_ndim == 3 and len(pred.shape) == 3 else "2d"
    if mode == "3d" and len(pred.shape) == 2:
        raise EmtileError(f"mode='3d' needs a (Z, Y, X) stack, but prediction {pred.path!r} is "
                          f"one 2-D image of shape {pred.shape}; use mode='2d'")
    if isinstance(grow, bool) or not isinstance(grow, (int, np.integer)) \
            or not 1 <= grow <= kernels.MAX_ROUNDS // 2:
        raise EmtileError(f"grow={grow!r} must be a whole number of pixels from 1 to "
                          f"{kernels.MAX_ROUNDS // 2}")
    shape3 = (1,) * (3 - len(pred.shape)) + pred.shape
    block = _check_block(settings.block_size, pred.shape, mode)
    if np.prod(shape3, dtype=np.float64) >= kernels.INDEX_LIMIT:
        raise EmtileError(f"prediction of shape {pred.shape} has more than 2**44 pixels; "
                          f"segment it in parts with a region of interest")
    return mode, shape3, block, int(grow)


def _check_block(block_size, shape, mode):
    """``block_size`` (one int per axis of the prediction) -> a (Z, Y, X) block, clipped."""
    shape3 = (1,) * (3 - len(shape)) + tuple(shape)
    if block_size is None:
        yx = [min(n, 1024) if mode == "2d" else min(n, 256) for n in shape3[1:]]
        z = max(1, BLOCK_PX // (yx[0] * yx[1])) if mode == "2d" else min(shape3[0], 64)
        return (min(z, shape3[0]), *yx)
    text = ",".join(str(b) for b in np.atleast_1d(block_size))
    try:
        block = tuple(int(b) for b in np.atleast_1d(block_size))
    except (TypeError, ValueError):
        raise EmtileError(f"block_size={text} is not a list of whole numbers") from None
    if len(block) != len(shape) or any(b < 1 for b in block) or \
            any(int(b) != b for b in np.atleast_1d(block_size)):
        axes = "Z,Y,X" if len(shape) == 3 else "Y,X"
        raise EmtileError(f"block_size={text} must give one positive whole number per axis "
                          f"({axes}) of the prediction of shape {tuple(shape)}, e.g. "
                          f"{','.join(['1', '1024', '1024'][-len(shape):])}")
    block = (1,) * (3 - len(block)) + block
    return tuple(min(b, n) for b, n in zip(block, shape3))


# --------------------------------------------------------------------------- the store


def _settings(job, settings):
    """What shaped the labels, as the store records it (the settings that apply)."""
    s = settings
    out = {"method": job.method, "mode": job.mode, "threshold": job.threshold,
           "min_size": int(s.min_size), "keep_boundaries": job.keep_boundaries, "grow": job.grow,
           "block": list(job.block)}
    if job.method == "ws":
        out.update(seeds=job.seeds, merge_threshold=s.merge_threshold,
                   merge_quantile=s.merge_quantile)
        if job.distance_seeds:
            out.update(seed_cap=job.seed_cap, seed_radius=job.seed_radius,
                       interior_rounds=job.interior_rounds)
    if job.affinity:
        out.update(input="affinities", channels=list(job.channels))
    if job.invert:  # recorded only when set: the settings of earlier runs keep their digest
        out.update(invert=True)
    if job.lut:  # calibrate="map": the table the map's levels went through
        out.update(calibrate="map", lut=list(job.lut))
    return out


def _calibration(settings, pred):
    """``"map"`` or ``"none"``: :attr:`SegmentSettings.calibrate` resolved for this input."""
    if pred.channels or settings.calibrate == "none":
        return "none"
    if settings.calibrate == "map":
        return "map"
    default = SegmentSettings()
    given = settings.threshold != default.threshold or (
        settings.method == "ws" and settings.merge_threshold != default.merge_threshold)
    return "none" if given else "map"


def _map_lut(pred, invert):
    """The calibration table of the whole map (:func:`emtile.segmenter.levels.reference_lut`),
    or None for a map whose ranks say nothing (:func:`emtile.segmenter.levels.usable`)."""
    from emtile.maps import open_probability_map
    from emtile.segmenter.levels import histogram, reference_lut, uint8_levels, usable

    arr = open_probability_map(pred.path, invert=invert, native_uint8=True)
    flat = len(pred.shape) == 2  # one 2-D image: read as the slice (1, Y, X)

    def read(z0, z1, y0, y1):
        return uint8_levels(arr[y0:y1] if flat else arr[z0:z1, y0:y1])

    shape = (1,) * flat + tuple(pred.shape)
    counts = histogram(read, shape)
    return reference_lut(counts) if usable(counts) else None


def _fingerprint(pred, recorded, levels):
    from emtile.markers import content_token

    digest = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()
    return {"input": _real(pred.path), "input_token": content_token(pred.path),
            "settings": digest, "levels": int(levels)}


def _real(path):
    """An input as the fingerprint names it: a local path resolved, a URL normalised."""
    from emtile.locations import Location

    return path.url if isinstance(path, Location) else os.path.realpath(path)


def _create_output(job, pred, plan, recorded, settings):
    """The label image (every level) and the working arrays of the passes in ``TEMP``."""
    from emtile import __version__, store

    image_shape = job.shape if job.image_ndim == 3 else job.shape[1:]
    chunks = (1,) * (job.image_ndim == 3) + job.block[1:] if job.mode == "2d" else job.block
    voxel = pred.voxel if job.image_ndim == 3 else pred.voxel[1:]
    translation = None
    if pred.translation is not None:
        translation = list(pred.translation if job.image_ndim == 3 else pred.translation[1:])
    source = store.relative_source(pred.path, job.output)
    # 2d mode chunks a block slice by slice: one shard per block per level holds its slices
    # (pass 3 writes each level's box of a block in one assignment: the shard, whole)
    shards = job.block if chunks != job.block and job.image_ndim == 3 else None
    group = store.create_label_image(
        job.output, image_shape, np.uint32, chunks=chunks, shards=shards, voxel_size=voxel,
        name="segmentation", levels=job.levels, source=source, physical=translation,
        attrs={"segment": recorded, "source": str(pred.path),
               "settings": settings.to_json(), "version": __version__,
               **store.inherited_voxel_attrs(pred.path, "prediction")})
    if job.affinity:
        from emtile.segmenter.fragment_graph import GRAPH

        group.create_group(GRAPH).create_array("fragments", shape=job.shape, chunks=job.block,
                                               dtype="uint64", fill_value=0)
    temp = group.create_group(TEMP)
    chunks3 = (1,) + job.block[1:] if job.mode == "2d" else job.block
    for name, dtype in (("cells", "uint32"), ("seeds", "uint32"), ("fragments", "uint64")):
        if name == "seeds" and not job.distance_seeds:
            continue
        temp.create_array(name, shape=job.shape, chunks=chunks3, dtype=dtype, fill_value=0)
    n = len(plan)
    rows = min(n, 2**14)
    temp.create_array("counts", shape=(n, 2), chunks=(rows, 2), dtype="int64", fill_value=0)
    temp.create_array("offsets", shape=(n, 2), chunks=(rows, 2), dtype="int64", fill_value=0)
    if not job.affinity:  # the global step's rows: objects and the report's signs; first ids
        k = len(blocks.row_groups(job, plan))
        temp.create_array("rows", shape=(k, 6), chunks=(min(k, 2**14), 6), dtype="int64",
                          fill_value=0)
        temp.create_array("row_offsets", shape=(k,), chunks=(min(k, 2**17),), dtype="int64",
                          fill_value=0)
    bins = kernels.FACE_BINS if job.face_limit >= 0 else 0
    if job.affinity:
        from emtile.segmenter.affinity import AFF_BINS

        bins = AFF_BINS
    RecordStore.create(temp, n, edge_width=5 + bins)
    return group


# --------------------------------------------------------------------------- passes


class _Counts:
    """Pass 1's label counts per block, buffered; one read-modify-write of the rows spanned."""

    def __init__(self, array):
        self.array, self.rows = array, {}

    def add(self, i, result):
        self.rows[i] = result

    def full(self):
        return len(self.rows) >= _FLUSH_EVERY

    def flush(self):
        if self.rows:
            lo, hi = min(self.rows), max(self.rows) + 1
            rows = np.asarray(self.array[lo:hi])
            for i, row in self.rows.items():
                rows[i - lo] = row
            self.array[lo:hi] = rows
            self.rows.clear()


class _Records:
    """Pass 2's per-block records, buffered; written as one part of the record store."""

    def __init__(self, records):
        self.store, self.records, self.nbytes = records, {}, 0

    def add(self, i, record):
        self.records[i] = record
        self.nbytes += record_nbytes(record)

    def full(self):
        return len(self.records) >= PART_BLOCKS or self.nbytes >= PART_BYTES

    def flush(self):
        self.store.write(self.records)
        self.records.clear()
        self.nbytes = 0


class _RowTables:
    """The global step's rows, buffered: their tables written in runs of consecutive ids (one
    write per run, not per row), then their counts and signs, before their markers."""

    def __init__(self, temp):
        self.table, self.rows_array, self.rows = temp["table"], temp["rows"], {}

    def add(self, k, row):
        self.rows[k] = row

    def full(self):
        return len(self.rows) >= _FLUSH_EVERY

    def flush(self):
        if not self.rows:
            return
        spans = []  # (first id, numbers) of each row's cell and seed ids
        for row in self.rows.values():
            spans.append((row.lo[0], row.numbers[:row.cells]))
            spans.append((row.lo[1], row.numbers[row.cells:]))
        for lo, values in _runs(spans):
            self.table[lo:lo + values.size] = values
        lo, hi = min(self.rows), max(self.rows) + 1
        block = np.asarray(self.rows_array[lo:hi])
        for k, row in self.rows.items():
            block[k - lo] = (row.count, *row.signs)
        self.rows_array[lo:hi] = block
        self.rows.clear()


def _runs(spans):
    """``(first id, values)`` spans joined where one ends where the next begins."""
    out = []  # [first id, end, parts]
    for lo, values in sorted(((lo, v) for lo, v in spans if v.size), key=lambda s: s[0]):
        if out and out[-1][1] == lo:
            out[-1][1] += values.size
            out[-1][2].append(values)
        else:
            out.append([lo, lo + values.size, [values]])
    return [(lo, np.concatenate(parts)) for lo, _, parts in out]


def _keep_rows(group):
    return _RowTables(group[TEMP])


def _describe_row(plan, groups, k):
    first, last = plan[groups[k][0]], plan[groups[k][-1]]
    return (f"row {k} of blocks (voxels "
            f"{', '.join(f'{a}:{b}' for a, b in zip(first[0], last[1]))})")


def _describe(plan, i):
    start, stop = plan[i]
    return f"block {i} (voxels {', '.join(f'{a}:{b}' for a, b in zip(start, stop))})"


class _Steps:
    """The hooks between the passes: label offsets after pass 1, the global step before pass 3,
    the working arrays removed at the end. Their state (the id space, the object count) is
    recomputed on every run, resumed ones too: it is deterministic."""

    def __init__(self, job, plan, settings):
        self.job, self.plan, self.settings = job, plan, settings
        self.n_ids = self.count = 0
        self.levels_seconds = 0.0  # the map's histogram (calibrate="map"), before the stage
        self.dtype = np.dtype(np.uint32)
        self.report = SegmentReport(merge_threshold=float(settings.merge_threshold),
                                    threshold=float(settings.threshold),
                                    calibrated=bool(job.lut))

    def offsets(self, group):
        """After pass 1: each block's first provisional cell and seed id."""
        temp = group[TEMP]
        counts = np.asarray(temp["counts"][:])
        offsets = np.zeros_like(counts)
        offsets[1:, 0] = np.cumsum(counts[:-1, 0])
        offsets[:, 1] = counts[:, 0].sum() + np.concatenate([[0], np.cumsum(counts[:-1, 1])])
        temp["offsets"][:] = offsets
        self.n_ids = int(counts.sum()) + 1  # the provisional id space (0 included)
        if not self.job.affinity:
            _table(temp, self.n_ids)  # the rows' tables go here

    def global_step(self, group):
        """Affinities, before the write pass: the provisional -> output id table (the fragments'
        graph, in the driver), and the output's dtype."""
        from emtile.segmenter import fragment_graph

        s = self.settings
        self.count = fragment_graph.global_step(
            group, group[TEMP], RecordStore.open(group[TEMP], len(self.plan)),
            len(self.plan), self.n_ids, method=self.job.method,
            merge_threshold=s.merge_threshold, merge_quantile=s.merge_quantile,
            min_size=s.min_size, table=_table)
        self.dtype = _output_dtype(group, self.count, self.job)

    def rows_done(self, group):
        """After the global step's pass: each row's first id, the object count, the report's
        sums (from the rows' records: the same on a resumed run), the output's dtype."""
        temp = group[TEMP]
        rows = np.asarray(temp["rows"][:])
        temp["row_offsets"][:] = np.concatenate([[0], np.cumsum(rows[:-1, 0])])
        self.count = int(rows[:, 0].sum())
        fragments, objects, faces, merge_side, close = (int(v) for v in rows[:, 1:].sum(axis=0))
        self.report = dataclasses.replace(self.report, fragments=fragments, objects=objects,
                                          faces=faces, merge_side=merge_side, close=close)
        self.dtype = _output_dtype(group, self.count, self.job)

    def finish(self, group):
        """The working arrays removed whole (renamed away first: a run killed while they go
        finds no markers and starts over, never resumes from half of them)."""
        from emtile.store import remove_store

        from emtile.locations import Location

        output = self.job.output
        remove_store(Location(output) / TEMP if isinstance(output, Location) else
                     os.path.join(output, TEMP))
        return {"objects": self.count}


def _has_records(n_blocks, group):
    return RecordStore.open(group[TEMP], n_blocks) is not None


def _keep_counts(group):
    return _Counts(group[TEMP]["counts"])


def _keep_records(n_blocks, group):
    return _Records(RecordStore.open(group[TEMP], n_blocks))


def _table(temp, n_ids, name="table"):
    """The provisional -> output id table, rewritten in place when a resumed run finds it: a
    task of a killed driver may still be reading it, and reads the same values either way."""
    try:
        table = temp[name]
        if table.shape == (n_ids,) and table.dtype == np.int64:
            return table
    except KeyError:
        pass
    return temp.create_array(name, shape=(n_ids,), chunks=(min(n_ids, _TABLE_CHUNK),),
                             dtype="int64", fill_value=0, overwrite=True)


def _output_dtype(group, count, job):
    """uint32 unless the id count needs uint64; the arrays (every level) are replaced before
    pass 3 writes."""
    dtype = np.dtype(np.uint32 if count <= UINT32_IDS else np.uint64)
    for k in range(job.levels):
        arr = group[str(k)]
        if arr.dtype != dtype:
            group.create_array(str(k), shape=arr.shape, chunks=arr.chunks, dtype=dtype,
                               fill_value=0, compressors=arr.compressors,
                               dimension_names=arr.metadata.dimension_names, overwrite=True)
    return dtype




# --------------------------------------------------------------------------- the stage


def segment_stage(prediction, output, settings, runner, *, report=False):
    """The :class:`emtile.blockwise.Stage` of a segmentation, checked and planned, and the
    hooks between its passes: ``(stage, steps, pred)``.

    Three passes over one block plan, each reading what the one before wrote in the output's
    working group: labels (interior components or seeds, counted per block), fragments (the
    flood, with each block's records of faces and fragments), and write (ids through the table
    the global step made from the records, every pyramid level).

    ``report``: also find where the threshold cuts the map when its levels are used as given
    (one more read of the map; :mod:`emtile.segmenter.report`).
    """
    from emtile import store

    from emtile.locations import Location

    s = settings
    pred = _open_prediction(prediction, s.offsets)
    mode, shape3, block, grow = _check_options(pred, s)
    levels = check_levels(s.levels, shape3[1:], block[1:], unit="blocks")
    store.check_output(output, inputs=[pred.path])
    sampling = tuple(v / pred.voxel[2] for v in pred.voxel) if mode == "3d" else (1.0, 1.0, 1.0)
    calibrate = _calibration(s, pred) == "map"
    t0 = time.perf_counter()
    counted = calibrate or (report and not pred.channels)  # the map's histogram
    lut = _map_lut(pred, s.invert) if counted else None
    levels_seconds = round(time.perf_counter() - t0, 3) if counted else 0.0
    job = SegmentJob(
        input=pred.path, output=output if isinstance(output, Location) else str(output),
        shape=shape3, image_ndim=len(pred.shape),
        block=block, method=s.method, mode=mode, threshold=float(s.threshold), grow=grow,
        seed_cap=s.seed_cap, seed_radius=s.seed_radius, interior_rounds=s.interior_rounds,
        sampling=sampling, keep_boundaries=bool(s.keep_boundaries), run=uuid.uuid4().hex,
        levels=levels, seeds=s.seeds, invert=bool(s.invert),
        face_limit=kernels.face_limit(s.merge_threshold)
        if s.method == "ws" and s.merge_quantile is not None and not pred.channels else -1,
        channels=pred.channels,
        lut=tuple(int(v) for v in lut) if calibrate and lut is not None else ())
    plan = SegmentPlan(job.shape, job.block)
    recorded = _settings(job, s)
    steps = _Steps(job, plan, s)
    steps.levels_seconds = levels_seconds
    if lut is not None:
        from emtile.segmenter.levels import level_of

        steps.report.threshold_on_map = level_of(lut, s.threshold)
    describe = functools.partial(_describe, plan)
    n = len(plan)
    names = ("labels", "fragments", "write") if job.affinity else \
        ("labels", "fragments", "graph", "write")
    name = {k: f"segment {i}/{len(names)} {k}" for i, k in enumerate(names, 1)}
    per = max(1, TASK_VOXELS // int(np.prod(job.block)))  # blocks per Dask task, by default
    passes = [
        Pass(name=name["labels"], fn=blocks.run_label_blocks, job=job, plan=plan,
             describe=describe, markers="done1", point="segment.labels.recorded",
             keep=_keep_counts, after=steps.offsets, flush_seconds=_FLUSH_S, threads=True,
             task_blocks=per),
        Pass(name=name["fragments"], fn=blocks.run_fragment_blocks, job=job, plan=plan,
             describe=describe, markers="done2", point="segment.fragments.recorded",
             keep=functools.partial(_keep_records, n), flush_seconds=_FLUSH_S, threads=True,
             task_blocks=per),
        Pass(name=name["write"], fn=blocks.run_write_blocks, job=job, plan=plan,
             describe=describe, markers="done3", point="segment.write.recorded",
             before=steps.global_step if job.affinity else None, flush_seconds=_FLUSH_S,
             threads=True, task_blocks=per)]
    if not job.affinity:  # the global step, per row of blocks, in the workers
        groups = blocks.row_groups(job, plan)
        graph = blocks.GraphJob(
            job=job, min_size=int(s.min_size),
            merge_threshold=float(s.merge_threshold) if job.method == "ws" else None,
            merge_quantile=s.merge_quantile if job.method == "ws" else None)
        passes.insert(2, Pass(
            name=name["graph"], fn=blocks.run_graph_rows, job=graph, plan=range(len(groups)),
            describe=functools.partial(_describe_row, plan, groups), markers="done_rows",
            point="segment.graph.recorded", keep=_keep_rows, after=steps.rows_done,
            flush_seconds=_FLUSH_S, threads=True, unit="row"))
    stage = Stage(name="segment", output=job.output, inputs=(pred.path,),
                  fingerprint=_fingerprint(pred, dict(recorded, offsets=pred.offsets)
                                           if pred.channels else recorded, levels),
                  create=functools.partial(_create_output, job, pred, plan, recorded, s),
                  passes=tuple(passes), markers_group=TEMP,
                  resumable=functools.partial(_has_records, n), finish=steps.finish)
    return stage, steps, pred


def segment(prediction, output, settings=None, runner=None, *, overwrite=False, progress=True,
            storage_options=None, report=False, **overrides):
    """Segment a probability map into labelled cells, block by block, into an OME-Zarr label image.

    Parameters
    ----------
    prediction : str or Path
        A store written by :func:`emtile.predict` (probabilities of cell interior at ``"0"``,
        uint8 meaning ``v / 255``, or floats), or another float array in [0, 1] that
        :func:`emtile.open_volume` opens; shape (Z, Y, X) or (Y, X). Or affinities, shape
        (C, Z, Y, X): an emtile affinity store (its attributes give the offsets) or a foreign
        array with ``offsets`` (:mod:`emtile.segmenter.affinity`); the output then also keeps
        the fragments and the region graph (``emtile_graph/``) for ``recut``.
    output : str or Path
        The new store: labels at ``"0"`` (uint32, or uint64 when the count needs it), 0 for
        background, objects numbered 1..N in the order of their first pixel (C order); every
        level of a pyramid (``levels``) takes every ``2**k``-th pixel of level 0.
    settings : SegmentSettings, optional
        The method and its parameters (:class:`emtile.settings.SegmentSettings`, whose
        docstring says what each does; its defaults when None). The labels do not depend on the
        block size.
    runner : emtile.blockwise.Runner, optional
        Where the blocks run: here (None), or on a Dask cluster (the labels are the same).
    overwrite : bool
        Replace an existing output (and never resume an interrupted one).
    progress : bool
    storage_options : dict, optional
        Options of the object stores (``s3://``, ``gs://``, ``https://``) that ``prediction``
        and ``output`` name (:func:`emtile.locations.parse_storage_options`); the endpoint and
        credentials also come from the environment.
    report : bool
        Also find where the defaults' threshold cuts the map when its own levels are used (one
        more read of the map); the result's ``report`` has the signs either way
        (:mod:`emtile.segmenter.report`).
    **overrides
        Fields of the settings or the runner by name (``method="cc"``, ``block_size=(1, 512,
        512)``, ``cluster="local"``, ``client=client``). ``recut=0.4``: ``prediction`` is a
        segmentation made from affinities, relabelled at merge threshold 0.4 from its stored
        fragments and region graph (:mod:`emtile.segmenter.recut`).

    Returns
    -------
    SegmentResult
    """
    from emtile.locations import at

    t0 = time.perf_counter()
    settings, runner = split_overrides(SegmentSettings, settings, overrides, Runner, runner)
    prediction, output = at(prediction, storage_options), at(output, storage_options)
    if settings.recut is not None:
        return _recut(prediction, output, settings, runner, overwrite, progress, t0)
    from emtile._allocator import keep_freed_memory

    keep_freed_memory()  # blocks reuse the memory the last one freed (emtile._allocator)
    stage, steps, pred = segment_stage(prediction, output, settings, runner, report=report)
    done = run_stage(stage, runner, overwrite=overwrite, progress=progress)
    job = steps.job
    resumed = done.blocks_done if job.affinity else done.blocks_done[:2] + done.blocks_done[3:]
    return SegmentResult(output=str(output), shape=pred.shape, dtype=str(steps.dtype),
                         objects=steps.count, method=job.method, mode=job.mode,
                         block=job.block[3 - len(pred.shape):], blocks=len(steps.plan),
                         blocks_resumed=resumed, seconds=time.perf_counter() - t0,
                         settings=_settings(job, settings), levels=job.levels,
                         cluster=done.where, report=steps.report,
                         pass_seconds=_pass_seconds(done, steps))


def _pass_seconds(done, steps=None):
    """Wall seconds per pass, by the pass's last word ("segment 2/4 fragments": "fragments")."""
    out = {"levels": steps.levels_seconds} if steps is not None and steps.levels_seconds else {}
    out.update({name.split()[-1]: round(t, 3) for name, t in done.pass_seconds.items()})
    return out


def _recut(segmentation, output, settings, runner, overwrite, progress, t0):
    """``segment(..., recut=T)``: :func:`emtile.segmenter.recut.recut_stage` run."""
    from emtile.segmenter.recut import recut_stage

    for f in dataclasses.fields(settings):  # a recut keeps the segmentation's own settings
        value = getattr(settings, f.name)
        if f.name != "recut" and value != f.default:
            raise EmtileError(f"{f.name}={value!r} does not apply with recut={settings.recut!r}: "
                              f"a recut keeps every setting of {str(segmentation)!r} and sets "
                              f"only the merge threshold (recut); leave {f.name} out")
    stage, steps = recut_stage(segmentation, output, settings.recut)
    done = run_stage(stage, runner, overwrite=overwrite, progress=progress)
    job = steps.job
    return SegmentResult(output=str(output), shape=job.shape, dtype=str(steps.dtype),
                         objects=steps.count, method="ws", mode="3d", block=job.block,
                         blocks=len(stage.passes[0].plan), blocks_resumed=done.blocks_done,
                         seconds=time.perf_counter() - t0, settings=steps.settings,
                         levels=job.levels, cluster=done.where,
                         pass_seconds=_pass_seconds(done))
