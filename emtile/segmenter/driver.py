"""The driver of ``emtile segment``: checks, the output store, three passes and the global step.

The process that calls :func:`segment` is the driver. It checks the input and the options (one
line each), prepares the output store once, hands the blocks of each pass to
:func:`emtile.distributed.map_blocks` (in this process, on a given client, or on a cluster it
starts or joins for the run: ``cluster``), writes what the blocks' results carry (label counts,
the records of pass 2: :mod:`emtile.segmenter.records`) and then records the blocks as done,
runs the global step between passes 2 and 3 (:mod:`emtile.segmenter.graph`), and alone marks the
store complete, after removing its working arrays. Workers write only their blocks' chunks.

A run killed at any point and started again with the same input and options resumes: the blocks
recorded as done in each pass are skipped, and the global step is recomputed from the per-block
records in the store (it is deterministic), so the labels are identical to an uninterrupted run.
"""

import contextlib
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np

from emtile import _faults
from emtile._errors import EmtileError
from emtile.markers import BlockMarkers
from emtile.segmenter import blocks, kernels
from emtile.segmenter.blocks import TEMP, SegmentJob, SegmentPlan
from emtile.segmenter.graph import number_objects
from emtile.segmenter.records import PART_BLOCKS, PART_BYTES, RecordStore, record_nbytes

__all__ = ["segment", "SegmentResult", "METHODS", "MODES", "SEEDS", "DEFAULTS"]

METHODS = ("cc", "ws")
MODES = ("auto", "2d", "3d")
SEEDS = ("components", "distance")
DEFAULTS = {"method": "ws", "seeds": "components", "threshold": 0.85, "min_size": 0,
            "merge_threshold": 0.25, "merge_quantile": 0.5, "grow": 32, "seed_cap": 12,
            "seed_radius": 2, "interior_rounds": 40}
BLOCK_PX = 2**22  # pixels per default block
_FLUSH_EVERY = 64  # results buffered before counts and markers are written (or _FLUSH_S)
_FLUSH_S = 2.0
PASSES = ("done1", "done2", "done3")  # the markers of the three passes
_PASS_NAMES = {"done1": "labels", "done2": "fragments", "done3": "write"}
_RESUME = "run the same command again to resume"
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


def _ome(path):
    """The root group attributes of a Zarr store at ``path``, or None."""
    import zarr

    from emtile.store import is_zarr_store

    if not is_zarr_store(path):
        return None
    try:
        node = zarr.open(str(path), mode="r")
    except Exception:
        return None
    return node.attrs.asdict() if isinstance(node, zarr.Group) else None


def _open_prediction(path):
    """Open and check PRED: an emtile probability store, or a float array in [0, 1]."""
    from emtile.volume import open_volume

    path = str(path)
    attrs = _ome(path)
    arr = open_volume(path)
    meta = (attrs or {}).get("emtile") or {}
    kind = meta.get("kind")
    dtype = np.dtype(arr.dtype)
    if kind is not None and kind != "probabilities":
        raise EmtileError(f"prediction {path!r} is an emtile {kind} store, not a probability map: "
                          f"give the output of emtile predict")
    if kind is None and dtype.kind != "f":
        raise EmtileError(f"prediction {path!r} has dtype {dtype} and no emtile metadata: give "
                          f"the output of emtile predict (or probabilities as floats in [0, 1])")
    if dtype not in (np.uint8, np.float16, np.float32, np.float64):
        raise EmtileError(f"prediction {path!r} has dtype {dtype}: expected uint8, float16 or "
                          f"float32 probabilities")
    if len(arr.shape) not in (2, 3) or 0 in arr.shape:
        raise EmtileError(f"prediction {path!r} has shape {tuple(arr.shape)}: expected one "
                          f"probability map, (Y, X) or (Z, Y, X) (one output channel)")
    if kind == "probabilities" and not meta.get("complete"):
        raise EmtileError(f"prediction {path!r} is incomplete (its emtile predict run did not "
                          f"finish): run emtile predict again to finish it")
    voxel, translation = _ngff_transforms(attrs, len(arr.shape))
    model = (meta.get("predict") or {}).get("model") or {}
    return _Prediction(path, tuple(int(s) for s in arr.shape), dtype, voxel, translation,
                       int(model.get("ndim", 2)))


