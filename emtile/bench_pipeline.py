"""``emtile bench --pipeline``: predict's whole data path with a model that costs nothing.

:class:`NullUNet` has a :class:`~emtile.unet.UNet`'s geometry (its shape map: the same valid
sizes, halo and alignment) but its forward pass only crops each input tile to its valid output
and returns the logit of it, so that the sigmoid :func:`emtile.predict` applies gives back the
normalised input. Everything else predict does is real: reading and decoding the input chunks,
normalising, cutting (and at the borders mirroring) the tiles, moving them to the device and
back, stitching, encoding and writing the output store. The written probabilities equal the
input (uint8 output of a uint8 input, scaled by 1/255 and back: ``rint(255 * sigmoid(logit(v /
255))) == v`` exactly in float32), which :func:`run_pipeline` checks after every run.

Where the time goes is measured by timing wrappers installed around the functions predict's
path calls, for the duration of the run and removed afterwards (predict's code is not changed):

=================  ===========================================================================
part               what is timed (exclusive of the parts nested inside it)
=================  ===========================================================================
``read_decode``    reads of the input array (``LazyArray.__getitem__``: Zarr chunks decoded)
``normalize``      the input normalisation of a batch (``apply_inplace`` on the CPU,
                   ``apply_torch`` on the device, as ``emtile.tile_reader`` calls them)
``tiles``          mirroring at the volume's border (``geometry.read_window``) and a group's
                   raw window read (``tile_reader.Tiles.read``); cutting the batches' tiles out
                   of the window happens as they are consumed and counts as ``other``
``model``          the forward pass and its transfers (``_Forward.__call__``: to the device,
                   the null model, the sigmoid, back to host memory)
``stitch``         adding tiles into block buffers (``_Stitcher.add``) and normalising a block
                   to the output type, with its pyramid levels (``_block_values``)
``write``          encoding and writing a block's chunks (``_Context.write``)
=================  ===========================================================================

Each part's seconds are summed over every thread and process that ran it (the writer thread,
DataLoader workers through shared memory), exclusive of nested parts, so parts that overlap in
time can add up to more than the wall time; ``other_s`` is the wall time less their sum (setup,
the block plan, markers, queues, waiting; negative when parts overlapped). A wrapper costs about
a microsecond per call (a few hundred calls per block), far below the timer's resolution on the
parts it wraps; what it cannot separate is contention: a part that waits for the GIL or for a
core held by another thread is charged that wait.
"""

import contextlib
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from emtile._errors import whole_number
from emtile._process import usable_cores
from emtile.geometry import center_crop
from emtile.unet import UNet

__all__ = ["NullUNet", "run_pipeline", "format_pipeline", "timed_parts", "PARTS"]

PARTS = ("read_decode", "normalize", "tiles", "model", "stitch", "write")
PART_WORDS = {"read_decode": "read and decode", "normalize": "normalise",
              "tiles": "tile assembly and mirroring", "model": "model (null) and transfers",
              "stitch": "stitch", "write": "encode and write"}


class NullUNet(UNet):
    """A U-Net of ``depth`` (and ``ndim``, ``factors``, ``kernels``) whose forward pass is the
    centre crop of its input to the valid output, as logits: ``logit(crop(x))``.

    A :class:`~emtile.unet.UNet` (so :func:`emtile.predict` takes it and asks it its geometry)
    with one channel at the first level; its weights are never used.

    Examples
    --------
    >>> net = NullUNet(depth=2)
    >>> x = torch.rand(1, 1, 44, 44)
    >>> y = torch.sigmoid(net(x))
    >>> y.shape, bool(torch.allclose(y, x[..., 20:24, 20:24]))
    (torch.Size([1, 1, 4, 4]), True)
    """

    def __init__(self, depth=4, **kwargs):
        super().__init__(base=1, depth=depth, **kwargs)

    def forward(self, x):
        sizes = tuple(int(v) for v in x.shape[2:])
        if x.ndim != self.ndim + 2 or not self.shape_map.is_valid(sizes):
            return super().forward(x)  # its one-line error
        return torch.logit(center_crop(x, self.shape_map.output_size(sizes)).float())


# --------------------------------------------------------------------------- the timers


