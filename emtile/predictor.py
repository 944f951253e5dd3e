"""Tiled, resumable prediction as a blockwise stage: one function does a block's work anywhere.

The work is the block plan of :mod:`emtile.geometry`: the global tile grid over the region, cut
into blocks of whole output chunks. A run is described by a :class:`PredictJob`, small, frozen and
picklable (the paths of input, output and model folder, a hash of the weights, every option that
changes the bytes, the device and the torch thread count; never an array or a module), and
:func:`run_blocks` does the whole work of some blocks of it in whatever process it runs in:

1. it opens, once per process, the input, the output store (already prepared by the driver) and
   the model (loaded from the model folder and checked against the hash), and skips blocks that
   are already recorded as done;
2. it reads each block's input in groups of whole batches, each group as one raw window in the
   input's dtype (mirroring context at the volume border, :mod:`emtile.tile_reader`): in
   DataLoader worker processes or a reader thread while the model runs on the previous batches
   when a core is free for it (CUDA: pinned memory, non-blocking copies, AMP, channels_last),
   between forward passes when torch's threads already use every core (CPU: channels_last);
   the batches are views of the window, normalised as they become the model's input (on the
   device, on CUDA);
3. it adds the output tiles into the block's buffer (:func:`emtile.stitch.accumulate`), or, on
   a grid without blending stored as uint8, quantises each tile straight into the block
   (:func:`emtile.stitch.place_owned`: the same bytes);
4. a writer thread normalises the finished block, writes its chunks (probabilities, and the
   thresholded mask) and only then reports it; reports carry the tiles run and the seconds spent
   reading, computing and writing.

:func:`predict` is the driver. It plans, prepares the output store once, and then either runs
:func:`run_blocks` over the blocks still to do in this process (``--workers`` DataLoader readers),
or hands them to a Dask cluster through :func:`emtile.distributed.map_blocks` (``--cluster``:
workers open the same store and load the model once each). Either way it records each block as
done (:mod:`emtile.markers`) after the worker reported its chunks written, and alone marks the
output complete once every block is recorded. A killed run started again (locally or on a
cluster, in any mix) computes only the blocks not recorded, and gives the same bytes: a block's
batches are the same whichever blocks are left, and blocks never share a chunk.

A run resumes an interrupted store only when everything that determines its bytes is the same
(:func:`_fingerprint`: the input's path and a token of its files, the model's weights, the grid
and every option that changes the arithmetic, the torch thread count on the CPU) and the store's
set-up finished (its block markers, created last, exist). An in-memory input is never resumed,
and ``overwrite=True`` always starts over. An output that is, holds or lies inside the input is
refused.

:func:`predict_array` runs the same :func:`run_blocks` on an in-memory array (no store), e.g. for
validation during training.
"""

import collections
import contextlib
import functools
import math
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from emtile._errors import EmtileError
from emtile._process import usable_cores
from emtile import _faults, geometry
from emtile.locations import Location, at
from emtile.device import autocast, keep_large_allocations, resolve_amp, resolve_device
from emtile.blockwise import RESUME as _RESUME
from emtile.markers import MARKERS
from emtile.model import weights_hash
from emtile.normalize import Scaling
from emtile.prediction_store import NO_MASK_NOTE, affinity_record, channel_names, resolve_shards
from emtile.settings import DTYPES
from emtile.stacks import WriterThread
from emtile.tile_reader import GROUP_BYTES, Batches, read_ahead as _read_ahead, tiles_dataset
from emtile.volume import open_input

__all__ = ["predict", "predict_array", "run_blocks", "default_tile", "PredictJob", "BlockReport",
           "PredictResult", "weights_hash", "DTYPES"]

MEMORY = "memory:"  # prefix of an input, output or model held by this process (not a path)


@dataclass
class PredictResult:
    """What :func:`predict` did."""

    output: str
    shape: tuple
    dtype: str
    tile: tuple
    out_tile: tuple
    stride: tuple
    tiles: int  # tile runs over the whole plan
    blocks: int
    blocks_resumed: int  # blocks already done by an earlier, interrupted run
    efficiency: float  # output pixels / input pixels computed
    seconds: float
    device: str
    threads: int = 0  # torch threads per process (CPU)
    cluster: str = ""  # the cluster it ran on ("" for this process)
    block_seconds: float = 0.0  # median seconds a block took (model + stitching + writing)
    model_seconds: float = 0.0  # the model's forward passes, summed over the blocks computed
    tile_probe: dict = field(default_factory=dict)  # tile="auto": seconds per tile measured
    mask: str = ""  # the mask store's path ("" without a threshold)
    threshold: float = None
    offsets: list = None  # an affinity model's offsets, one per channel (None: boundaries)

    def __str__(self):
        model_axes = [ax for ax, (t, o) in enumerate(zip(self.tile, self.out_tile))
                      if (t, o) != (1, 1)]  # the slice axes of a 2-D model over a stack are 1

        def fmt(sizes):
            return "x".join(str(sizes[ax]) for ax in model_axes)

        where = f"{self.device}" + (f" ({self.threads} threads)" if self.device == "cpu" else "")
        if self.cluster:
            where += f" on {self.cluster}"
        mask = (f"mask: {self.mask} (cell interior where p > {self.threshold:g})" if self.mask
                else "no mask (--threshold T writes one)")
        what = "probabilities"
        if self.offsets:
            what = "affinities (offsets " + "; ".join(",".join(map(str, o)) for o in self.offsets) + ")"
            mask = "no mask (not defined for affinities)"
        return (f"{self.output}: {self.shape} {self.dtype} {what}; {mask}\n"
                f"tile {fmt(self.tile)} -> {fmt(self.out_tile)} (stride {fmt(self.stride)}), "
                f"{self.tiles} tiles in {self.blocks} blocks, {self.seconds:.1f} s on {where}; "
                f"efficiency {self.efficiency:.0%} (output pixels per input pixel computed: the "
                f"rest is the context each tile reads)")


@dataclass(frozen=True)
class BlockReport:
    """What :func:`run_blocks` did with one block."""

    index: int
    tiles: int = 0
    voxels: int = 0  # output voxels written
    read_s: float = 0.0  # reading and mirroring its input tiles
    compute_s: float = 0.0  # the model and the stitcher
    write_s: float = 0.0  # normalising and writing its chunks
    skipped: bool = False  # already recorded as done: nothing was computed
    pid: int = 0  # the process that ran it
    model_s: float = 0.0  # the model's forward passes (part of compute_s)


# --------------------------------------------------------------------------- input


def _check_volume(net, arr, name="input"):
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "biuf":
        raise EmtileError(f"{name} has dtype {dtype}, which is not numeric: expected integer or "
                          f"floating-point pixels")
    if net.in_channels != 1:
        raise EmtileError(f"the model expects {net.in_channels} input channels; emtile predicts "
                          f"single-channel volumes only")
    k = net.ndim
    if k == 3 and len(arr.shape) != 3:
        raise EmtileError(f"the model is 3-D: it predicts (Z, Y, X) volumes, but {name} has "
                          f"{len(arr.shape)} dimensions (shape {tuple(arr.shape)})")
    if len(arr.shape) not in (k, k + 1):
        raise EmtileError(f"the model is {k}-D: it predicts (Y, X) images or (Z, Y, X) stacks, but "
                          f"{name} has {len(arr.shape)} dimensions (shape {tuple(arr.shape)})")
    if any(s == 0 for s in arr.shape):
        raise EmtileError(f"{name} is empty (shape {tuple(arr.shape)})")


