"""Predict's input side: each group of tiles read as one raw window, tiles cut from it as views.

A block's tiles overlap by the model's context (a 572-px tile of a depth-4 U-Net gives 388 px,
so float32 tiles cut out one by one hold about 2.2 raw pixels' worth of data each, four bytes
per pixel). Here a group of tiles (a block's, in whole batches) is read once, as its bounding
window in the input's own dtype (uint8 for EM), mirrored at the volume border
(:func:`emtile.geometry.read_window`); that window is what a reader thread or a DataLoader
worker hands on. The tiles of each forward pass are views into it, normalised only when they
become the model's batch (:class:`Batches`): into a float32 buffer on the CPU, or on the device
after one copy of the raw window (CUDA). The arithmetic is :func:`emtile.normalize.apply`'s
(elementwise, float32), so the batch's bytes are those of the old float32 tiles.
"""

import queue
import threading
import time

import numpy as np

from emtile import _faults, geometry
from emtile.normalize import Scaling, apply_inplace, apply_torch

GROUP_BYTES = 64 * 2**20  # float32 input tiles a reader reads at once (one window per group)
DEVICE_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32),
                 np.dtype(np.float32))  # raw windows normalised on a CUDA device


def tiles_dataset(*args):
    """A :class:`Tiles` that is also a torch ``IterableDataset`` (torch is imported lazily)."""
    global _TorchTiles
    if "_TorchTiles" not in globals():
        import torch

        _TorchTiles = type("_TorchTiles", (Tiles, torch.utils.data.IterableDataset), {})
        _TorchTiles.__module__ = __name__
    return _TorchTiles(*args)


class Tiles:
    """Iterable of ``(block index, first tile, window, origins, seconds)``: ``window`` the raw
    pixels (input dtype) holding tiles ``first, first + 1, ...`` of the block, ``origins`` (n,
    ndim) int64 where each tile's input window starts inside it.

    Each block's tiles are cut into groups of whole batches; worker ``w`` of ``W`` reads groups
    ``w, w + W, ...`` (the DataLoader collects them round-robin, so they arrive in order). A worker
    re-opens a path input itself, and reads each group's bounding box once.
    """

    def __init__(self, array, path, plan, block_ids, group):
        self.array, self.path, self.plan = array, path, plan
        self.block_ids, self.group = block_ids, group

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path is not None:
            state["array"] = None  # re-opened by path in the worker
        return state

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        array = self.array
        if self.path is not None and (info is not None or array is None):
            # a worker never shares the parent's handles (a TIFF file offset, an HDF5 file)
            from emtile.volume import open_volume

            array = open_volume(self.path)
        i = 0
        for b in self.block_ids:
            block = self.plan[int(b)]
            for first in range(0, len(block.tiles), self.group):
                if i % workers == worker:
                    t0 = time.perf_counter()
                    _faults.point("predict.read")  # test-only: a reader killed here
                    window, origins = self.read(array, block.tiles[first:first + self.group])
                    yield block.index, first, window, origins, time.perf_counter() - t0
                i += 1

    def read(self, array, tiles):
        """``(window, origins)`` of ``tiles``: one read of their bounding box."""
        grid = self.plan.grid
        starts = np.array([grid.in_window(t)[0] for t in tiles], np.int64).reshape(len(tiles), -1)
        lo = starts.min(axis=0)
        hi = starts.max(axis=0) + np.asarray(grid.in_tile, np.int64)
        window = geometry.read_window(array, tuple(lo.tolist()), tuple(hi.tolist()))
        if not window.dtype.isnative:  # torch takes native byte order only
            window = window.astype(window.dtype.newbyteorder("="))
        if not window.flags.c_contiguous or not window.flags.writeable:
            window = np.ascontiguousarray(window)  # a view of an in-memory input: a copy
            window = window if window.flags.writeable else window.copy()
        return window, starts - lo


class Batches:
    """Model batches cut from a raw window: ``batches(window, origins)`` -> float32 (n, 1, *T)
    tensors, on ``device``; ``scaling`` is the model's :class:`emtile.normalize.Scaling`.

    On CUDA a window of a :data:`DEVICE_DTYPES` dtype is copied to the device once (pinned,
    non-blocking) and its tiles are cut and normalised there; otherwise the tiles are normalised
    on the CPU into one float32 buffer per batch.
    """

    def __init__(self, grid, model_ndim, scaling=Scaling("dtype"), device="cpu", on_device=None):
        import torch

        self.torch, self.scaling = torch, scaling
        self.tile = tuple(grid.in_tile)
        self.spatial = self.tile[grid.ndim - model_ndim:]
        self.device = torch.device(device)
        # cut and normalise with torch on the device (None: on CUDA); True also on the CPU (tests)
        self.on_device = self.device.type == "cuda" if on_device is None else on_device

    def __call__(self, window, origins, batch_size):
        """Iterate ``(first, batch)`` over the window's tiles, ``batch_size`` at a time."""
        torch = self.torch
        on_device = (self.on_device
                     and np.dtype(str(window.dtype).replace("torch.", "")) in DEVICE_DTYPES)
        if on_device:
            window = torch.as_tensor(window)
            window = window.to(self.device, non_blocking=window.is_pinned())
        elif isinstance(window, torch.Tensor):
            window = window.numpy()
        origins = np.asarray(origins)  # a tensor when it came through a DataLoader
        for b0 in range(0, len(origins), batch_size):
            boxes = [tuple(slice(int(a), int(a) + t) for a, t in zip(o, self.tile))
                     for o in origins[b0:b0 + batch_size]]
            if on_device:
                x = torch.stack([window[box].reshape(self.spatial) for box in boxes])
                yield b0, apply_torch(x.unsqueeze(1), self.scaling)
            else:
                out = np.empty((len(boxes), 1) + self.spatial, np.float32)
                for i, box in enumerate(boxes):
                    out[i, 0] = window[box].reshape(self.spatial)
                yield b0, torch.from_numpy(apply_inplace(out, window.dtype, self.scaling))


def read_ahead(items, depth=2):
    """Iterate ``items`` in a background thread, ``depth`` items ahead (reading overlaps the
    model); an exception in the thread is raised here, at the item where it happened."""
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def reader():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, None))
        except BaseException as exc:  # handed to the consumer
            q.put((None, exc))
            return
        q.put((done, None))

    thread = threading.Thread(target=reader, name="emtile-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)
