"""Tiled, resumable prediction: tiles -> DataLoader -> model -> stitcher -> Zarr writer.

The work is the block plan of :mod:`emtile.geometry`: the global tile grid over the region, cut
into blocks of whole output chunks. For every block still to do,

1. DataLoader workers read the block's input tiles (mirroring context at the volume border,
   :func:`emtile.geometry.read_window`), in groups of whole batches;
2. the main thread runs the model on batches (CUDA: pinned memory, non-blocking copies, AMP,
   channels_last; CPU: channels_last, which measured 1.3-1.8× faster here);
3. the output tiles are accumulated into the block buffer (:func:`emtile.stitch.accumulate`);
4. a background writer thread normalises the block, writes its chunks (probabilities, and the
   thresholded mask) and only then records the block as done.

So reading, computing and writing overlap, memory is bounded by a block and a few groups of tiles
(never by the volume), and a killed run started again finishes only the blocks not yet recorded;
its output is byte-identical to an uninterrupted run, because a block's batches are the same
whichever blocks are left. The output is marked complete only after every block is recorded.

A run resumes an interrupted store only when everything that determines its bytes is the same
(:func:`_fingerprint`: the input's path and a token of its files, the model's weights, the grid
and every option that changes the arithmetic) and the store's set-up finished (its block markers,
created last, exist). An in-memory input is never resumed, and ``overwrite=True`` always starts
over. An output that is, holds or lies inside the input is refused.

:func:`predict_array` runs the same code path in memory (no store), e.g. for validation during
training.
"""

import contextlib
import glob
import hashlib
import json
import math
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emtile._errors import EmtileError
from emtile import geometry
from emtile.stitch import BLENDS

__all__ = ["predict", "predict_array", "input_to_float", "PredictResult"]

DTYPES = ("uint8", "float16", "float32")
AMPS = (None, "bf16", "fp16")
MARKERS = "emtile_blocks"  # per-block completion flags inside the output group
AUTO_TILE_MEMORY = 2**30  # activation memory --tile auto may use
GROUP_BYTES = 64 * 2**20  # input tiles a DataLoader worker reads at once
CHUNK_TARGET = 512  # output chunks are the multiple of the tile stride nearest to this
# Test-only, private: ``_EMTILE_TEST_CRASH=N`` SIGKILLs the run right after the N-th block is
# recorded, ``N:before-marker`` right after its chunks are written but before it is recorded. Unset
# (the only state outside emtile's own tests) it does nothing.
_CRASH_ENV = "_EMTILE_TEST_CRASH"


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

    def __str__(self):
        model_axes = [ax for ax, (t, o) in enumerate(zip(self.tile, self.out_tile))
                      if (t, o) != (1, 1)]  # the slice axes of a 2-D model over a stack are 1

        def fmt(sizes):
            return "x".join(str(sizes[ax]) for ax in model_axes)

        return (f"{self.output}: {self.shape} {self.dtype}, tile {fmt(self.tile)} -> "
                f"{fmt(self.out_tile)} (stride {fmt(self.stride)}), {self.tiles} tiles in "
                f"{self.blocks} blocks, efficiency {self.efficiency:.0%}, {self.seconds:.1f} s "
                f"on {self.device}")


# --------------------------------------------------------------------------- input


def input_to_float(a):
    """Input pixels -> float32 as the model sees them: integers scaled by their dtype's maximum
    (uint8 / 255), booleans to 0/1, floats unchanged. Training must use the same mapping."""
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a
    if a.dtype.kind in "ui":
        return a.astype(np.float32) * np.float32(1.0 / np.iinfo(a.dtype).max)
    return a.astype(np.float32)


def _open_input(input):
    """-> (array, reopen spec). A path is re-opened by path in each DataLoader worker."""
    if isinstance(input, (str, os.PathLike)):
        from emtile.volume import open_volume

        return open_volume(input), str(input)
    if not all(hasattr(input, a) for a in ("shape", "dtype", "__getitem__")):
        raise EmtileError(f"input must be a path or an array with shape, dtype and slicing; got "
                          f"{type(input).__name__}")
    return input, None