class _Parts:
    """Seconds per part, summed over threads and (forked) processes, exclusive of nested parts."""

    def __init__(self):
        self.seconds = multiprocessing.RawArray("d", len(PARTS))
        self.lock = multiprocessing.Lock()
        self.local = threading.local()

    def wrap(self, part, fn):
        k = PARTS.index(part)

        def timed(*args, **kwargs):
            stack = self.local.__dict__.setdefault("stack", [])
            stack.append(0.0)  # seconds of the parts nested in this call
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                nested = stack.pop()
                if stack:
                    stack[-1] += dt
                with self.lock:
                    self.seconds[k] += dt - nested

        timed.__wrapped__ = fn
        return timed

    def totals(self):
        return dict(zip(PARTS, self.seconds[:]))

    def reset(self):
        with self.lock:
            self.seconds[:] = [0.0] * len(PARTS)


def _targets():
    """``(owner, attribute, part)`` of every function the timers wrap."""
    from emtile import geometry, predictor, tile_reader

    return [(geometry.LazyArray, "__getitem__", "read_decode"),
            (tile_reader, "apply_inplace", "normalize"),  # imported by name there
            (tile_reader, "apply_torch", "normalize"),
            (geometry, "read_window", "tiles"),
            (tile_reader.Tiles, "read", "tiles"),
            (predictor._Forward, "__call__", "model"),
            (predictor._Stitcher, "add", "stitch"),
            (predictor, "_block_values", "stitch"),
            (predictor._Context, "write", "write")]


@contextlib.contextmanager
def timed_parts():
    """Install the timing wrappers for the ``with`` block; yields the :class:`_Parts` whose
    ``totals()`` are the seconds per part (:data:`PARTS`). Raises ``AttributeError`` where
    predict no longer has a function this bench times (the table in the module docstring)."""
    parts = _Parts()
    saved = []
    try:
        for owner, name, part in _targets():
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            saved.append((owner, name, original))
            setattr(owner, name, parts.wrap(part, original))
        yield parts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


# --------------------------------------------------------------------------- the benchmark


def _volume_shape(net, tile, tiles, shape):
    from emtile.bench import tiles_volume_shape

    if shape is None:
        return tiles_volume_shape(net, tile, tiles)
    shape = tuple(int(s) for s in shape)
    for i, s in enumerate(shape):
        whole_number(f"shape[{i}]", s, least=1)
    return shape