def _as_model(model, *, weights=True):
    """The :class:`emtile.model.Model` of ``model`` (loaded once: network, metadata,
    normalisation, weights hash). A network lent by the caller keeps its mode; without
    ``weights`` its hash is not computed (a run in this process on an array needs none)."""
    from emtile.model import Model, load
    from emtile.unet import UNet

    if isinstance(model, UNet):
        if not weights:
            return Model(net=model, source="", kind="memory", metadata={}, normalization=None,
                         voxel_size=None, weights_sha256="")
        was_training = model.training
        loaded = load(model)
        model.train(was_training)
        return loaded
    if isinstance(model, (Model, str, os.PathLike)):
        return load(model)
    raise EmtileError(f"model must be an emtile UNet, a Model or a model folder, got "
                      f"{type(model).__name__}")


# --------------------------------------------------------------------------- the plan


def default_tile(tile, ndim):
    """``tile`` itself, or for None the default of a ``ndim``-D model: 572 in 2-D (the paper's
    tile), ``"auto"`` in 3-D (a 572^3 tile would not fit in memory)."""
    if tile is None:
        return 572 if ndim == 2 else "auto"
    return tile


def _plan(net, arr, *, tile, overlap, roi, blend, max_tile_memory, batch_size, max_block_px,
          chunk_size, probe=None):
    """``(grid, chunks)``; ``tile="auto"`` takes the size computing the fewest pixels, or the
    one ``probe(costs)`` picks from :func:`emtile.geometry.tile_costs`; None: the model's
    default (:func:`default_tile`)."""
    tile = default_tile(tile, net.ndim)
    _check_volume(net, arr)
    shape = tuple(int(s) for s in arr.shape)
    region = geometry.normalize_roi(roi, shape)
    ramps = blend in ("linear", "cosine")
    if isinstance(tile, str):
        if tile != "auto":
            raise EmtileError(f"tile={tile!r} is not a tile size: give a valid size (e.g. 572), "
                              f"one per axis (e.g. (20, 132, 132) for a 3-D model) or 'auto'")
        costs = _auto_costs(net, shape, region, overlap, ramps, max_tile_memory, batch_size)
        tile = costs[0][0] if probe is None else probe(costs)
    grid = _grid(net, shape, tile, region, overlap)
    if ramps and not grid.owned:
        _check_ramps(net, grid, overlap, blend)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise EmtileError(f"chunk_size={chunk_size!r} must be a positive integer")
    if not isinstance(max_block_px, int) or max_block_px < 1:
        raise EmtileError(f"max_block_px={max_block_px!r} must be a positive integer")
    return grid, _chunks(net, grid, chunk_size)