def _check_volume(net, arr, name="input"):
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "biuf":
        raise EmtileError(f"{name} has dtype {dtype}, which is not numeric: expected integer or "
                          f"floating-point pixels")
    if net.in_channels != 1:
        raise EmtileError(f"the model expects {net.in_channels} input channels; emtile predicts "
                          f"single-channel volumes only")
    k = net.ndim
    if len(arr.shape) not in (k, k + 1):
        raise EmtileError(f"the model is {k}-D: it predicts (Y, X) images or (Z, Y, X) stacks, but "
                          f"{name} has {len(arr.shape)} dimensions (shape {tuple(arr.shape)})")
    if any(s == 0 for s in arr.shape):
        raise EmtileError(f"{name} is empty (shape {tuple(arr.shape)})")


def _as_model(model):
    from emtile.unet import UNet, load_model

    if isinstance(model, UNet):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise EmtileError(f"model must be an emtile UNet or a model folder, got {type(model).__name__}")


def _choice(name, value, allowed):
    if value not in allowed:
        shown = ", ".join("None" if a is None else str(a) for a in allowed)
        raise EmtileError(f"{name}={value!r} is not supported: choose one of {shown}")


def resolve_device(device, net=None):
    """``"auto"``/None -> ``net``'s device if it is not the CPU, else CUDA when there is one, else
    the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` checked. Predict, train and bench all use this."""
    import torch

    if device in (None, "auto"):
        if net is not None and next(net.parameters()).device.type != "cpu":
            return next(net.parameters()).device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EmtileError(f"device={device!r} is not a device: choose auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmtileError(f"device={device!r} was asked for but CUDA is not available here; use "
                          f"--device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise EmtileError(f"device={device!r} is not supported: choose auto, cpu or cuda")
    return dev


# --------------------------------------------------------------------------- the plan


@dataclass
class _Job:
    net: object
    array: object
    spec: object  # path to re-open in workers, or None
    grid: geometry.Grid
    plan: geometry.BlockPlan
    channels: int
    blocks: list  # plan[i] for every i, computed once (each one lists its tiles)


def _plan(net, arr, *, tile, overlap, roi, blend, max_tile_memory, batch_size, max_block_px,
          chunk_size):
    _check_volume(net, arr)
    _choice("blend", blend, BLENDS)
    shape = tuple(int(s) for s in arr.shape)
    region = geometry.normalize_roi(roi, shape)
    ramps = blend in ("linear", "cosine")
    if isinstance(tile, str):
        if tile != "auto":
            raise EmtileError(f"tile={tile!r} is not a tile size: give a valid size (e.g. 572) or "
                              f"'auto'")
        per_px = net.activation_bytes(1, batch_size)
        max_tile = int(math.sqrt(max_tile_memory / per_px))
        min_out = net.align
        if ramps:  # both ramps fit in the output whatever the stride's rounding
            min_out = 2 * (max(geometry._per_axis(overlap, net.ndim, "overlap")) + net.align) + 1
        tile, _ = geometry.choose_tile(shape, net.shape_map, roi=region, overlap=overlap,
                                       max_tile=max_tile, min_tile=2 * net.halo + min_out)
    grid = _grid(net, shape, tile, region, overlap)
    if ramps and not grid.owned:
        _check_ramps(net, grid, overlap, blend)
    k = net.ndim
    lead = len(shape) - k
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise EmtileError(f"chunk_size={chunk_size!r} must be a positive integer")
    # output chunks: a multiple of the tile stride, so blocks end where tiles end (no tile runs
    # twice without blending); a region smaller than that is one chunk
    chunks = (1,) * lead + tuple(s * max(1, round(chunk_size / s)) for s in grid.stride[lead:])
    chunks = tuple(min(c, n) for c, n in zip(chunks, grid.region_shape))
    plan = geometry.block_plan(grid, chunks, max_block_px=max_block_px)
    return grid, plan


def _grid(net, shape, tile, region, overlap):
    sizes = net.check(tile)
    for t in sizes:
        if net.output_size(t) < net.align:
            smallest = next(s for s in net.valid_sizes(t, 10 * t + 1000)
                            if net.output_size(s) >= net.align)
            raise EmtileError(f"tile={t} gives an output of {net.output_size(t)} px, less than "
                              f"the {net.align}-px alignment at depth {net.depth}; use a tile of "
                              f"at least {smallest}")
    return geometry.tile_grid(shape, net.shape_map, sizes, roi=region, overlap=overlap)


def _check_ramps(net, grid, overlap, blend):
    """Linear / cosine ramps of neighbouring tiles must fit in a tile's output (before the output
    store exists, in the user's terms). The actual overlap is ``out - stride``: the stride is
    rounded down to a multiple of ``2 ** depth``, so it can exceed what was asked for."""
    k = net.ndim
    asked = geometry._per_axis(overlap, k, "overlap")
    for ax in range(k):
        g = grid.ndim - k + ax
        out, ov = grid.out_tile[g], grid.overlap[g]
        if 2 * ov < out:
            continue
        strides = {v: (out - v) // net.align * net.align for v in range(out)}
        fits = [v for v, s in strides.items() if s >= net.align and 2 * (out - s) < out]
        most = f"at most {max(fits)}" if fits else "no overlap fits; use a larger tile"
        raise EmtileError(f"--overlap {asked[ax]} is too large for tile {grid.in_tile[g]} "
                          f"(output {out}) with --blend {blend}: tiles would overlap by {ov} px "
                          f"(the stride is a multiple of {net.align}) and each {blend} ramp must "
                          f"fit in half the output; {most}")


def _efficiency(grid, n_tile_runs):
    return math.prod(grid.region_shape) / (n_tile_runs * math.prod(grid.in_tile))


# --------------------------------------------------------------------------- reading


def _tiles_dataset(*args):
    """A :class:`_Tiles` that is also a torch ``IterableDataset`` (torch is imported lazily)."""
    global _TorchTiles
    if "_TorchTiles" not in globals():
        import torch

        _TorchTiles = type("_TorchTiles", (_Tiles, torch.utils.data.IterableDataset), {})
        _TorchTiles.__module__ = __name__
    return _TorchTiles(*args)


class _Tiles:
    """Iterable of ``(block index, first tile, tiles)`` with ``tiles`` of shape (n, 1, *T), float32.

    Each block's tiles are cut into groups of whole batches; worker ``w`` of ``W`` reads groups
    ``w, w + W, ...`` (the DataLoader collects them round-robin, so they arrive in order). A worker
    re-opens a path input itself, and reads each group's bounding box once.
    """

    def __init__(self, array, spec, grid, blocks, group, model_ndim):
        self.array, self.spec, self.grid = array, spec, grid
        self.blocks, self.group, self.model_ndim = blocks, group, model_ndim  # blocks: to do

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.spec is not None:
            state["array"] = None  # re-opened by path in the worker
        return state

    def _items(self):
        for block in self.blocks:
            for first in range(0, len(block.tiles), self.group):
                yield block, first

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        array = self.array
        if self.spec is not None and (info is not None or array is None):
            # a worker never shares the parent's handles (a TIFF file offset, an HDF5 file)
            from emtile.volume import open_volume

            array = open_volume(self.spec)
        for i, (block, first) in enumerate(self._items()):
            if i % workers == worker:
                tiles = block.tiles[first:first + self.group]
                yield block.index, first, torch.from_numpy(self.read(array, tiles))

    def read(self, array, tiles):
        grid = self.grid
        windows = [grid.in_window(t) for t in tiles]
        lo = tuple(min(w[0][ax] for w in windows) for ax in range(grid.ndim))
        hi = tuple(max(w[1][ax] for w in windows) for ax in range(grid.ndim))
        data = input_to_float(geometry.read_window(array, lo, hi))
        spatial = grid.in_tile[grid.ndim - self.model_ndim:]
        out = np.empty((len(tiles), 1) + spatial, np.float32)
        for i, (a, b) in enumerate(windows):
            box = tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))
            out[i, 0] = data[box].reshape(spatial)
        return out