def _check_output(volume, output):
    """Whether the prediction equals the input (slab by slab)."""
    from emtile.volume import open_volume

    a, b = open_volume(volume), open_volume(output)
    if tuple(a.shape) != tuple(b.shape) or b.dtype != np.uint8:
        return False
    step = max(1, 2**26 // max(1, int(np.prod(a.shape[1:]))))
    return all(np.array_equal(a[z:z + step], b[z:z + step]) for z in range(0, a.shape[0], step))


def run_pipeline(*, depth=4, tile=572, batch_size=1, device="auto", tiles=8, shape=None,
                 channels_last=True, amp=False, num_workers=None, repeat=1, data=None, seed=0,
                 workdir=None, progress=False):
    """Run :func:`emtile.predict` with a :class:`NullUNet` on a volume it writes; time the parts.

    Parameters
    ----------
    depth, tile, batch_size, device, channels_last, amp, num_workers, data, seed, workdir
        As :func:`emtile.bench.run_bench` (``depth`` and ``tile`` set the geometry; the null
        model has no width).
    tiles : int
        Without ``shape``: the volume is exactly that many output tiles (up to 2×2 per slice).
    shape : tuple of int, optional
        ``(Z, Y, X)`` of the volume instead (e.g. ``(72, 2048, 2048)``).
    repeat : int
        Runs; the fastest is reported (its parts), every run's seconds in ``wall_times``.

    Returns
    -------
    dict
        ``pipeline_mvox_per_s`` (output voxels per second of the fastest run), ``wall_s``,
        ``parts`` (seconds per part, :data:`PARTS`), ``other_s``, ``parts_mvox_per_s`` (what
        each part alone would allow on one core), ``cores``, ``mvox_per_s_per_core``,
        ``output_equals_input`` (checked after every run), and the settings used.
    """
    from emtile.bench import mirrored_volume, tiles_volume_shape
    from emtile.device import resolve_amp, resolve_device
    from emtile.predictor import predict

    for name, value in (("batch_size", batch_size), ("tiles", tiles), ("repeat", repeat)):
        whole_number(name, value, least=1)
    dev = resolve_device(device)
    amp_name = resolve_amp(amp, dev)
    net = NullUNet(depth=depth)
    net.check(tile)
    shape = _volume_shape(net, tile, tiles, shape)
    kwargs = dict(tile=tile, batch_size=batch_size, device=str(dev), progress=progress,
                  amp=amp_name, channels_last=channels_last, overwrite=True, dtype="uint8")
    if num_workers is not None:
        kwargs["num_workers"] = num_workers
    runs = []
    with tempfile.TemporaryDirectory(prefix="emtile-pipeline-", dir=workdir) as tmp:
        vol, out = Path(tmp) / "vol.zarr", Path(tmp) / "pred.zarr"
        warm = Path(tmp) / "warm.zarr"
        mirrored_volume(warm, tiles_volume_shape(net, tile, 1), source=data, seed=seed)
        predict(net, warm, Path(tmp) / "warm-pred.zarr", **kwargs)  # kernels compiled, caches
        mirrored_volume(vol, shape, source=data, seed=seed)
        equal = True
        for _ in range(repeat):
            with timed_parts() as parts:
                t0 = time.perf_counter()
                result = predict(net, vol, out, **kwargs)
                wall = time.perf_counter() - t0
                runs.append((wall, parts.totals()))
            equal = equal and _check_output(vol, out)
    wall, parts = min(runs, key=lambda r: r[0])
    voxels = int(np.prod(shape))
    cores = usable_cores()
    return {
        "depth": depth, "tile": tile, "batch_size": batch_size, "device": str(dev),
        "threads": torch.get_num_threads(), "cores": cores, "channels_last": channels_last,
        "amp": amp_name or "off", "num_workers": num_workers, "volume_shape": list(shape),
        "repeat": repeat, "data": str(data) if data is not None else "random", "seed": seed,
        "out_voxels": voxels, "tile_runs": result.tiles, "blocks": result.blocks,
        "wall_s": wall, "wall_times": [r[0] for r in runs],
        "pipeline_mvox_per_s": voxels / wall / 1e6,
        "mvox_per_s_per_core": voxels / wall / 1e6 / cores,
        "parts": parts, "other_s": wall - sum(parts.values()),
        "parts_mvox_per_s": {k: (voxels / v / 1e6 if v > 0 else None) for k, v in parts.items()},
        "output_equals_input": equal,
    }


def format_pipeline(r):
    """The report :func:`run_pipeline` returns, as a short table."""
    device = f"{r['device']} ({r['threads']} threads)" if r["device"] == "cpu" else r["device"]
    lines = [
        f"model     null U-Net, depth {r['depth']}, tile {r['tile']} (crop to the valid output)",
        f"run       {device}, batch {r['batch_size']}, amp {r['amp']}, workers "
        f"{'default' if r['num_workers'] is None else r['num_workers']}, {r['cores']} cores",
        f"volume    {'x'.join(map(str, r['volume_shape']))} uint8 ({r['out_voxels'] / 1e6:.1f} "
        f"Mvoxel, {r['tile_runs']} tiles, {r['blocks']} blocks), data {r['data']}",
        f"pipeline  {r['pipeline_mvox_per_s']:.2f} Mvoxel/s ({r['mvox_per_s_per_core']:.2f} per "
        f"core) in {r['wall_s']:.2f} s, best of {r['repeat']}; output equals input: "
        f"{'yes' if r['output_equals_input'] else 'NO'}",
        "",
        f"{'part':<30}{'s':>8}{'% wall':>8}{'Mvox/s alone':>14}",
    ]
    for k in PARTS:
        s, alone = r["parts"][k], r["parts_mvox_per_s"][k]
        lines.append(f"{PART_WORDS[k]:<30}{s:>8.2f}{100 * s / r['wall_s']:>8.1f}"
                     f"{'-' if alone is None else format(alone, '.1f'):>14}")
    lines += [f"{'other (wall - parts)':<30}{r['other_s']:>8.2f}"
              f"{100 * r['other_s'] / r['wall_s']:>8.1f}",
              "",
              "parts are summed over threads and processes (the writer thread and any readers "
              "run beside the main thread), so they may add up to more than the wall time"]
    return "\n".join(lines)