def _ngff_transforms(attrs, ndim):
    """(voxel size, translation) of the full-resolution level, as (z, y, x); defaults 1, None."""
    voxel, translation = (1.0,) * 3, None
    try:
        ms = (attrs.get("ome") or attrs)["multiscales"][0]
        names = [a["name"] for a in ms["axes"]]
        spatial = [k for k, n in enumerate(names) if n in "zyx"]
        transforms = ms["datasets"][0]["coordinateTransformations"]
        for t in transforms:
            values = [float(t[t["type"]][k]) for k in spatial]
            values = [1.0 if t["type"] == "scale" else 0.0] * (3 - len(values)) + values
            if t["type"] == "scale":
                voxel = tuple(values)
            elif t["type"] == "translation":
                translation = tuple(values)
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    return voxel, translation


# --------------------------------------------------------------------------- options


def _check_options(pred, *, method, mode, threshold, min_size, merge_threshold, grow,
                   block_size, seeds="distance", merge_quantile=None):
    if method not in METHODS:
        raise EmtileError(f"method={method!r} is not supported: choose cc or ws")
    if seeds not in SEEDS:
        raise EmtileError(f"seeds={seeds!r} is not supported: choose components or distance")
    if merge_quantile is not None and (
            isinstance(merge_quantile, bool) or not isinstance(merge_quantile, (int, float))
            or not 0 < merge_quantile <= 1):
        raise EmtileError(f"merge_quantile={merge_quantile!r} must be a number in (0, 1], or "
                          f"None for the mean")
    if mode not in MODES:
        raise EmtileError(f"mode={mode!r} is not supported: choose auto, 2d or 3d")
    if mode == "auto":
        mode = "3d" if pred.model_ndim == 3 and len(pred.shape) == 3 else "2d"
    if mode == "3d" and len(pred.shape) == 2:
        raise EmtileError(f"--mode 3d needs a (Z, Y, X) stack, but prediction {pred.path!r} is "
                          f"one 2-D image of shape {pred.shape}; use --mode 2d")
    for name, value in (("threshold", threshold), ("merge_threshold", merge_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise EmtileError(f"{name}={value!r} must be a number between 0 and 1")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise EmtileError(f"min_size={min_size!r} must be a whole number of pixels, 0 or more")
    if isinstance(grow, bool) or not isinstance(grow, (int, np.integer)) \
            or not 1 <= grow <= kernels.MAX_ROUNDS // 2:
        raise EmtileError(f"grow={grow!r} must be a whole number of pixels from 1 to "
                          f"{kernels.MAX_ROUNDS // 2}")
    shape3 = (1,) * (3 - len(pred.shape)) + pred.shape
    block = _check_block(block_size, pred.shape, mode)
    if np.prod(shape3, dtype=np.float64) >= kernels.INDEX_LIMIT:
        raise EmtileError(f"prediction of shape {pred.shape} has more than 2**44 pixels; "
                          f"segment it in parts with a region of interest")
    return mode, shape3, block


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


def _check_levels(levels, shape3, block):
    """Every level's chunks stay whole per block: level ``levels - 1`` samples every
    ``2 ** (levels - 1)``-th pixel in y and x, so blocks must start at multiples of it (or be
    alone along that axis), and the image must keep at least one pixel."""
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise EmtileError(f"levels={levels!r} must be a positive whole number")
    f = 2 ** (levels - 1)
    for axis, b, n in zip("yx", block[1:], shape3[1:]):
        if n < f:
            raise EmtileError(f"levels={levels} would halve the {n}-px {axis} axis below one "
                              f"pixel: use at most {n.bit_length()} levels")
        if b % f and b < n:
            raise EmtileError(f"levels={levels} needs blocks whose size in y and x is divisible "
                              f"by {f} (each block writes whole chunks of every level), but the "
                              f"blocks are {b} px in {axis}: use at most {(b & -b).bit_length()} "
                              f"levels, or such a block size")
    return int(levels)


# --------------------------------------------------------------------------- the store


def _settings(job, *, min_size, merge_threshold, merge_quantile):
    out = {"method": job.method, "mode": job.mode, "threshold": job.threshold,
           "min_size": int(min_size), "keep_boundaries": job.keep_boundaries, "grow": job.grow,
           "block": list(job.block)}
    if job.method == "ws":
        out.update(seeds=job.seeds, merge_threshold=merge_threshold,
                   merge_quantile=merge_quantile)
        if job.distance_seeds:
            out.update(seed_cap=job.seed_cap, seed_radius=job.seed_radius,
                       interior_rounds=job.interior_rounds)
    return out


def _resumable(group, fingerprint, n_blocks):
    meta = group.attrs.asdict().get("emtile", {})
    if meta.get("segment_fingerprint") != json.loads(json.dumps(fingerprint)):
        return False
    try:
        temp = group[TEMP]
    except (KeyError, FileNotFoundError):
        return False
    return RecordStore.open(temp, n_blocks) is not None and \
        all(BlockMarkers.open(temp, n_blocks, name=name) is not None for name in PASSES)


def _create_output(job, pred, plan, *, settings, fingerprint):
    from emtile import store

    image_shape = job.shape if job.image_ndim == 3 else job.shape[1:]
    chunks = (1,) * (job.image_ndim == 3) + job.block[1:] if job.mode == "2d" else job.block
    voxel = pred.voxel if job.image_ndim == 3 else pred.voxel[1:]
    group = store.create_image(job.output, image_shape, np.uint32, chunks=chunks,
                               voxel_size=voxel, name="segmentation", kind="labels",
                               levels=job.levels, halve_chunks=True,
                               attrs={"segment": settings, "source": pred.path,
                                      "segment_fingerprint": fingerprint,
                                      **store.inherited_voxel_attrs(pred.path, "prediction")})
    ome = dict(group.attrs["ome"])
    ms = [dict(m) for m in ome["multiscales"]]
    if pred.translation is not None and any(pred.translation):
        t = list(pred.translation if job.image_ndim == 3 else pred.translation[1:])
        # every level at the prediction's place, as store.set_translation does
        ms[0]["datasets"] = [dict(d, coordinateTransformations=[
            d["coordinateTransformations"][0], {"type": "translation", "translation": t}])
            for d in ms[0]["datasets"]]
    ome["multiscales"] = ms
    ome["image-label"] = {"version": "0.5", "source": {"image": os.path.relpath(
        os.path.abspath(pred.path), os.path.abspath(job.output))}}
    group.attrs["ome"] = ome
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
    bins = kernels.FACE_BINS if job.face_limit >= 0 else 0
    RecordStore.create(temp, n, edge_width=5 + bins)
    for name in PASSES:  # last: their presence means the set-up finished
        BlockMarkers.create(temp, n, name=name)
    return group


def _open_output(job, pred, plan, *, overwrite, settings, fingerprint):
    """-> (group, resumed). An interrupted run with the same fingerprint is resumed."""
    import zarr

    from emtile import store

    state = store.prepare_output(job.output, overwrite=overwrite, resume=not overwrite)
    if state == "resume":
        group = zarr.open_group(job.output, mode="r+")
        if _resumable(group, fingerprint, len(plan)):
            return group, True
        store.prepare_output(job.output, overwrite=overwrite)
    return _create_output(job, pred, plan, settings=settings, fingerprint=fingerprint), False


# --------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class _Runner:
    """Where the blocks of every pass run: this process (``client`` None) or a Dask client."""

    client: object = None
    blocks_per_task: int = 1
    retries: int = 2
    progress: bool = True


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


def _run_pass(fn, job, temp, name, *, desc, runner, buffer=None):
    """Run ``fn`` over the blocks that the markers ``name`` do not record as done; record them.

    ``buffer`` (``add(i, result)``, ``full()``, ``flush()``) keeps what the results carry and
    writes it, always before the markers are flushed: when it is full (without one, every
    ``_FLUSH_EVERY`` blocks), every ``_FLUSH_S`` seconds and at the end. Returns the number of
    blocks that were already done.
    """
    from emtile import distributed, store

    plan = SegmentPlan(job.shape, job.block)
    markers = BlockMarkers.open(temp, len(plan), name=name, flush_every=float("inf"))
    todo = np.flatnonzero(~markers.done())
    pending = []
    last = [time.monotonic()]
    point = f"segment.{_PASS_NAMES[name]}.recorded"
    faults = bool(os.environ.get(_faults.ENV))  # test-only: record every block at once

    def keep(i, result):
        if result is None:  # the block was already recorded (a retry found it done)
            return
        if buffer is not None:
            buffer.add(i, result)
        pending.append(i)
        full = buffer.full() if buffer is not None else len(pending) >= _FLUSH_EVERY
        if full or time.monotonic() - last[0] >= _FLUSH_S or faults:
            write()

    def write():
        with store.write_errors(job.output, then=_RESUME):
            if buffer is not None:
                buffer.flush()
            markers.record(pending)
            markers.flush()
        for _ in pending:
            _faults.point(point)  # test-only: the driver killed after recording blocks
        pending.clear()
        last[0] = time.monotonic()

    distributed.map_blocks(fn, job, iter(todo.tolist()), client=runner.client,
                           blocks_per_task=runner.blocks_per_task, retries=runner.retries,
                           progress=runner.progress, desc=desc, total=int(todo.size),
                           on_result=keep, describe=lambda i: _describe(plan, i))
    write()
    missing = np.flatnonzero(~markers.done())
    if missing.size:  # every block was run: a bug, never a user error
        raise RuntimeError(f"internal error: {missing.size} blocks of {desc} were not recorded "
                           f"(first: {int(missing[0])}); the output is left incomplete")
    return len(plan) - int(todo.size)


def _describe(plan, i):
    start, stop = plan[i]
    return f"block {i} (voxels {', '.join(f'{a}:{b}' for a, b in zip(start, stop))})"


def _pass_labels(job, temp, *, runner):
    done = _run_pass(blocks.run_label_blocks, job, temp, "done1", desc="segment 1/3 labels",
                     runner=runner, buffer=_Counts(temp["counts"]))
    counts = np.asarray(temp["counts"][:])
    offsets = np.zeros_like(counts)
    offsets[1:, 0] = np.cumsum(counts[:-1, 0])
    offsets[:, 1] = counts[:, 0].sum() + np.concatenate([[0], np.cumsum(counts[:-1, 1])])
    from emtile import store

    with store.write_errors(job.output, then=_RESUME):
        temp["offsets"][:] = offsets
    return int(counts.sum()) + 1, done  # size of the provisional id space (0 included)


def _pass_fragments(job, temp, *, runner):
    records = RecordStore.open(temp, len(SegmentPlan(job.shape, job.block)))
    return _run_pass(blocks.run_fragment_blocks, job, temp, "done2",
                     desc="segment 2/3 fragments", runner=runner, buffer=_Records(records))


def _groups(job, plan):
    """Blocks whose ids can meet in the global step: in 2d mode each row of blocks along z
    (slices never join), so the graph held at once is a row's; in 3d mode all of them."""
    if job.mode == "3d":
        return [range(len(plan))]
    per = len(plan) // plan.counts[0]
    return [range(k * per, (k + 1) * per) for k in range(plan.counts[0])]


def _table(temp, n_ids):
    """The provisional -> output id table, rewritten in place when a resumed run finds it: a
    task of a killed driver may still be reading it, and reads the same values either way."""
    try:
        table = temp["table"]
        if table.shape == (n_ids,) and table.dtype == np.int64:
            return table
    except KeyError:
        pass
    return temp.create_array("table", shape=(n_ids,), chunks=(min(n_ids, _TABLE_CHUNK),),
                             dtype="int64", fill_value=0, overwrite=True)


def _global_step(job, temp, plan, n_ids, *, min_size, merge_threshold, merge_quantile):
    """Per group of blocks: join ids across faces, agglomerate (ws), absorb small objects,
    number the objects by first pixel (after the groups before it); write the provisional ->
    output table. Returns N."""
    counts, offsets = np.asarray(temp["counts"][:]), np.asarray(temp["offsets"][:])
    records = RecordStore.open(temp, len(plan))
    table = _table(temp, n_ids)
    total = 0
    for group in _groups(job, plan):
        b0, b1 = group[0], group[-1]
        # the group's provisional ids: one run of cell ids and one of seed ids
        lo = offsets[b0] + 1
        hi = offsets[b1] + counts[b1] + 1  # exclusive
        nc = int(hi[0] - lo[0])

        def local(x):
            return np.where(x < hi[0], x - lo[0] + 1, x - lo[1] + 1 + nc)

        pairs, stats, edges = records.read(group)
        stats[:, 0] = local(stats[:, 0])
        edges[:, :2] = local(edges[:, :2])
        number, count = number_objects(
            1 + nc + int(hi[1] - lo[1]), local(pairs), stats, edges, min_size=min_size,
            merge_threshold=merge_threshold if job.method == "ws" else None,
            merge_quantile=merge_quantile if job.method == "ws" else None)
        number[number > 0] += total
        total += count
        table[int(lo[0]):int(hi[0])] = number[1:1 + nc]
        if hi[1] > lo[1]:
            table[int(lo[1]):int(hi[1])] = number[1 + nc:]
    return total


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


def _fingerprint(pred, settings, levels):
    from emtile.markers import content_token

    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return {"input": os.path.realpath(pred.path), "input_token": content_token(pred.path),
            "settings": digest, "levels": int(levels)}


def _check_run(blocks_per_task, retries, client, cluster, cluster_workers, scheduler_file):
    """One line for a bad distributed option, before anything is written."""
    if isinstance(blocks_per_task, bool) or not isinstance(blocks_per_task, int) \
            or blocks_per_task < 1:
        raise EmtileError(f"blocks_per_task={blocks_per_task!r} must be a positive integer")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise EmtileError(f"retries={retries!r} must be 0 or a positive integer")
    if client is None and (cluster is not None or scheduler_file is not None):
        from emtile.distributed import cluster_spec

        cluster_spec(cluster, workers=cluster_workers, scheduler_file=scheduler_file)


@contextlib.contextmanager
def _start(runner, *, cluster, cluster_workers, scheduler_file):
    """``(runner, where)``: on ``runner.client``, or on a cluster started or joined here
    (:func:`emtile.distributed.start_cluster`, closed at the end), or in this process."""
    if runner.client is not None or (cluster is None and scheduler_file is None):
        yield runner, "a Dask client" if runner.client is not None else ""
        return
    from dataclasses import replace

    from emtile import distributed

    with distributed.start_cluster(cluster, workers=cluster_workers,
                                   scheduler_file=scheduler_file) as (client, info):
        if runner.progress:
            from tqdm.auto import tqdm

            tqdm.write(str(info))
        yield replace(runner, client=client), f"{info.kind} cluster, {info.workers} workers"


def segment(prediction, output, *, method=DEFAULTS["method"], mode="auto",
            threshold=DEFAULTS["threshold"], min_size=DEFAULTS["min_size"],
            merge_threshold=DEFAULTS["merge_threshold"], seeds=DEFAULTS["seeds"],
            merge_quantile=DEFAULTS["merge_quantile"], keep_boundaries=False, block_size=None,
            grow=DEFAULTS["grow"], overwrite=False, progress=True, client=None, cluster=None,
            cluster_workers=None, scheduler_file=None, blocks_per_task=1, retries=2, levels=1):
    """Segment a probability map into labelled cells, block by block, into an OME-Zarr label image.

    Parameters
    ----------
    prediction : str or Path
        A store written by :func:`emtile.predict` (probabilities of cell interior at ``"0"``,
        uint8 meaning ``v / 255``, or floats), or another float array in [0, 1] that
        :func:`emtile.open_volume` opens; shape (Z, Y, X) or (Y, X).
    output : str or Path
        The new store: labels at ``"0"`` (uint32, or uint64 when the count needs it), 0 for
        background, objects numbered 1..N in the order of their first pixel (C order).
    method : {"cc", "ws"}
        ``cc``: connected components of the interior (``p > threshold``), the boundary pixels
        then flooded from them. ``ws``: seeds (``seeds``) flooded over the interior and the
        boundary into fragments, which are merged while the boundary probability on their
        shared face (its ``merge_quantile``, or its mean) is at most ``merge_threshold``.
    mode : {"auto", "2d", "3d"}
        ``2d`` segments each z-slice on its own (4-connected); ``3d`` connects through z
        (6-connected). ``auto``: 3d only for a stack predicted by a 3-D model.
    threshold : float
        Interior is ``p > threshold``, as ``emtile predict --threshold``.
    min_size : int
        Objects of fewer interior pixels (``p > threshold``) join the neighbour they share the
        largest face with, or are dropped when they have none.
    merge_threshold : float
        ws: highest boundary probability on a face (its quantile, or its mean) for its
        fragments to be merged.
    seeds : {"components", "distance"}
        ws: the seeds are the interior's connected components (the fragments are cc's
        objects), or the maxima of the interior's distance to the boundary (several per cell,
        each flooded over the interior first).
    merge_quantile : float or None
        ws: measure a face by this quantile (in (0, 1]) of the boundary probabilities of its
        pixels, counted in 8 bins up to ``merge_threshold``; None: by their mean.
    keep_boundaries : bool
        Leave the boundary pixels (``p <= threshold``) 0 instead of giving them to the cells.
    block_size : tuple of int, optional
        Block shape, one number per axis of the prediction; default about 4 M pixels
        (2d: whole slices up to 1024 x 1024). The labels do not depend on it.
    grow : int
        How far, in pixels, a flood carries a label: boundary pixels further from every cell
        stay 0. It also sets the context each block reads.
    overwrite : bool
        Replace an existing output (and never resume an interrupted one).
    progress : bool
    client : distributed.Client, optional
        Run the blocks on this Dask cluster (:func:`emtile.distributed.map_blocks`); the
        workers open the prediction and the output by path. None: in this process (or on
        ``cluster``).
    cluster : str, optional
        Run the blocks on Dask: ``"local"`` (``cluster_workers`` processes on this machine),
        ``"tcp://host:port"`` (a running scheduler), ``"slurm"`` (dask-jobqueue) or ``"cuda"``
        (dask-cuda); started (or joined) for this run and closed after it. See
        :func:`emtile.distributed.start_cluster`. The labels are the same on any cluster.
    cluster_workers : int, optional
        Workers of a local / cuda cluster, or SLURM jobs.
    scheduler_file : path, optional
        The scheduler file of a running cluster (instead of ``cluster``).
    blocks_per_task : int
        Blocks per Dask task.
    retries : int
        Extra tries of a failed Dask task.
    levels : int
        Resolution levels (an OME-Zarr pyramid for viewers): level ``k`` takes every
        ``2**k``-th pixel in y and x of level 0 (labels are never averaged, so no level holds an
        id that is not in level 0). Each block writes its part of every level as it writes
        level 0 (no second pass); the block size in y and x must then be divisible by
        ``2**(levels - 1)`` (the default blocks are).

    Returns
    -------
    SegmentResult
    """
    t0 = time.perf_counter()
    from emtile import store

    pred = _open_prediction(prediction)
    mode, shape3, block = _check_options(
        pred, method=method, mode=mode, threshold=threshold, min_size=min_size,
        merge_threshold=merge_threshold, grow=grow, block_size=block_size, seeds=seeds,
        merge_quantile=merge_quantile)
    levels = _check_levels(levels, shape3, block)
    _check_run(blocks_per_task, retries, client, cluster, cluster_workers, scheduler_file)
    store.check_output(output, inputs=[pred.path])
    sampling = tuple(v / pred.voxel[2] for v in pred.voxel) if mode == "3d" else (1.0, 1.0, 1.0)
    job = SegmentJob(
        input=pred.path, output=str(output), shape=shape3, image_ndim=len(pred.shape),
        block=block, method=method, mode=mode, threshold=float(threshold), grow=int(grow),
        seed_cap=DEFAULTS["seed_cap"], seed_radius=DEFAULTS["seed_radius"],
        interior_rounds=DEFAULTS["interior_rounds"], sampling=sampling,
        keep_boundaries=bool(keep_boundaries), run=uuid.uuid4().hex, levels=levels, seeds=seeds,
        face_limit=kernels.face_limit(merge_threshold)
        if method == "ws" and merge_quantile is not None else -1)
    plan = SegmentPlan(job.shape, job.block)
    settings = _settings(job, min_size=min_size, merge_threshold=merge_threshold,
                         merge_quantile=merge_quantile)
    fingerprint = _fingerprint(pred, settings, levels)
    runner = _Runner(client, blocks_per_task, retries, bool(progress))
    with store.output_lock(output):
        with store.write_errors(output, then=_RESUME):
            group, _ = _open_output(job, pred, plan, overwrite=overwrite, settings=settings,
                                    fingerprint=fingerprint)
        temp = group[TEMP]
        with _start(runner, cluster=cluster, cluster_workers=cluster_workers,
                    scheduler_file=scheduler_file) as (runner, where):
            n_ids, done1 = _pass_labels(job, temp, runner=runner)
            done2 = _pass_fragments(job, temp, runner=runner)
            with store.write_errors(output, then=_RESUME):
                count = _global_step(job, temp, plan, n_ids, min_size=min_size,
                                     merge_threshold=merge_threshold,
                                     merge_quantile=merge_quantile)
                dtype = _output_dtype(group, count, job)
            done3 = _run_pass(blocks.run_write_blocks, job, temp, "done3",
                              desc="segment 3/3 write", runner=runner)
        with store.write_errors(output, then=_RESUME):
            del group[TEMP]
            store.mark_complete(group, objects=count)
    return SegmentResult(output=str(output), shape=pred.shape, dtype=str(dtype), objects=count,
                         method=method, mode=mode, block=block[3 - len(pred.shape):],
                         blocks=len(plan), blocks_resumed=(done1, done2, done3),
                         seconds=time.perf_counter() - t0, settings=settings, levels=levels,
                         cluster=where)