# --------------------------------------------------------------------------- the model


_TTA_2D = [(flips, transpose) for flips in ((), (-1,), (-2,), (-2, -1)) for transpose in (False, True)]


@contextlib.contextmanager
def _prepared(net, device, channels_last, compile):
    """Put ``net`` in eval mode on ``device`` (channels_last), restore it afterwards."""
    import torch

    was_training = net.training
    old = next(net.parameters()).device
    net.eval().to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    fn = net
    stack = contextlib.ExitStack()
    if compile:
        import torch._inductor.config as inductor_config

        stack.enter_context(inductor_config.patch(freezing=True))
        fn = torch.compile(net, dynamic=False)
    try:
        with stack:
            yield fn
    finally:
        if channels_last:
            net.to(memory_format=torch.contiguous_format)
        net.to(old).train(was_training)


class _Forward:
    """Run the model on a batch of input tiles, return sigmoid probabilities as NumPy (B, C, *O)."""

    def __init__(self, fn, device, amp, channels_last, tta):
        import torch

        self.torch, self.fn, self.device, self.tta = torch, fn, device, tta
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.amp = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def _run(self, x):
        torch = self.torch
        x = x.contiguous(memory_format=self.memory_format)
        if self.amp is None:
            return torch.sigmoid(self.fn(x).float())
        with torch.autocast(device_type=self.device.type, dtype=self.amp):
            return torch.sigmoid(self.fn(x).float())

    def __call__(self, x):
        torch = self.torch
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if not self.tta:
                p = self._run(x)
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
    of "last along this axis", where a tile owns its whole output.
    """

    def __init__(self, grid, channels, blend):
        from emtile import stitch

        self.stitch, self.grid, self.channels = stitch, grid, channels
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
        return (np.zeros((self.channels,) + block.shape, np.float32),
                np.zeros(block.shape, np.float32))

    def add(self, buffers, block, idx, tile):
        """``tile`` (C, *O model axes): add it where it contributes inside ``block``."""
        acc, wsum = buffers
        grid = self.grid
        tile = tile.reshape((self.channels,) + grid.out_tile)  # a view
        start, _ = grid.out_window(idx)
        if grid.owned:
            weight = self.weights[tuple(int(k == n - 1) for k, n in zip(idx, grid.counts))]
        else:
            weight = self.weights[None]
        origin = tuple(a - b for a, b in zip(start, block.start))
        self.stitch.accumulate(acc, wsum, tile, weight, origin)


# --------------------------------------------------------------------------- writing


class _Writer:
    """A background thread that finishes blocks (normalise, write, record) in order."""

    def __init__(self, finish, depth=2):
        self.finish, self.error = finish, None
        self.queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._loop, name="emtile-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        _single_numba_thread()  # this thread's setting only: never compete with torch's threads
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.finish(*item)
                except BaseException as exc:  # reported to the main thread
                    self.error = exc

    def put(self, *item):
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self):
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


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


def _blocks_to_values(stitch, acc, wsum, dtype, threshold):
    """Normalised block -> (probabilities in ``dtype``, mask or None), both (C, *S)."""
    if threshold is None:
        return stitch.normalize(acc, wsum, dtype=np.dtype(dtype)), None
    p = stitch.normalize(acc, wsum, dtype=np.float32)
    mask = (p >= np.float32(threshold)).astype(np.uint8)
    if dtype != "float32":
        p = stitch.normalize(acc, wsum, dtype=np.dtype(dtype))
    return p, mask


# --------------------------------------------------------------------------- the engine


def _execute(job, block_ids, finish, *, batch_size, num_workers, device, amp, tta, blend,
             channels_last, compile, progress, desc="predict"):
    """Run the blocks ``block_ids``; ``finish(block, acc, wsum)`` is called in the writer thread."""
    import numba
    import torch
    from tqdm.auto import tqdm

    grid, blocks = job.grid, job.blocks
    tile_bytes = 4 * math.prod(grid.in_tile)
    group = max(1, GROUP_BYTES // (tile_bytes * batch_size)) * batch_size
    todo = [blocks[b] for b in block_ids]
    dataset = _tiles_dataset(job.array, job.spec, grid, todo, group, job.net.ndim)
    total = sum(len(b.tiles) for b in todo)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=2 if num_workers else None)
    stitcher = _Stitcher(grid, job.channels, blend)
    batches = iter(loader)  # workers fork here, before the writer thread exists
    writer = _Writer(finish)
    bar = tqdm(total=total, unit="tile", desc=desc, disable=not progress, dynamic_ncols=True,
               smoothing=0.1)
    current, buffers, done = None, None, 0
    numba_threads = _single_numba_thread()
    try:
        with _prepared(job.net, device, channels_last, compile) as fn:
            forward = _Forward(fn, device, amp, channels_last, tta)
            for block_index, first, tiles in batches:
                if current is None or current.index != block_index:
                    current = blocks[block_index]
                    buffers, done = stitcher.new(current), 0
                for b0 in range(0, len(tiles), batch_size):
                    probs = forward(tiles[b0:b0 + batch_size])
                    for i, p in enumerate(probs):
                        stitcher.add(buffers, current, current.tiles[first + b0 + i], p)
                    bar.update(len(probs))
                done += len(tiles)
                if done == len(current.tiles):
                    writer.put(current, *buffers)
                    buffers = None
    except BaseException:
        writer.queue.put(None)
        raise
    finally:
        numba.set_num_threads(numba_threads)
        bar.close()
    writer.close()


def _setup(model, input, *, tile, batch_size, num_workers, device, amp, blend, overlap, roi,
           max_tile_memory, max_block_px, chunk_size):
    net = _as_model(model)
    arr, spec = _open_input(input)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EmtileError(f"batch_size={batch_size!r} must be a positive integer")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise EmtileError(f"num_workers={num_workers!r} must be 0 or a positive integer")
    _choice("amp", amp, AMPS)
    dev = resolve_device(device, net)
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if dev.type == "cuda" else 1
    grid, plan = _plan(net, arr, tile=tile, overlap=overlap, roi=roi, blend=blend,
                       max_tile_memory=max_tile_memory, batch_size=batch_size,
                       max_block_px=max_block_px, chunk_size=chunk_size)
    job = _Job(net, arr, spec, grid, plan, net.out_channels, list(plan))
    return job, dev, num_workers


def predict_array(model, array, *, tile=572, batch_size=1, num_workers=0, device="auto", amp=None,
                  blend="none", overlap=0, tta=False, roi=None, dtype="float32", progress=False,
                  channels_last=True, compile=False, max_tile_memory=AUTO_TILE_MEMORY,
                  max_block_px=2**22, chunk_size=CHUNK_TARGET):
    """Predict an in-memory array with the same tiling and stitching as :func:`predict`.

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
    from emtile import stitch

    _choice("dtype", dtype, DTYPES)
    job, dev, num_workers = _setup(model, array, tile=tile, batch_size=batch_size,
                                   num_workers=num_workers, device=device, amp=amp, blend=blend,
                                   overlap=overlap, roi=roi, max_tile_memory=max_tile_memory,
                                   max_block_px=max_block_px, chunk_size=chunk_size)
    region = job.grid.region
    out = np.zeros((job.channels,) + job.grid.region_shape, np.dtype(dtype))

    def finish(block, acc, wsum):
        out[(slice(None),) + block.slices(region)] = stitch.normalize(acc, wsum,
                                                                      dtype=np.dtype(dtype))

    _execute(job, range(len(job.plan)), finish, batch_size=batch_size, num_workers=num_workers,
             device=dev, amp=amp, tta=tta, blend=blend, channels_last=channels_last,
             compile=compile, progress=progress)
    return out[0] if job.channels == 1 else out