def _auto_costs(net, shape, region, overlap, ramps, max_tile_memory, batch_size):
    """:func:`emtile.geometry.tile_costs` of the tiles whose forward pass fits in
    ``max_tile_memory`` and whose output holds an alignment step (with blending ramps: both
    ramps, whatever the stride's rounding). 2-D tiles are square; 3-D ones a size per axis."""
    sm = net.shape_map
    per_px = net.activation_bytes(1, batch_size)
    ov = geometry.per_axis(overlap, net.ndim, "overlap")
    min_tile = tuple(2 * h + (2 * (o + a) + 1 if ramps else a)
                     for h, o, a in zip(sm.halos, ov, sm.aligns))
    if net.ndim == 2:
        return geometry.tile_costs(shape, sm, roi=region, overlap=overlap,
                                   max_tile=int(math.sqrt(max_tile_memory / per_px)),
                                   min_tile=max(min_tile))
    return geometry.tile_costs(shape, sm, roi=region, overlap=overlap, min_tile=min_tile,
                               max_voxels=max_tile_memory // per_px)


def _chunks(net, grid, chunk_size):
    """Output chunks: a multiple of the tile stride, so blocks end where tiles end (no tile runs
    twice without blending); a region smaller than that is one chunk. ``chunk_size`` is the
    target edge along a 2-D model's axes; a 3-D model's chunks hold about as many voxels
    (``chunk_size ** (2/3)`` per axis: 64 for 512)."""
    lead = grid.ndim - net.ndim
    edge = chunk_size if net.ndim == 2 else max(1, round(chunk_size ** (2 / 3)))
    chunks = (1,) * lead + tuple(s * max(1, round(edge / s)) for s in grid.stride[lead:])
    return tuple(min(c, n) for c, n in zip(chunks, grid.region_shape))


def _grid(net, shape, tile, region, overlap):
    sizes = net.check(tile)
    sm = net.shape_map
    names = "zyx"[3 - net.ndim:]
    for ax, (t, a) in enumerate(zip(sizes, sm.aligns)):
        out = sm.output_along(t, ax)
        if out < a:
            smallest = next(s for s in net.valid_sizes(t, 10 * t + 1000, axis=ax)
                            if sm.output_along(s, ax) >= a)
            where = "" if net.ndim == 2 and sm.uniform else f" along {names[ax]}"
            raise EmtileError(f"tile={t}{where} gives an output of {out} px, less than "
                              f"the {a}-px alignment at depth {net.depth}; use a tile of "
                              f"at least {smallest}")
    return geometry.tile_grid(shape, net.shape_map, sizes, roi=region, overlap=overlap)


def _check_ramps(net, grid, overlap, blend):
    """Linear / cosine ramps of neighbouring tiles must fit in a tile's output (before the output
    store exists, in the user's terms). The actual overlap is ``out - stride``: the stride is
    rounded down to a multiple of ``2 ** depth``, so it can exceed what was asked for."""
    k = net.ndim
    asked = geometry.per_axis(overlap, k, "overlap")
    for ax, align in enumerate(net.shape_map.aligns):
        g = grid.ndim - k + ax
        out, ov = grid.out_tile[g], grid.overlap[g]
        if 2 * ov < out:
            continue
        strides = {v: (out - v) // align * align for v in range(out)}
        fits = [v for v, s in strides.items() if s >= align and 2 * (out - s) < out]
        most = f"at most {max(fits)}" if fits else "no overlap fits; use a larger tile"
        raise EmtileError(f"overlap={asked[ax]} is too large for tile {grid.in_tile[g]} "
                          f"(output {out}) with blend={blend!r}: tiles would overlap by {ov} px "
                          f"(the stride is a multiple of {align}) and each {blend} ramp must "
                          f"fit in half the output; {most}")


def _efficiency(grid, n_tile_runs):
    return math.prod(grid.region_shape) / (n_tile_runs * math.prod(grid.in_tile))


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class PredictJob:
    """Everything a process needs to predict blocks of a plan: picklable, no arrays, no model.

    ``input``, ``output`` and ``model`` are paths, or ``"memory:<token>"`` for an object that the
    driver registered in its own process (an array, an in-memory output, a model it was given):
    such a job runs only there. ``weights`` is :func:`weights_hash` of the model: a worker that
    loads the model folder checks it, so a folder changed during a run cannot mix two models.
    """

    input: object  # a path, "memory:<token>" or a URL's Location (its storage options)
    output: object  # the same
    model: str
    weights: str
    depth: int  # the model's shape map (the grid is recomputed from these, pure arithmetic)
    model_ndim: int
    channels: int  # output channels
    volume_shape: tuple
    region: tuple
    tile: tuple  # input tile along the model axes
    overlap: tuple
    blend: str
    chunks: tuple
    max_block_px: int
    dtype: str
    threshold: object  # float or None
    tta: bool
    amp: object  # None, "bf16" or "fp16"
    batch_size: int
    channels_last: bool
    compile: bool
    device: str
    threads: int  # torch intra-op threads (0: leave the process's setting)
    levels: int = 1  # resolution levels written (each halves y and x)
    normalize: tuple = Scaling("dtype")  # emtile.normalize.Scaling: raw pixels -> model input
    factors: tuple = None  # the model's max-pool factors per level (None: 2 along every axis)
    kernels: tuple = None  # its kernel sizes per level (None: from the factors)
    shards: tuple = None  # level-0 shard shape of every array (None: unsharded); see
    #                       emtile.prediction_store.resolve_shards
    offsets: tuple = None  # an affinity model's offsets, one per channel (None: boundaries)
    tta_perms: tuple = None  # an affinity model's tta: ((axis permutation, channel order), ...)

    @property
    def affinities(self):
        """``{"target": "affinities", "offsets": [[dz, dy, dx], ...]}``, or {} (boundaries)."""
        if self.offsets is None:
            return {}
        return {"target": "affinities", "offsets": [list(o) for o in self.offsets]}

    def grid(self):
        shape_map = geometry.ShapeMap(self.depth, self.model_ndim, factors=self.factors,
                                      kernels=self.kernels)
        return geometry.tile_grid(self.volume_shape, shape_map, self.tile, roi=self.region,
                                  overlap=self.overlap)

    def plan(self):
        return geometry.block_plan(self.grid(), self.chunks, max_block_px=self.max_block_px)

    def describe(self, i, plan=None):
        """Block ``i`` and its voxel range, for messages."""
        start, stop = (plan or self.plan()).box(i)
        names = "zyx"[-len(start):] if len(start) <= 3 else None
        parts = [f"{names[ax] if names else ax} {a}:{b}" for ax, (a, b) in enumerate(zip(start, stop))]
        return ", ".join(parts)


# Objects registered by a driver in this process, by token: arrays, outputs, prepared models.
_MEMORY = {}
# Per-process cache of what run_blocks opened, by job (a worker runs many tasks of one job).
_CONTEXTS = collections.OrderedDict()
_MODELS = {}  # (model path, weights, device, channels_last, compile) -> prepared model
_KEEP_CONTEXTS = 2


def _token():
    return MEMORY + uuid.uuid4().hex


def _register(obj):
    """Lend ``obj`` to jobs run in this process; returns its ``"memory:..."`` token."""
    token = _token()
    _MEMORY[token] = obj
    return token


class _Context:
    """What a process needs to run blocks of one job, opened once."""

    def __init__(self, job):
        import torch

        self.job = job
        keep_large_allocations()  # no page faults for every pass over large tiles
        if job.threads and job.device.startswith("cpu") and torch.get_num_threads() != job.threads:
            torch.set_num_threads(job.threads)
        self.grid = job.grid()
        self.plan = job.plan()
        self.array = self._input()
        self.net, self.fn = self._model()
        self.device = torch.device(job.device)
        self.forward = _Forward(self.fn, self.device, job.amp, job.channels_last, job.tta,
                                perms=job.tta_perms)
        self.stitcher = _Stitcher(self.grid, job.channels, job.blend,
                                  direct=job.dtype == "uint8" and job.threshold is None
                                  and job.levels == 1)
        self.batches = Batches(self.grid, job.model_ndim, job.normalize, job.device)
        self.probs = self.mask = self.markers = self.memory_out = None
        if _in_memory(job.output):
            self.memory_out = _MEMORY[job.output]
        else:
            import zarr

            from emtile.store import zarr_target

            group = zarr.open_group(zarr_target(job.output, "r+"), mode="r+", zarr_format=3)
            self.probs = [group[str(k)] for k in range(job.levels)]
            self.mask = ([group[f"labels/mask/{k}"] for k in range(job.levels)]
                         if job.threshold is not None else None)
            self.markers = group[MARKERS]

    def _input(self):
        job = self.job
        if _in_memory(job.input):
            return _MEMORY[job.input]
        from emtile.volume import open_volume

        return open_volume(job.input)

    def _model(self):
        job = self.job
        if job.model.startswith(MEMORY):
            return _MEMORY[job.model]
        key = (job.model, job.weights, job.device, job.channels_last, job.compile)
        if key not in _MODELS:
            from emtile.model import load_model

            net = load_model(job.model)
            if weights_hash(net) != job.weights:
                raise EmtileError(f"the model folder {job.model!r} changed since this run "
                                  f"started (its weights differ from the driver's); start the "
                                  f"run again")
            fn = _prepare(net, job.device, job.channels_last, job.compile)
            _MODELS.clear()  # one model per process: a worker serves one run at a time
            _MODELS[key] = (net, fn)
        return _MODELS[key]

    def done(self, ids):
        """Which of ``ids`` are already recorded (a retried or duplicated task skips them).

        Reads only the span of markers the ids cover. The driver may be rewriting a marker chunk
        at this moment: a read that fails counts as "not done" (the block is computed again,
        giving the same bytes)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.markers is None or not ids.size:
            return np.zeros(len(ids), bool)
        lo, hi = int(ids.min()), int(ids.max()) + 1
        try:
            flags = np.asarray(self.markers[lo:hi])
        except Exception:  # a torn read of a chunk being rewritten
            return np.zeros(len(ids), bool)
        return flags[ids - lo] != 0

    def write(self, block, values):
        """Write a block's ``[(probabilities, mask or None)]``, one pair per level."""
        region = self.job.region
        if self.memory_out is not None:
            self.memory_out[(slice(None),) + block.slices(region)] = values[0][0]
            return
        from emtile.store import write_errors

        lead = (slice(None),) if self.job.channels > 1 else ()
        with write_errors(self.job.output, then=_RESUME):
            for k, (p, m) in enumerate(values):
                sl = lead + _level_slices(block, region, k)
                self.probs[k][sl] = p if self.job.channels > 1 else p[0]
                if self.mask is not None:
                    self.mask[k][sl] = m if self.job.channels > 1 else m[0]


def _level_slices(block, region, level):
    """``block``'s slices in pyramid level ``level`` of an output covering ``region``: y and x
    halved per level (a block starts on a multiple of ``2**level`` there)."""
    out = []
    for ax, (a, b, (r0, _)) in enumerate(zip(block.start, block.stop, region)):
        f = 2**level if ax >= len(region) - 2 else 1
        out.append(slice((a - r0) // f, -(-(b - r0) // f)))
    return tuple(out)


def _context(job):
    ctx = _CONTEXTS.get(job)
    if ctx is None:
        ctx = _CONTEXTS[job] = _Context(job)
        while len(_CONTEXTS) > _KEEP_CONTEXTS:
            _CONTEXTS.popitem(last=False)
    _CONTEXTS.move_to_end(job)
    return ctx


def _forget(job):
    """Drop what this process holds for ``job`` and the objects its driver registered."""
    _CONTEXTS.pop(job, None)
    for token in (job.input, job.output, job.model):
        _MEMORY.pop(token, None)


# --------------------------------------------------------------------------- the model


_TTA_2D = [(flips, transpose) for flips in ((), (-1,), (-2,), (-2, -1)) for transpose in (False, True)]


def _prepare(net, device, channels_last, compile):
    """``net`` in eval mode on ``device`` (channels_last); returns what to call (compiled or
    not)."""
    import torch

    net.eval().to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last if net.ndim == 2 else torch.channels_last_3d)
    if not compile:
        return net
    # freezing: weights folded in as constants (inference only); applied at the first call
    return torch.compile(net, dynamic=False, options={"freezing": True})


@contextlib.contextmanager
def _prepared(net, device, channels_last, compile):
    """:func:`_prepare` ``net``, and restore its device, mode and memory format afterwards."""
    import torch

    was_training = net.training
    old = next(net.parameters()).device
    try:
        yield _prepare(net, device, channels_last, compile)
    finally:
        if channels_last:
            net.to(memory_format=torch.contiguous_format)
        net.to(old).train(was_training)


class _Forward:
    """Run the model on a batch of input tiles, return sigmoid probabilities as NumPy (B, C, *O)."""

    def __init__(self, fn, device, amp, channels_last, tta, perms=None):
        import torch

        self.torch, self.fn, self.device, self.tta, self.amp = torch, fn, device, tta, amp
        # affinities: tta by axis permutations (affinities.tta_permutations), with each one's
        # inverse (to put the output's axes back) and channel order
        self.perms = [(p, [p.index(a) for a in range(len(p))], list(o))
                      for p, o in perms] if perms else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.memory_format_3d = (torch.channels_last_3d if channels_last
                                 else torch.contiguous_format)

    def _run(self, x):
        x = x.contiguous(memory_format=self.memory_format if x.ndim == 4
                         else self.memory_format_3d)
        with autocast(self.device, self.amp):
            return self.torch.sigmoid(self.fn(x).float())

    def __call__(self, x):
        torch = self.torch
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if not self.tta:
                p = self._run(x)
            elif self.perms:  # affinities: exchange axes, rename the offsets back
                p = 0
                for perm, inverse, order in self.perms:
                    y = self._run(x.permute(0, 1, *(2 + a for a in perm)))
                    p = p + y.permute(0, 1, *(2 + a for a in inverse))[:, order]
                p = p / len(self.perms)
            else:
                square = x.shape[-1] == x.shape[-2]
                transforms = [t for t in _TTA_2D if square or not t[1]]
                p = 0
                for flips, transpose in transforms:
                    xt = x.flip(flips) if flips else x
                    xt = xt.transpose(-1, -2) if transpose else xt
                    y = self._run(xt)
                    y = y.transpose(-1, -2) if transpose else y
                    p = p + (y.flip(flips) if flips else y)
                p = p / len(transforms)
            return p.to("cpu").contiguous().numpy()


# --------------------------------------------------------------------------- stitching


class _Stitcher:
    """Block buffers: accumulate output tiles of one block, hand the finished block on.

    Every tile is added whole (no cropped copies): :func:`emtile.stitch.accumulate` clips it to
    the block buffer. Blending grids weight the whole output window (clipped to the block, that
    is the tile's own window). Owned grids (no blending) weight a tile 1 on its own window and 0
    on the pixels its neighbour owns (``0 * p`` adds exactly nothing), one window per combination
    of "last along this axis", where a tile owns its whole output. With ``direct`` (an owned grid
    stored as uint8 at one level) the block buffer is the uint8 block itself and each tile is
    quantised into it (:func:`emtile.stitch.place_owned`, the bytes of the two steps).
    """

    def __init__(self, grid, channels, blend, direct=False):
        from emtile import stitch

        self.stitch, self.grid, self.channels = stitch, grid, channels
        # owned grids stored as uint8 at one level: each tile quantised straight into the block
        self.direct = direct and grid.owned
        if not grid.owned:
            w = (np.ones(grid.out_tile, np.float32) if blend == "none" else
                 stitch.weight_window(grid.out_tile, blend=blend, overlap=grid.overlap))
            self.weights = {None: w}
        else:
            self.weights = {}
            for last in np.ndindex((2,) * grid.ndim):
                w = np.ones(grid.out_tile, np.float32)
                for ax, is_last in enumerate(last):
                    if not is_last:
                        w[(slice(None),) * ax + (slice(grid.stride[ax], None),)] = 0
                self.weights[last] = w

    def new(self, block):
        if self.direct:  # the uint8 block and its flags of NaN under weight 0
            return (np.zeros((self.channels,) + block.shape, np.uint8),
                    np.zeros((self.channels,) + block.shape, np.uint8))
        return (np.zeros((self.channels,) + block.shape, np.float32),
                np.zeros(block.shape, np.float32))

    def add(self, buffers, block, idx, tile):
        """``tile`` (C, *O model axes): add it where it contributes inside ``block``."""
        acc, wsum = buffers
        grid = self.grid
        tile = tile.reshape((self.channels,) + grid.out_tile)  # a view
        start, _ = grid.out_window(idx)
        if self.direct:
            owned = tuple(o if k == n - 1 else s for k, n, o, s
                          in zip(idx, grid.counts, grid.out_tile, grid.stride))
            origin = tuple(a - b for a, b in zip(start, block.start))
            self.stitch.place_owned(acc, wsum, tile, origin, owned)
            return
        if grid.owned:
            weight = self.weights[tuple(int(k == n - 1) for k, n in zip(idx, grid.counts))]
        else:
            weight = self.weights[None]
        origin = tuple(a - b for a, b in zip(start, block.start))
        self.stitch.accumulate(acc, wsum, tile, weight, origin)


def _block_values(stitch, acc, wsum, dtype, threshold, levels=1):
    """Normalised block -> ``[(probabilities in dtype, mask or None)]``, one pair per pyramid
    level, each (C, *S_k). Level k+1 is the 2×2 mean of level k's float probabilities (then
    stored as ``dtype``, exactly as level 0) and the 2×2 top-left sample of its mask."""
    from emtile.store import downsample

    if acc.dtype == np.uint8:  # quantised tile by tile (_Stitcher.direct)
        return [(stitch.finish_owned(acc, wsum), None)]
    if threshold is None and levels == 1:
        return [(stitch.normalize(acc, wsum, dtype=np.dtype(dtype)), None)]
    f = stitch.normalize(acc, wsum, dtype=np.float32)
    # the one rule: interior where p > T
    mask = (f > np.float32(threshold)).astype(np.uint8) if threshold is not None else None
    out = [(f if dtype == "float32" else stitch.normalize(acc, wsum, dtype=np.dtype(dtype)),
            mask)]
    for _ in range(1, levels):
        f = downsample(f, labels=False)
        mask = downsample(mask, labels=True) if mask is not None else None
        ones = np.ones(f.shape[1:], np.float32)  # dividing by 1: the same rounding as level 0
        out.append((f if dtype == "float32" else stitch.normalize(f, ones, dtype=np.dtype(dtype)),
                    mask))
    return out


def _single_numba_thread():
    """Run this thread's Numba kernels on this thread only; return the previous setting.

    The stitching kernels are ``parallel=True``. Per tile (main thread, between forward passes)
    and per block (writer thread, while torch computes), their OpenMP threads only wake and
    spin-wait on cores torch is using: measured 3-4x slower on 2 cores. Numba's thread count is
    thread-local, so this changes nothing for other callers of the kernels.
    """
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    return previous


def _cores_saturated(device):
    """Whether torch's CPU threads already use every core this process may run on.

    Then a reader thread has no core to itself: each read preempts a torch thread in the middle
    of a parallel operation (and takes the GIL between operations), so the model waits for it
    anyway, and more than the read itself (``examples/bench_predict_overlap.py`` measures it).
    Reading between forward passes costs only the read."""
    import torch

    if device.type != "cpu":
        return False
    return torch.get_num_threads() >= usable_cores()


# --------------------------------------------------------------------------- a block's work


def run_blocks(job, block_ids, *, readers=0, on_block=None, on_tiles=None):
    """Predict blocks ``block_ids`` of ``job``: read, run, stitch, write their chunks.

    The one function behind every run: :func:`predict` calls it over the plan in its own process,
    and a Dask worker calls it for the blocks of one task (see :mod:`emtile.distributed`). It
    opens the input, the output and the model once per process (cached), skips blocks already
    recorded as done, and reports a block only after all its chunks are written.

    Parameters
    ----------
    job : PredictJob
    block_ids : sequence of int
    readers : int
        DataLoader worker processes reading tiles; 0 reads them in this process: in a reader
        thread, or between forward passes when torch's CPU threads use every core this process
        may run on (a reader thread would only preempt them). Dask workers are daemon processes
        and cannot start DataLoader workers.
    on_block : callable, optional
        ``on_block(report)``, from the writer thread, once a block's chunks are written.
    on_tiles : callable, optional
        ``on_tiles(n)`` after every batch (a progress bar).

    Returns
    -------
    list of BlockReport
        One per block id, in order.
    """
    import numba
    import torch

    ctx = _context(job)
    ids = [int(i) for i in block_ids]
    done = ctx.done(ids)
    reports = {i: BlockReport(i, skipped=True, pid=os.getpid()) for i, d in zip(ids, done) if d}
    todo = [i for i, d in zip(ids, done) if not d]
    if not todo:
        return [reports[i] for i in ids]
    tile_bytes = 4 * math.prod(ctx.grid.in_tile)
    group = max(1, GROUP_BYTES // (tile_bytes * job.batch_size)) * job.batch_size
    dataset = tiles_dataset(ctx.array, None if _in_memory(job.input) else job.input,
                            ctx.plan, todo, group)
    if readers:
        ctx.stitcher.stitch.load_kernels()  # before any reader exists (see load_kernels)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=readers, pin_memory=ctx.device.type == "cuda",
            prefetch_factor=2)
        batches = iter(loader)  # workers fork here, before the writer thread exists
    elif _cores_saturated(ctx.device):
        batches = iter(dataset)  # read between forward passes: no core is free to overlap
    else:
        batches = _read_ahead(iter(dataset))

    def finish(block, acc, wsum, read_s, compute_s, model_s):
        t0 = time.perf_counter()
        values = _block_values(ctx.stitcher.stitch, acc, wsum, job.dtype, job.threshold,
                               job.levels)
        ctx.write(block, values)
        report = BlockReport(block.index, len(block.tiles), math.prod(block.shape), read_s,
                             compute_s, time.perf_counter() - t0, False, os.getpid(), model_s)
        _faults.point("predict.block_written")  # test-only: chunks written, not yet reported
        reports[block.index] = report
        if on_block is not None:
            on_block(report)

    writer = WriterThread(finish, initializer=_single_numba_thread)
    current = buffers = None
    numba_threads = _single_numba_thread()
    try:
        for block_index, first, window, origins, read_s in batches:
            t0 = time.perf_counter()
            if current is None or current.index != block_index:
                current = ctx.plan[block_index]
                buffers, done_tiles = ctx.stitcher.new(current), 0
                reading = computing = modelling = 0.0
            for b0, x in ctx.batches(window, origins, job.batch_size):
                t1 = time.perf_counter()
                probs = ctx.forward(x)
                modelling += time.perf_counter() - t1
                for i, p in enumerate(probs):
                    ctx.stitcher.add(buffers, current, current.tiles[first + b0 + i], p)
                if on_tiles is not None:
                    on_tiles(len(probs))
            done_tiles += len(origins)
            reading += read_s
            computing += time.perf_counter() - t0
            if done_tiles == len(current.tiles):
                writer.put(current, *buffers, reading, computing, modelling)
                buffers = None
    except BaseException as exc:
        writer.abort()
        if readers and isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker"):
            why = str(exc).strip().rstrip(".")
            raise EmtileError(f"a process reading tiles of the input died ({why}: killed, or out "
                              f"of memory?); the blocks recorded so far are kept: run the same "
                              f"command again to resume") from None
        raise
    finally:
        numba.set_num_threads(numba_threads)
    writer.close()
    return [reports[i] for i in ids]


# --------------------------------------------------------------------------- the stage


def _fingerprint(job, array):
    """Everything that determines the output bytes; a resumed run must match it exactly.

    Only for path inputs (an in-memory array is never resumed): its resolved path and
    :func:`emtile.markers.content_token` (sizes and times of every file it reads, so chunks
    rewritten in place are noticed); the model's config and a hash of its weights; the grid,
    chunks and blocks; every option that changes the arithmetic (device type, batch size, memory
    format, compile, AMP, torch version, and on the CPU the torch thread count: torch's CPU
    kernels can round differently with another number of threads).
    """
    import torch

    from emtile.markers import content_token

    grid, plan = job.grid(), job.plan()
    device = job.device.split(":")[0]
    return {
        "input": _resolved(job.input), "input_token": content_token(job.input),
        "input_shape": list(grid.volume_shape), "input_dtype": str(np.dtype(array.dtype)),
        "region": [list(r) for r in grid.region], "tile": list(grid.in_tile),
        "stride": list(grid.stride), "owned": grid.owned, "chunks": list(plan.chunks),
        "block": list(plan.block_shape), "blocks": len(plan), "blend": job.blend,
        "tta": bool(job.tta), "amp": job.amp, "dtype": job.dtype, "threshold": job.threshold,
        "weights_sha256": job.weights, "device": device, "batch_size": job.batch_size,
        "channels_last": bool(job.channels_last), "compile": bool(job.compile),
        "threads": job.threads if device == "cpu" else None, "torch": torch.__version__,
        "levels": job.levels,
        "normalize": list(job.normalize),
        "shards": None if job.shards is None else list(job.shards),
        **({"offsets": job.affinities["offsets"]} if job.affinities else {}),
    }


#: Settings that change no byte and are left out of an output's record: which process reads.
_UNRECORDED = ("num_workers",)


def _provenance(job, settings):
    """What made the output, for ``emtile info``: model, input, region, options, mask, and the
    settings as given (less :data:`_UNRECORDED`)."""
    from emtile import __version__

    return {"model": job.model or "(a model in memory)", "input": str(job.input or "(an array)"),
            "region": [list(r) for r in job.region], "tile": list(job.tile),
            "overlap": list(job.overlap), "blend": job.blend, "tta": bool(job.tta),
            "amp": job.amp or "off", "dtype": job.dtype, "threshold": job.threshold,
            "mask": "labels/mask" if job.threshold is not None else None,
            "normalization": list(job.normalize), "device": job.device,
            "model_ndim": job.model_ndim,
            **({**job.affinities, "mask_note": NO_MASK_NOTE} if job.affinities else {}),
            "settings": {k: v for k, v in settings.to_json().items() if k not in _UNRECORDED},
            "emtile": __version__}


def _create_output(job, path, settings):
    """The output store: probabilities (every level) and, with a threshold, the mask."""
    from emtile import store

    output = job.output
    region_shape = tuple(b - a for a, b in job.region)
    c = job.channels
    shape = ((c,) if c > 1 else ()) + region_shape
    # one channel per chunk: a reader of some channels (segment reads the three nearest
    # neighbours of nine) fetches and decodes only those
    chunks = ((1,) if c > 1 else ()) + job.chunks
    axes = ("c" if c > 1 else "") + ("zyx" if len(region_shape) == 3 else "yx")
    shards = None if job.shards is None else ((c,) if c > 1 else ()) + job.shards
    voxel = store.voxel_size(path, len(region_shape))
    offset = [a for a, _ in job.region]
    aff = job.affinities
    group = store.create_image(output, shape, np.dtype(job.dtype), chunks=chunks,
                               levels=job.levels, halve_chunks=True, voxel_size=voxel, axes=axes,
                               name="probabilities", kind="probabilities", shards=shards,
                               channel_names=channel_names(aff["offsets"]) if aff else None,
                               attrs={**aff, "provenance": _provenance(job, settings),
                                      **store.inherited_voxel_attrs(path, "input")})
    store.set_translation(group, offset)
    if job.threshold is not None:
        store.create_label_image(_child(output, "labels/mask"), shape, np.uint8, chunks=chunks,
                                 levels=job.levels, voxel_size=voxel, axes=axes, name="mask",
                                 source="../../", starts=offset, register=True, shards=shards,
                                 attrs={"threshold": job.threshold})
    return group


def _has_arrays(threshold, group):
    """A resumable store holds its probabilities and, with a threshold, its mask."""
    try:
        group["0"]
        if threshold is not None:
            group["labels/mask/0"]
    except (KeyError, FileNotFoundError, ValueError, OSError):
        return False
    return True


def _finish(output, threshold, group):
    if threshold is not None:
        from emtile import store

        store.mark_complete(_open_group(_child(output, "labels/mask")))
    return {}


class _Seconds:
    """Keeps the compute + write seconds of each block (for the median reported) and its
    forward passes' seconds (summed in the result); full after
    ``every`` blocks, so the markers are written as often as the pass asks."""

    def __init__(self, seconds, every, model_seconds):
        self.seconds, self.model_seconds, self.every, self.n = seconds, model_seconds, every, 0

    def add(self, i, report):
        self.n += 1
        if not report.skipped:
            self.seconds.append(report.compute_s + report.write_s)
            self.model_seconds.append(report.model_s)

    def full(self):
        return self.n >= self.every

    def flush(self):
        self.n = 0


def _setup(model, input, settings, probe=None):
    """Check the input against the settings; return ``(net, array, input path or None, grid,
    chunks, device, num_workers)``. ``probe``: a dict to fill with the seconds per tile
    :func:`_probe_tiles` measured when ``tile="auto"`` (None: choose by computed pixels alone)."""
    s = settings
    net = _as_model(model).net
    arr, path = open_input(input)
    dev = resolve_device(s.device, net)
    num_workers = s.num_workers
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if dev.type == "cuda" else 0
    if probe is not None:
        probe = functools.partial(_probe_tiles, net=net, device=dev, amp=resolve_amp(s.amp, dev),
                                  batch_size=s.batch_size, channels_last=s.channels_last,
                                  record=probe)
    grid, chunks = _plan(net, arr, tile=s.tile, overlap=s.overlap, roi=s.roi, blend=s.blend,
                         max_tile_memory=s.max_tile_memory, batch_size=s.batch_size,
                         max_block_px=s.max_block_px, chunk_size=s.chunk_size, probe=probe)
    return net, arr, path, grid, chunks, dev, num_workers


#: ``tile="auto"`` times the model on the candidate sizes only for runs of at least this many
#: tiles (of the size computing the fewest pixels): a probe costs a few tiles' time.
PROBE_MIN_TILES = 64
PROBE_SPREAD = 1.3  # candidates: sizes computing at most this many times the fewest pixels
PROBE_CANDIDATES = 4


def _probe_tiles(costs, *, net, device, amp, batch_size, channels_last, record):
    """The tile size whose run is fastest by measurement: ``n_tiles * seconds per tile``.

    Computed pixels alone are not the cost: per pixel, large tiles can run slower (bigger
    activations, page faults, cache misses) or faster (less overhead per pass) than small ones,
    depending on the machine. So when the run is long enough (``PROBE_MIN_TILES``), the model is
    timed on up to ``PROBE_CANDIDATES`` sizes within ``PROBE_SPREAD`` of the fewest pixels (one
    warm-up pass and one timed pass each, random input, the run's device, precision and memory
    format) and the fastest total wins. ``record`` receives ``{tile: seconds per tile}``.
    """
    import torch

    best_tile, n_tiles, pixels = costs[0]
    candidates = [c for c in costs if c[2] <= PROBE_SPREAD * pixels][:PROBE_CANDIDATES]
    if n_tiles < PROBE_MIN_TILES or len(candidates) < 2:
        return best_tile
    with _prepared(net, device, channels_last, False) as fn:
        forward = _Forward(fn, device, amp, channels_last, tta=False)
        for t, _, _ in candidates:
            x = torch.rand((batch_size, 1) + geometry.per_axis(t, net.ndim, "tile"))
            forward(x)  # warm-up: allocations, kernels chosen for this size
            t0 = time.perf_counter()
            forward(x)
            record[t] = (time.perf_counter() - t0) / batch_size
    return min(candidates, key=lambda c: (c[1] * record[c[0]], c[0]))[0]


def _job(net, grid, chunks, settings, *, input, output, model, weights, amp, device, threads,
         normalize):
    k, s = net.ndim, settings
    return PredictJob(
        input=input, output=output, model=model, weights=weights, depth=net.depth, model_ndim=k,
        factors=net.shape_map.factors, kernels=net.shape_map.kernels,
        channels=net.out_channels, volume_shape=grid.volume_shape, region=grid.region,
        tile=grid.in_tile[grid.ndim - k:],
        overlap=tuple(geometry.per_axis(s.overlap, k, "overlap")), blend=s.blend, chunks=chunks,
        max_block_px=int(s.max_block_px), dtype=s.dtype, threshold=s.threshold, tta=bool(s.tta),
        amp=amp, batch_size=s.batch_size, channels_last=bool(s.channels_last),
        compile=bool(s.compile), device=str(device), threads=int(threads), levels=s.levels,
        normalize=Scaling(*normalize))


def _scaling(model, arr, path, normalize):
    """The :class:`~emtile.normalize.Scaling` of this input for the loaded ``model``; warns (one
    line each) when the input is far from the model's training data
    (:func:`emtile.normalize.for_prediction`)."""
    from emtile.normalize import InputWarning, for_prediction

    scaling, notes = for_prediction(model, arr, path=path, rule=normalize,
                                    model_ndim=model.ndim)
    for note in notes:
        warnings.warn(note, InputWarning, stacklevel=3)
    return scaling


@contextlib.contextmanager
def _torch_threads(n):
    """Run with ``n`` torch threads in this process, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _tta_perms(model, net, grid, offsets):
    """An affinity model's test-time augmentation: the axis permutations among axes alike in
    tile size, pooling, kernels and (when the model records it) voxel size; refused when there
    is none but the identity (a flip would shift every offset's pairs: see
    :func:`emtile.affinities.tta_permutations`)."""
    from emtile.affinities import tta_permutations

    sm = net.shape_map
    tile = tuple(grid.in_tile)[-net.ndim:]
    voxel = tuple(model.voxel_size)[-net.ndim:] if model.voxel_size else (None,) * net.ndim
    axes = [(tile[a], tuple(f[a] for f in sm.factors), tuple(k[a] for k in sm.kernels),
             voxel[a]) for a in range(net.ndim)]
    perms = tta_permutations(offsets, axes)
    if len(perms) < 2:
        names = "zyx"[-net.ndim:]
        raise EmtileError(
            f"tta=True with this affinity model and tile {'x'.join(map(str, tile))} has nothing "
            f"to average: its test-time augmentation exchanges axes of equal tile size, pooling, "
            f"kernels and voxel size ({', '.join(f'{n}: {t}' for n, t in zip(names, tile))}), "
            f"and a flip would shift the affinities; give a tile of equal sizes along such axes, "
            f"or leave tta out")
    return tuple(perms)


def _offsets(record):
    """An affinity record's offsets as a tuple of tuples (a job is hashable), or None."""
    return tuple(tuple(o) for o in record["offsets"]) if record else None


def predict_stage(model, input, output, settings, runner, *, overwrite=False):
    """The :class:`emtile.blockwise.Stage` of a prediction, checked and planned, and what
    :func:`predict` reports: ``(stage, info)``."""
    from emtile import store
    from emtile.blockwise import Pass, Stage

    s = settings
    output = output if isinstance(output, Location) and not output.is_local else str(output)
    model = _as_model(model)
    if runner.distributed:
        if not model.source:
            raise EmtileError("a cluster run needs the model as a model folder (workers load it "
                              "themselves): save it with emtile.save_model and pass its path")
        if not isinstance(input, (str, os.PathLike, Location)):
            raise EmtileError("a cluster run needs the input as a path (workers open it "
                              "themselves), not an array")
    tile = default_tile(s.tile, model.ndim)
    if tile == "auto" and not overwrite:
        # the interrupted run's choice, not a new probe
        tile = _resumed_tile(output, model.ndim) or tile
    probe = {}
    net, arr, path, grid, chunks, dev, num_workers = _setup(
        model, input, replace(s, tile=tile), probe=probe)
    store.check_output(output, inputs=[path] if path is not None else [])
    geometry.check_levels(s.levels, grid.region_shape[-2:], chunks[-2:])
    scaling = _scaling(model, arr, path, s.normalize)
    threads = _default_threads(s.threads, dev, runner)
    job = _job(net, grid, chunks, s, input=path or "", output=output,
               model=model.source, weights=model.weights_sha256, amp=resolve_amp(s.amp, dev), device=dev,
               threads=threads, normalize=scaling)
    plan = job.plan()
    offsets = _offsets(affinity_record(model, net.out_channels, s.threshold))
    job = replace(job, shards=resolve_shards(s.shards, plan), offsets=offsets,
                  tta_perms=_tta_perms(model, net, grid, offsets) if s.tta and offsets else None)
    seconds, model_seconds = [], []
    every = 64 if runner.distributed else 1  # here, every block's marker is written at once
    one = Pass(name="predict", fn=run_blocks, job=job, plan=plan,
               describe=functools.partial(job.describe, plan=plan), point="predict.block_recorded",
               keep=lambda group: _Seconds(seconds, every, model_seconds),
               here=functools.partial(_run_here, job, net, arr, readers=num_workers),
               gpu=job.device.startswith("cuda"), flush_blocks=every, flush_seconds=0.5)
    stage = Stage(name="predict", output=output, inputs=(path,),
                  fingerprint=None if path is None else _fingerprint(job, arr),
                  create=functools.partial(_create_output, job, path, s), passes=(one,),
                  resumable=functools.partial(_has_arrays, job.threshold),
                  finish=functools.partial(_finish, output, job.threshold))
    info = {"grid": grid, "plan": plan, "device": dev, "threads": threads, "probe": probe,
            "seconds": seconds, "model_seconds": model_seconds}
    return stage, info


def predict(model, input, output, settings=None, runner=None, *, overwrite=False, progress=True,
            storage_options=None, **overrides):
    """Predict a volume tile by tile into an OME-Zarr store of probabilities (and a mask).

    Parameters
    ----------
    model : UNet, emtile.model.Model or path
        A model, one loaded by :func:`emtile.model.load`, or what it loads: a model folder
        written by :func:`emtile.save_model`, a training run folder or a bioimage.io package (a
        cluster needs a model loaded from a path: workers load it themselves).
    input : path or array-like, shape (Z, Y, X) or (Y, X)
        Anything :func:`emtile.open_volume` opens, or an array (this process only). A 2-D model
        runs slice by slice.
    output : path
        The new store. Probabilities at ``"0"``, shape the region's (``(C, ...)`` for ``C > 1``
        output channels); the mask at ``labels/mask``.
    settings : PredictSettings, optional
        Tile size, precision, storage and every other choice (:class:`emtile.settings.
        PredictSettings`; its defaults when None).
    runner : emtile.blockwise.Runner, optional
        Where the blocks run: here (None), or on a Dask cluster.
    overwrite : bool
        Replace an existing output, and never resume an interrupted one (without it, an
        interrupted run's output is resumed when everything matches, else replaced).
    progress : bool
        Show a progress bar (tiles/s here; blocks and voxels/s on a cluster).
    storage_options : dict, optional
        Options of the object stores (``s3://``, ``gs://``, ``https://``) that ``input`` and
        ``output`` name (:func:`emtile.locations.parse_storage_options`); the endpoint and
        credentials also come from the environment.
    **overrides
        Fields of the settings or the runner by name (``tile=388``, ``threshold=0.5``,
        ``cluster="local"``, ``client=client``).

    Returns
    -------
    PredictResult
    """
    from emtile.blockwise import Runner, run_stage
    from emtile.settings import PredictSettings, split_overrides

    t0 = time.perf_counter()
    settings, runner = split_overrides(PredictSettings, settings, overrides, Runner, runner)
    input, output = at(input, storage_options), at(output, storage_options)
    stage, info = predict_stage(model, input, output, settings, runner, overwrite=overwrite)
    done = run_stage(stage, runner, overwrite=overwrite, progress=progress)
    grid, plan, seconds = info["grid"], info["plan"], info["seconds"]
    n_runs = plan.n_tile_runs
    threshold = settings.threshold
    return PredictResult(
        output=str(output), shape=tuple(done.group["0"].shape), dtype=settings.dtype,
        tile=grid.in_tile, out_tile=grid.out_tile, stride=grid.stride, tiles=n_runs,
        blocks=len(plan), blocks_resumed=done.blocks_done[0],
        efficiency=_efficiency(grid, n_runs), seconds=time.perf_counter() - t0,
        device=str(info["device"]), threads=info["threads"], cluster=done.where,
        block_seconds=float(np.median(seconds)) if seconds else 0.0,
        model_seconds=float(sum(info["model_seconds"])), tile_probe=info["probe"],
        mask=f"{output}/labels/mask" if threshold is not None else "", threshold=threshold,
        offsets=stage.passes[0].job.affinities.get("offsets"))


def _resumed_tile(output, ndim):
    """The tile an interrupted prediction into ``output`` chose, or None: ``tile="auto"`` must
    choose it again for the run to resume (its choice by measurement could differ)."""
    from emtile import store
    from emtile.blockwise import fingerprint_of

    if not store.is_zarr_store(output):
        return None
    meta = store.emtile_attrs(output) or {}
    tile = (fingerprint_of(meta, "predict") or {}).get("tile")
    if meta.get("complete") or not tile or len(tile) < ndim:
        return None
    return tuple(int(t) for t in tile[-ndim:])


def _default_threads(threads, dev, runner):
    """Torch threads per process: as given; else this process's count here, and what the
    runner says on a cluster (cores / workers on a local one, else 1); 0 (left alone) on a
    GPU."""
    import torch

    if dev.type != "cpu":
        return 0  # the GPU does the arithmetic
    if threads is not None:
        return threads
    return runner.threads() or torch.get_num_threads()


def _run_here(job, net, arr, ids, record, progress, *, readers):
    """The blocks ``ids`` in this process, the driver lending its array and model to the job;
    ``record(i, report)`` as each block's chunks are written."""
    from tqdm.auto import tqdm

    plan = job.plan()
    total = sum(plan.n_tiles(int(i)) for i in ids)
    bar = tqdm(total=total, unit="tile", desc="predict", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    local = replace(job, input=job.input or _register(arr), model=_token())
    try:
        with _prepared(net, job.device, job.channels_last, job.compile) as fn, \
                _torch_threads(job.threads):
            _MEMORY[local.model] = (net, fn)
            run_blocks(local, ids, readers=readers,
                       on_block=lambda report: record(report.index, report),
                       on_tiles=bar.update)
    finally:
        bar.close()
        _forget(local)


def _open_group(path):
    import zarr

    from emtile.store import zarr_target

    return zarr.open_group(zarr_target(path, "r+"), mode="r+", zarr_format=3)


def _in_memory(where):
    """Whether a job's input or output is an object the driver registered (``memory:...``)."""
    return isinstance(where, str) and where.startswith(MEMORY)


def _resolved(where):
    """An input as the fingerprint names it: a local path resolved, a URL normalised."""
    return where.url if isinstance(where, Location) else str(Path(where).resolve())


def _child(output, name):
    """``name`` inside the store ``output`` (a local path or a URL's Location)."""
    return Location(output) / name if isinstance(output, Location) else f"{output}/{name}"


def predict_array(model, array, settings=None, *, progress=False, **overrides):
    """Predict an in-memory array with the same tiling and stitching as :func:`predict`.

    ``settings`` and ``overrides`` are as in :func:`predict`, with float32 storage and no reader
    processes by default; training's validation passes ``normalize=``, the
    :class:`~emtile.normalize.Scaling` resolved on the training volume.

    Returns
    -------
    ndarray
        Probabilities over the region: its shape, or ``(C, *shape)`` for ``C > 1`` output channels.
        The model is left as it was (device, train/eval mode, memory format).

    Examples
    --------
    >>> from emtile.unet import UNet
    >>> p = predict_array(UNet(base=2, depth=2), np.zeros((50, 60), np.uint8), tile=64)
    >>> p.shape, p.dtype
    ((50, 60), dtype('float32'))
    """
    from tqdm.auto import tqdm

    from emtile.settings import PredictSettings

    unknown = sorted(set(overrides) - {f.name for f in fields(PredictSettings)})
    if unknown:
        raise EmtileError(f"{unknown[0]}= is not a setting of predict_array (it runs in this "
                          f"process, on an array)")
    settings = replace(settings or PredictSettings(dtype="float32", num_workers=0), **overrides)
    model = _as_model(model, weights=False)
    net, arr, _, grid, chunks, dev, num_workers = _setup(model, array, settings)
    scaling = _scaling(model, arr, None, settings.normalize)
    out = np.zeros((net.out_channels,) + grid.region_shape, np.dtype(settings.dtype))
    job = _job(net, grid, chunks, replace(settings, threshold=None), input=_register(arr),
               output=_register(out), model=_token(), weights="",
               amp=resolve_amp(settings.amp, dev), device=dev, threads=0, normalize=scaling)
    plan = job.plan()
    bar = tqdm(total=plan.n_tile_runs, unit="tile", desc="predict", disable=not progress)
    try:
        with _prepared(net, job.device, job.channels_last, job.compile) as fn:
            _MEMORY[job.model] = (net, fn)
            run_blocks(job, range(len(plan)), readers=num_workers, on_tiles=bar.update)
    finally:
        bar.close()
        _forget(job)
    return out[0] if net.out_channels == 1 else out