# --------------------------------------------------------------------------- the store


def _input_token(spec, array):
    """A cheap stand-in for the input's content: ``[name, inode, size, mtime_ns, ctime_ns]`` of its
    file (TIFF, HDF5), its images (a folder or glob of them), or its Zarr metadata documents
    (``zarr.json`` / ``.zarray`` / ``.zgroup`` / ``.zattrs`` of the store's root and of the array
    read). Re-writing or replacing an input changes it; overwriting chunks of a Zarr array in
    place does not (that would take reading the data)."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        paths = sorted(glob.glob(text))
    else:
        from emtile.store import is_zarr_store
        from emtile.volume import _split_hdf5

        h5 = _split_hdf5(text)
        p = Path(h5[0] if h5 is not None else text)
        if p.is_dir() and is_zarr_store(p):
            names = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
            inner = str(getattr(array, "path", "") or "")
            folders = [p] + ([p / inner] if inner and (p / inner).is_dir() else [])
            paths = [f / n for f in folders for n in names if (f / n).exists()]
        elif p.is_dir():
            paths = sorted(f for f in p.iterdir() if f.is_file())
        else:
            paths = [p]
    token = []
    for f in paths:
        st = os.stat(f)
        token.append([str(f), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return token


def _fingerprint(job, *, dtype, threshold, tta, blend, amp, device, batch_size, channels_last,
                 compile):
    """Everything that determines the output bytes; a resumed run must match it exactly.

    Only for path inputs (an in-memory array is never resumed): its resolved path and
    :func:`_input_token`; the model's config and a hash of its weights; the grid, chunks and
    blocks; every option that changes the arithmetic (device type, batch size, memory format,
    compile, AMP, torch version).
    """
    import torch

    h = hashlib.sha256()
    for name, t in job.net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    g = job.grid
    return {
        "input": str(Path(job.spec).resolve()), "input_token": _input_token(job.spec, job.array),
        "input_shape": list(g.volume_shape), "input_dtype": str(np.dtype(job.array.dtype)),
        "region": [list(r) for r in g.region], "tile": list(g.in_tile), "stride": list(g.stride),
        "owned": g.owned, "chunks": list(job.plan.chunks), "block": list(job.plan.block_shape),
        "blend": blend, "tta": bool(tta), "amp": amp, "dtype": dtype, "threshold": threshold,
        "model": job.net.config, "weights_sha256": h.hexdigest(),
        "device": device.type, "batch_size": batch_size, "channels_last": bool(channels_last),
        "compile": bool(compile), "torch": torch.__version__,
    }


def _voxel_size(spec, ndim):
    """Voxel size from an OME-Zarr input's metadata (spatial axes), or None."""
    if spec is None:
        return None
    try:
        import zarr

        from emtile.store import is_zarr_store

        if not is_zarr_store(spec):
            return None
        attrs = zarr.open_group(str(spec), mode="r").attrs.asdict()
        ms = attrs.get("ome", attrs)["multiscales"][0]
        names = [a["name"] for a in ms["axes"]]
        scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        sizes = [s for n, s in zip(names, scale) if n != "c"]
        return tuple(sizes[-ndim:]) if len(sizes) >= ndim else None
    except Exception:  # foreign metadata: the output keeps the default voxel size
        return None


def _check_output_is_not_input(spec, output):
    """An output that is, contains or lies inside the input could destroy it (``--overwrite``
    removes the output first)."""
    if spec is None:
        return
    inp, out = Path(os.path.realpath(spec)), Path(os.path.realpath(output))
    if out == inp:
        how = "is the input"
    elif out in inp.parents:
        how = "contains the input"
    elif inp in out.parents:
        how = "lies inside the input"
    else:
        return
    raise EmtileError(f"output {str(output)!r} {how} {str(spec)!r}: writing it could destroy the "
                      f"input; choose an output path outside the input")


def _translate(group, region):
    """Record the ROI's place in the input volume (NGFF 0.5: ``scale`` then ``translation``, in
    physical units), so viewers overlay the output on the input."""
    if not any(a for a, _ in region):
        return
    ome = dict(group.attrs["ome"])
    ms = [dict(m) for m in ome["multiscales"]]
    names = [a["name"] for a in ms[0]["axes"]]
    (d,) = ms[0]["datasets"]  # predict writes full resolution only
    scale = d["coordinateTransformations"][0]["scale"]
    starts = iter(a for a, _ in region)
    translation = [0.0 if n == "c" else float(next(starts) * s) for n, s in zip(names, scale)]
    ms[0]["datasets"] = [dict(d, coordinateTransformations=[
        d["coordinateTransformations"][0], {"type": "translation", "translation": translation}])]
    ome["multiscales"] = ms
    group.attrs["ome"] = ome


def _resumable(group, fingerprint, n_blocks, threshold):
    """``(probabilities, mask or None, markers)`` of an interrupted store this run can finish,
    or None. The markers array is created last, so its presence means the set-up finished."""
    meta = group.attrs.asdict().get("emtile", {})
    if meta.get("predict") != json.loads(json.dumps(fingerprint)):
        return None
    try:
        markers = group[MARKERS]
        probs = group["0"]
        mask = group["labels/mask/0"] if threshold is not None else None
    except (KeyError, FileNotFoundError, ValueError, OSError):
        return None
    if markers.shape != (n_blocks,):
        return None
    return probs, mask, markers


def _open_output(job, output, *, dtype, threshold, overwrite, fingerprint):
    """Create the output store, or re-open an interrupted run's store with the same fingerprint.

    ``fingerprint`` None (an in-memory input) or ``overwrite`` never resumes: the output is
    replaced. Returns ``(group, probabilities, mask or None, markers, resumed)``.
    """
    import zarr

    from emtile import store

    resume = fingerprint is not None and not overwrite
    state = store.prepare_output(output, overwrite=overwrite, resume=resume)
    if state == "resume":
        group = zarr.open_group(str(output), mode="r+")
        found = _resumable(group, fingerprint, len(job.plan), threshold)
        if found is not None:
            return (group, *found, True)
        store.prepare_output(output, overwrite=overwrite)  # not this run's, or set-up unfinished
    region_shape = job.grid.region_shape
    c = job.channels
    shape = ((c,) if c > 1 else ()) + region_shape
    chunks = ((c,) if c > 1 else ()) + job.plan.chunks
    axes = ("c" if c > 1 else "") + ("zyx" if len(region_shape) == 3 else "yx")
    voxel = _voxel_size(job.spec, len(region_shape))
    group = store.create_image(output, shape, np.dtype(dtype), chunks=chunks, voxel_size=voxel,
                               axes=axes, name="probabilities", kind="probabilities",
                               attrs={"predict": fingerprint})
    _translate(group, job.grid.region)
    mask = None
    if threshold is not None:
        group.create_group("labels", attributes={"labels": ["mask"]})
        mgroup = store.create_image(f"{output}/labels/mask", shape, np.uint8, chunks=chunks,
                                    voxel_size=voxel, axes=axes, name="mask", kind="labels",
                                    attrs={"threshold": threshold})
        _translate(mgroup, job.grid.region)
        ome = dict(mgroup.attrs["ome"])
        ome["image-label"] = {"version": "0.5", "source": {"image": "../../"}}
        mgroup.attrs["ome"] = ome
        mask = mgroup["0"]
    # last: its existence means the set-up finished (see _resumable)
    markers = group.create_array(MARKERS, shape=(len(job.plan),), chunks=(1,), dtype="uint8",
                                 fill_value=0, compressors=None)
    return group, group["0"], mask, markers, False


def predict(model, input, output, *, tile=572, batch_size=1, num_workers=None, device="auto",
            amp=None, blend="none", overlap=0, tta=False, roi=None, dtype="uint8", threshold=None,
            overwrite=False, progress=True, channels_last=True, compile=False,
            max_tile_memory=AUTO_TILE_MEMORY, max_block_px=2**22, chunk_size=CHUNK_TARGET):
    """Predict a volume tile by tile into an OME-Zarr store of probabilities (and a mask).

    Parameters
    ----------
    model : UNet or path
        A model, or a model folder written by :func:`emtile.save_model`.
    input : path or array-like, shape (Z, Y, X) or (Y, X)
        Anything :func:`emtile.open_volume` opens, or an array. A 2-D model runs slice by slice.
    output : path
        The new store. Probabilities at ``"0"``, shape the region's (``(C, ...)`` for ``C > 1``
        output channels); the mask at ``labels/mask``.
    tile : int, tuple or "auto"
        Valid input tile size (572 at depth 4 gives 388-px outputs, stride 384). ``"auto"`` picks
        the valid size computing the fewest pixels for this volume whose forward pass fits in
        ``max_tile_memory`` bytes.
    batch_size : int
        Tiles per forward pass (1 was fastest per tile on a 2-core CPU).
    num_workers : int, optional
        DataLoader worker processes reading tiles (default 1 on CPU, up to 4 on CUDA; 0 reads in
        the main thread).
    device : {"auto", "cpu", "cuda"}
    amp : {None, "bf16", "fp16"}
        Mixed precision (autocast) for the forward pass.
    blend : {"none", "linear", "cosine", "gaussian"}
        How overlapping outputs are weighted when ``overlap > 0``. With ``overlap=0`` every output
        pixel comes from exactly one tile (valid-convolution tiling is exact).
    overlap : int
        Minimum output overlap between neighbouring tiles, in pixels.
    tta : bool
        Average the probabilities over the 8 flips / transposes of each tile.
    roi : tuple of slices, optional
        Region ``(z0:z1, y0:y1, x0:x1)`` to predict; context outside it is read from the volume.
        The result equals the same region of a whole-volume prediction.
    dtype : {"uint8", "float16", "float32"}
        Probability storage: uint8 stores ``round(255 p)``.
    threshold : float, optional
        Also write ``labels/mask`` (uint8, 1 where ``p >= threshold``).
    overwrite : bool
        Replace an existing output, and never resume an interrupted one (without it, an
        interrupted run's output is resumed when everything matches, else replaced).
    progress : bool
        Show a progress bar (tiles/s, ETA).
    channels_last : bool
        Run convolutions in channels_last memory format (faster on CPU and on CUDA with AMP).
    compile : bool
        ``torch.compile`` the model (with freezing): faster at small widths, 10-20 s to compile.
    max_tile_memory : int
        Activation memory in bytes that ``tile="auto"`` may use.
    max_block_px : int
        Output pixels per block (the unit of work, writing and resumption).
    chunk_size : int
        Target output chunk edge along the model axes (rounded to a multiple of the tile stride).

    Returns
    -------
    PredictResult
    """
    t0 = time.perf_counter()
    _choice("dtype", dtype, DTYPES)
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise EmtileError(f"threshold={threshold!r} must be a number between 0 and 1")
    job, dev, num_workers = _setup(model, input, tile=tile, batch_size=batch_size,
                                   num_workers=num_workers, device=device, amp=amp, blend=blend,
                                   overlap=overlap, roi=roi, max_tile_memory=max_tile_memory,
                                   max_block_px=max_block_px, chunk_size=chunk_size)
    _check_output_is_not_input(job.spec, output)
    fingerprint = None if job.spec is None else _fingerprint(
        job, dtype=dtype, threshold=threshold, tta=tta, blend=blend, amp=amp, device=dev,
        batch_size=batch_size, channels_last=channels_last, compile=compile)
    from emtile import stitch, store

    group, probs, mask, markers, resumed = _open_output(
        job, output, dtype=dtype, threshold=threshold, overwrite=overwrite, fingerprint=fingerprint)
    plan = job.plan
    flags = markers[:]
    todo = [i for i in range(len(plan)) if not flags[i]]
    lead = (slice(None),) if job.channels > 1 else ()
    region = job.grid.region
    crash_after, crash_before_marker = _crash_hook()
    recorded = [0]

    def finish(block, acc, wsum):
        p, m = _blocks_to_values(stitch, acc, wsum, dtype, threshold)
        sl = lead + block.slices(region)
        probs[sl] = p if job.channels > 1 else p[0]
        if mask is not None:
            mask[sl] = m if job.channels > 1 else m[0]
        if crash_before_marker and recorded[0] + 1 >= crash_after:
            os.kill(os.getpid(), signal.SIGKILL)
        markers[block.index] = 1  # only after every chunk of the block is written
        recorded[0] += 1
        if crash_after and recorded[0] >= crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    _execute(job, todo, finish, batch_size=batch_size, num_workers=num_workers, device=dev,
             amp=amp, tta=tta, blend=blend, channels_last=channels_last, compile=compile,
             progress=progress)
    missing = np.flatnonzero(markers[:] == 0)
    if missing.size:  # every block was handed to the writer: a bug, never a user error
        raise RuntimeError(f"internal error: {missing.size} of {len(plan)} blocks of {output} "
                           f"were not recorded (first: {int(missing[0])}); the output is left "
                           f"incomplete")
    if mask is not None:
        store.mark_complete(_open_group(f"{output}/labels/mask"))
    store.mark_complete(group)
    n_runs = sum(len(b.tiles) for b in job.blocks)
    return PredictResult(
        output=str(output), shape=tuple(probs.shape), dtype=dtype, tile=job.grid.in_tile,
        out_tile=job.grid.out_tile, stride=job.grid.stride, tiles=n_runs, blocks=len(plan),
        blocks_resumed=len(plan) - len(todo), efficiency=_efficiency(job.grid, n_runs),
        seconds=time.perf_counter() - t0, device=str(dev))


def _crash_hook():
    """``(N, before_marker)`` from the private, test-only ``_EMTILE_TEST_CRASH``; ``(0, False)``
    when it is not set."""
    value = os.environ.get(_CRASH_ENV, "")
    if not value:
        return 0, False
    n, _, mode = value.partition(":")
    return int(n), mode == "before-marker"


def _open_group(path):
    import zarr

    return zarr.open_group(str(path), mode="r+")
