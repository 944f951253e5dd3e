"""Where does prediction time go? The model alone against the whole ``predict`` path, in one process.

:func:`run_bench` times, on the same machine and in the same process,

(a) the model alone: ``model(x)`` on batches of random tiles already on the device, after a
    warm-up, under ``torch.inference_mode`` (and autocast with ``amp``);
(b) :func:`emtile.predictor.predict` on an OME-Zarr volume whose output area is exactly ``tiles``
    output tiles (reading, mirroring, batching, the model, stitching, writing),

and returns both, their ratio, output voxels per second, GFLOP/s (the model's FLOPs as
:class:`torch.utils.flop_counter.FlopCounterMode` counts them), and the peak resident memory.
:func:`mirrored_volume` builds the test volumes (by mirroring the slices of a real stack, e.g.
ISBI 2012, to any shape; random data without one) and is shared with the ``examples/bench_*.py``
scripts. ``emtile bench`` is the command line.
"""

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emtile._errors import EmtileError, whole_number

__all__ = ["run_bench", "format_bench", "mirrored_volume", "model_flops", "peak_rss"]


# --------------------------------------------------------------------------- helpers


def peak_rss():
    """Peak resident memory in bytes: ``(this process, its largest finished child)``.

    Children are DataLoader workers that have exited; ``ru_maxrss`` is in KiB on Linux and in
    bytes on macOS.
    """
    unit = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit
    return own, children


def model_flops(model, x):
    """Floating-point operations of ``model(x)`` as PyTorch counts them; returns ``(flops, output)``.

    :class:`torch.utils.flop_counter.FlopCounterMode` counts 2 per multiply-add of the
    convolutions (transposed ones included) and matrix products; pooling, activations, batch
    norm and copies are not counted. Runs ``model(x)`` once under ``torch.inference_mode``
    (``x`` may be on the meta device).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        out = model(x)
    return counter.get_total_flops(), out


def mirrored_volume(path, shape, *, source=None, chunks=None, seed=0, progress=False):
    """Write an OME-Zarr uint8 volume of ``shape`` (Z, Y, X) made by mirroring a real stack.

    Parameters
    ----------
    path : str or Path
        The new store (must not exist).
    shape : tuple of int
        ``(Z, Y, X)`` of the volume to write.
    source : str, Path or array, optional
        A stack (anything :func:`emtile.open_volume` reads, or an array) whose slices are mirrored
        (NumPy ``"reflect"``) along every axis to fill ``shape``: slices 0, 1, …, n-1, n-2, …
        Without one, smoothed random noise (seeded) is used.
    chunks : tuple of int, optional
        Chunk shape; default one slice by up to 1024×1024.

    Written one slice at a time, so memory stays at a few slices whatever ``shape``. A source
    store that records its voxel size passes it on.
    """
    from emtile.geometry import reflect_index
    from emtile.store import create_image, mark_complete
    from emtile.volume import open_volume

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise EmtileError(f"shape={shape} must be (Z, Y, X) with positive sizes")
    if source is None:
        rng = np.random.default_rng(seed)
        noise = rng.integers(0, 256, (min(shape[0], 8), 256, 256), dtype=np.uint8)
        src = (noise.astype(np.uint16) + np.roll(noise, 1, axis=2) + np.roll(noise, 1, axis=1)) // 3
        src = src.astype(np.uint8)
        name = "random"
    else:
        src = open_volume(source) if isinstance(source, (str, Path)) else source
        if src.ndim == 2:
            src = np.asarray(src[...])[None]
        if src.ndim != 3:
            raise EmtileError(f"source {source!r} has shape {src.shape}; expected a (Z, Y, X) stack")
        name = Path(str(source)).name if isinstance(source, (str, Path)) else "array"
    zi = reflect_index(np.arange(shape[0]), src.shape[0])
    yi = reflect_index(np.arange(shape[1]), src.shape[1])
    xi = reflect_index(np.arange(shape[2]), src.shape[2])
    voxel_size = None
    if isinstance(source, (str, Path)):  # mirrored voxels keep their size
        from emtile.voxels import read_voxel_size

        sizes, _ = read_voxel_size(source)  # {"z": nm, "y": nm, "x": nm} or None
        if sizes and all(a in sizes for a in "zyx"):
            voxel_size = tuple(float(sizes[a]) for a in "zyx")
    group = create_image(path, shape, np.uint8, chunks=chunks, kind="image",
                         voxel_size=voxel_size, attrs={"source": f"mirrored {name}"})
    arr = group["0"]
    cache = {}
    for z in range(shape[0]):
        k = int(zi[z])
        if k not in cache:
            cache.clear()
            plane = np.asarray(src[k])
            if plane.dtype != np.uint8:
                lo, hi = float(plane.min()), float(plane.max())
                plane = ((plane - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
            cache[k] = plane[yi][:, xi]
        arr[z] = cache[k]
    mark_complete(group)
    return group


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiles_volume_shape(model, tile, tiles):
    """``(Z, Y, X)`` whose output is exactly ``tiles`` output tiles of the global grid.

    A 2-D model: up to 2×2 tiles per slice (so tiles meet and are stitched), the rest in
    further slices. A 3-D model (``tile`` per axis): the tiles arranged in a box of
    :func:`tile_counts` ``(nz, ny, nx)`` tiles, so they meet along every axis they can.
    """
    from emtile.geometry import tile_grid

    if tiles < 1:
        raise EmtileError(f"tiles={tiles} must be at least 1")
    if model.ndim == 3:
        g = tile_grid((10_000,) * 3, model, tile)
        counts = tile_counts(tiles)
        shape = tuple(o + (n - 1) * s for o, n, s in zip(g.out_tile, counts, g.stride))
        assert tile_grid(shape, model, tile).n_tiles == tiles, shape
        return shape
    per = 4 if tiles % 4 == 0 else 2 if tiles % 2 == 0 else 1
    ny, nx = {4: (2, 2), 2: (1, 2), 1: (1, 1)}[per]
    g = tile_grid((1, 10_000, 10_000), model, tile)
    (_, oy, ox), (_, sy, sx) = g.out_tile, g.stride
    shape = (tiles // per, oy + (ny - 1) * sy, ox + (nx - 1) * sx)
    assert tile_grid(shape, model, tile).n_tiles == tiles, shape
    return shape


def tile_counts(tiles):
    """``(nz, ny, nx)`` tiles with ``nz * ny * nx == tiles``, as near a cube as the prime factors
    allow: each factor, largest first, goes to the axis with fewest tiles (x, then y, then z on
    ties). 2 -> (1, 1, 2), 4 -> (1, 2, 2), 8 -> (2, 2, 2), 12 -> (2, 2, 3)."""
    primes, n, p = [], int(tiles), 2
    while n > 1:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    counts = [1, 1, 1]
    for f in sorted(primes, reverse=True):
        axis = min((2, 1, 0), key=lambda a: counts[a])
        counts[axis] *= f
    return tuple(counts)


def _text(values):
    """``20,132,132`` for a tuple (``1,2,2;2,2,2`` for a tuple of them), the value itself
    otherwise."""
    if not isinstance(values, (tuple, list)):
        return str(values)
    return ";".join(map(_text, values)) if any(isinstance(v, (tuple, list)) for v in values) \
        else ",".join(map(str, values))


def _build_model(*, ndim, base, depth, tile, factors, voxel_size, out_channels):
    """The random-weight U-Net of a benchmark and its checked tile (an int in 2-D, ``(Z, Y,
    X)`` in 3-D, where ``tile=None`` picks the smallest size per axis with an output of at
    least 64 and ``factors=None`` follows :func:`default_factors` of ``voxel_size``)."""
    from emtile.geometry import default_factors
    from emtile.unet import UNet

    if ndim not in (2, 3):
        raise EmtileError(f"ndim={ndim!r} is not 2 or 3")
    if ndim == 2:
        for name, value in (("factors", factors), ("voxel_size", voxel_size)):
            if value is not None:
                raise EmtileError(f"{name}={_text(value)} only applies with ndim=3")
        model = UNet(base=base, depth=depth, out_channels=out_channels)
        tile = 572 if tile is None else tile
        model.check(tile)
        return model, tile
    voxel_size = (10.0, 10.0, 10.0) if voxel_size is None else voxel_size
    if factors is None:
        factors = default_factors(voxel_size, depth)
    model = UNet(ndim=3, base=base, depth=depth, factors=factors, out_channels=out_channels)
    sm = model.shape_map
    if tile is None:
        tile = tuple(_smallest_tile(sm, a, 64) for a in range(3))
    try:
        tile = tuple(sm.check(tile))
    except EmtileError as exc:
        raise EmtileError(str(exc).replace(f"tile={tile!r}", f"tile={_text(tile)}")) from None
    return model, tile


def _smallest_tile(shape_map, axis, least):
    """The smallest valid input size along ``axis`` whose output is at least ``least``."""
    return next(n for n in shape_map.valid_sizes(1, 8192, axis)
                if n - 2 * shape_map.halos[axis] >= least)


# --------------------------------------------------------------------------- the benchmark


def _model_timer(model, dev, amp_name, fmt, *, tile, batch_size, tiles, warmup):
    """``(time_model, flops)``: a function timing the model alone on ``tiles`` tiles already in
    memory (seconds), after ``warmup`` untimed batches; the FLOPs of one tile."""
    import torch

    from emtile.device import autocast

    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    x = torch.rand(batch_size, model.in_channels, *tile, device=dev)
    x = x.contiguous(memory_format=fmt)
    n_batches = -(-tiles // batch_size)

    def time_model():
        model.to(memory_format=fmt)  # predict restores the default layout when it returns
        with autocast(dev, amp_name), torch.inference_mode():
            model(x)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                model(x)
            _sync(dev)
        return (time.perf_counter() - t0) * tiles / (n_batches * batch_size)

    with autocast(dev, amp_name):
        flops, _ = model_flops(model, x[:1])
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
    return time_model, flops


def _interleaved(model, time_model, kwargs, *, shape, warm_shape, repeat, data, seed, workdir,
                 dev):
    """``repeat`` rounds of (the model alone, ``predict`` of a volume of ``shape``),
    interleaved so that load from other processes hits both alike, after ``predict`` warmed up
    on a one-tile volume (``warm_shape``). Returns ``(model_times, predict_times, forward_times,
    last PredictResult)``: ``forward_times`` the seconds of the model's forward passes inside
    each ``predict``."""
    from emtile.predictor import predict

    model_times, predict_times, forward_times = [], [], []
    with tempfile.TemporaryDirectory(prefix="emtile-bench-", dir=workdir) as tmp:
        tmp = Path(tmp)
        mirrored_volume(tmp / "warm.zarr", warm_shape, source=data, seed=seed)
        predict(model, tmp / "warm.zarr", tmp / "warm-pred.zarr", **kwargs)
        mirrored_volume(tmp / "vol.zarr", shape, source=data, seed=seed)
        for _ in range(repeat):
            model_times.append(time_model())
            _sync(dev)
            t0 = time.perf_counter()
            result = predict(model, tmp / "vol.zarr", tmp / "pred.zarr", **kwargs)
            _sync(dev)
            predict_times.append(time.perf_counter() - t0)
            forward_times.append(result.model_seconds)
    return model_times, predict_times, forward_times, result


def run_bench(*, base=64, depth=4, tile=None, batch_size=1, device="auto", tiles=8,
              channels_last=True, amp=False, num_workers=None, repeat=1, warmup=2, data=None,
              seed=0, workdir=None, progress=False, ndim=2, factors=None, voxel_size=None,
              out_channels=1):
    """Time the model alone and the full ``predict`` path on the same tiles; return the figures.

    Parameters
    ----------
    base, depth : int
        U-Net width and depth (random weights; the time does not depend on them).
    tile : int or tuple of int, optional
        Input tile size, valid for the network: one int (2-D; 572 by default), or in 3-D
        ``(Z, Y, X)`` or one int for a cube (default: the smallest valid size per axis whose
        output is at least 64).
    batch_size : int
        Tiles per forward pass, for both measurements.
    device : {"auto", "cpu", "cuda", "cuda:N"}
    tiles : int
        Tiles timed in each measurement; the predicted volume is exactly that many output tiles
        (:func:`tiles_volume_shape`: in 3-D, a box of :func:`tile_counts` tiles).
    channels_last : bool
        Model and inputs in channels_last memory format (the faster layout on CPU;
        channels_last_3d in 3-D).
    amp : {"off", "auto", "bf16", "fp16"} or bool
        Autocast, as in every command (:func:`emtile.device.resolve_amp`); the mode it
        resolves to is reported as ``amp``.
    num_workers : int, optional
        DataLoader workers for ``predict`` (default: predict's own default).
    repeat : int
        Rounds of (model alone, predict), interleaved; the best of each is reported.
    warmup : int
        Untimed batches before timing the model alone; ``predict`` is warmed up on a one-tile
        volume first (this compiles the stitcher and starts the allocator).
    data : str or Path, optional
        A stack whose slices are mirrored to build the volume (e.g. ISBI's train-volume.tif, or
        FIB-25's raw.tif in 3-D); default random data.
    workdir : str or Path, optional
        Where the temporary volume and output go (default the system temp folder).
    ndim : {2, 3}
        A 2-D U-Net predicting slice by slice, or a 3-D one over ``(Z, Y, X)`` tiles.
    factors : sequence of (int, int, int), optional
        3-D only: the down-sampling factors per level; default
        :func:`emtile.geometry.default_factors` of ``voxel_size``.
    voxel_size : tuple of float, optional
        3-D only: ``(z, y, x)`` in nm for the default factors; default 10, 10, 10.
    out_channels : int
        Output channels (e.g. 3 or 5 affinities); predict writes them as (C, ..) uint8.

    Returns
    -------
    dict
        ``model_s``, ``predict_s``, ``ratio`` (predict / model, best of each), ``ratio_rounds``
        (the median over rounds of each round's predict / model: robust to a machine whose speed
        drifts between rounds), ``forward_ratio`` (the median over rounds of the forward
        passes' seconds inside ``predict`` over the model alone's), ``outside_s`` and
        ``outside_ratio`` (the median over rounds of ``predict``'s seconds outside its forward
        passes, and that over the best time of the model alone: reading, stitching and writing
        on the critical path, measured within each run, so a machine's drift between rounds
        does not enter it), ``out_voxels`` (spatial voxels of the output),
        ``model_vox_s``, ``predict_vox_s``, ``gflop_per_tile``, ``model_gflops``,
        ``predict_gflops``, ``peak_rss``, ``peak_rss_children``, ``cuda_peak`` (bytes or None),
        and the settings used (``ndim``, ``tile`` and ``out_tile`` per axis in 3-D,
        ``factors``, ``out_channels``, ``voxel_size``).
    """
    import torch

    from emtile.device import resolve_amp, resolve_device

    for name, value in (("batch_size", batch_size), ("tiles", tiles), ("repeat", repeat),
                        ("out_channels", out_channels)):
        whole_number(name, value, least=1)
    dev = resolve_device(device)
    amp_name = resolve_amp(amp, dev)
    torch.manual_seed(seed)
    model, tile = _build_model(ndim=ndim, base=base, depth=depth, tile=tile, factors=factors,
                               voxel_size=voxel_size, out_channels=out_channels)
    out_tile = model.output_size(tile)
    model = model.eval().to(dev)
    fmt = (torch.contiguous_format if not channels_last else
           torch.channels_last if ndim == 2 else torch.channels_last_3d)
    model = model.to(memory_format=fmt)

    time_model, flops = _model_timer(model, dev, amp_name, fmt, tile=tile,
                                     batch_size=batch_size, tiles=tiles, warmup=warmup)
    # the whole predict path on a volume of exactly `tiles` output tiles
    shape = tiles_volume_shape(model, tile, tiles)
    kwargs = dict(tile=tile, batch_size=batch_size, device=str(dev), progress=progress,
                  amp=amp_name, channels_last=channels_last, overwrite=True)
    if num_workers is not None:
        kwargs["num_workers"] = num_workers
    model_times, predict_times, forward_times, result = _interleaved(
        model, time_model, kwargs, shape=shape, warm_shape=tiles_volume_shape(model, tile, 1),
        repeat=repeat, data=data, seed=seed, workdir=workdir, dev=dev)
    three = ndim == 3
    settings = {
        "ndim": ndim, "base": base, "depth": depth,
        "factors": [list(f) for f in model.factors], "out_channels": out_channels,
        "voxel_size": list(voxel_size or (10.0,) * 3) if three and factors is None else None,
        "tile": list(tile) if three else tile, "out_tile": list(out_tile) if three else out_tile,
        "tile_counts": list(tile_counts(tiles)) if three else None,
        "batch_size": batch_size, "tiles": tiles, "device": str(dev),
        "threads": torch.get_num_threads(), "channels_last": channels_last,
        "amp": amp_name or "off", "num_workers": num_workers, "volume_shape": shape,
        "repeat": repeat, "data": str(data) if data is not None else "random", "seed": seed,
    }
    out_voxels = tiles * int(np.prod(out_tile if three else (out_tile, out_tile)))
    return {**settings, **_figures(model_times, predict_times, forward_times, result, flops,
                                   tiles=tiles, out_voxels=out_voxels, dev=dev)}


def _figures(model_times, predict_times, forward_times, result, flops, *, tiles, out_voxels,
             dev):
    """The timings, rates and memory :func:`run_bench` reports."""
    import torch

    model_s, predict_s = min(model_times), min(predict_times)
    own, children = peak_rss()
    outside = [p - f for p, f in zip(predict_times, forward_times)]
    return {
        "model_times": model_times, "predict_times": predict_times,
        "forward_times": forward_times, "outside_times": outside,
        "model_s": model_s, "predict_s": predict_s, "ratio": predict_s / model_s,
        "ratio_rounds": statistics.median(p / m for p, m in zip(predict_times, model_times)),
        "outside_s": statistics.median(outside),
        "outside_ratio": statistics.median(outside) / model_s,
        "forward_ratio": statistics.median(f / m for f, m in zip(forward_times, model_times)),
        "out_voxels": out_voxels, "predict_tile_runs": result.tiles,
        "predict_efficiency": result.efficiency,
        "model_vox_s": out_voxels / model_s, "predict_vox_s": out_voxels / predict_s,
        "gflop_per_tile": flops / 1e9,
        "model_gflops": flops * tiles / model_s / 1e9,
        "predict_gflops": flops * tiles / predict_s / 1e9,
        "peak_rss": own, "peak_rss_children": children,
        "cuda_peak": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
    }


def format_bench(r):
    """The report :func:`run_bench` returns, as a short table."""
    gib = 2.0**30
    layout = "channels_last" if r["channels_last"] else "contiguous"
    precision = f"amp {r['amp']}" if r["amp"] not in ("off", None, False) else "fp32"
    device = f"{r['device']} ({r['threads']} threads)" if r["device"] == "cpu" else r["device"]
    workers = "default" if r["num_workers"] is None else r["num_workers"]
    shape = "x".join(map(str, r["volume_shape"]))
    if r.get("ndim", 2) == 3:
        factors = ";".join(",".join(map(str, f)) for f in r["factors"])
        net = (f"3-D UNet base {r['base']} depth {r['depth']} factors {factors}, "
               f"{r['out_channels']} channel{'s' if r['out_channels'] != 1 else ''}, tile "
               f"{'x'.join(map(str, r['tile']))} -> {'x'.join(map(str, r['out_tile']))}")
        where = f"{'x'.join(map(str, r['tile_counts']))} (z x y x x)"
    else:
        net = f"UNet base {r['base']} depth {r['depth']}, tile {r['tile']} -> {r['out_tile']}"
        where = f"{r['tiles'] // r['volume_shape'][0]} per slice"
    lines = [
        f"model     {net}, {r['gflop_per_tile']:.3g} GFLOP per tile",
        f"run       {device}, batch {r['batch_size']}, {layout}, {precision}, workers {workers}",
        f"volume    {shape} ({r['tiles']} tiles, {where}; predict ran "
        f"{r['predict_tile_runs']}), data {r['data']}",
        f"timing    best of {r['repeat']} interleaved round(s)",
        "",
        f"{'':<13}{'time s':>9}{'tiles/s':>9}{'Mvox/s':>9}{'GFLOP/s':>9}",
    ]
    for name, key, vkey, gkey in (("model alone", "model_s", "model_vox_s", "model_gflops"),
                                  ("predict", "predict_s", "predict_vox_s", "predict_gflops")):
        lines.append(f"{name:<13}{r[key]:>9.2f}{r['tiles'] / r[key]:>9.2f}"
                     f"{r[vkey] / 1e6:>9.3f}{r[gkey]:>9.1f}")
    lines += [
        "",
        f"predict / model alone: {r['ratio']:.3f} best / best, {r['ratio_rounds']:.3f} median of "
        f"the rounds' own ratios  (target <= 1.10 on CPU, <= 1.15 on CUDA with amp)",
        f"inside predict: the forward passes {r['forward_ratio']:.3f} x the model alone (median "
        f"of rounds); everything else {r['outside_s']:.3f} s, {r['outside_ratio']:.1%} of the "
        f"model alone (median)",
        f"output voxels/s: {r['predict_vox_s']:.4g} (predict), {r['model_vox_s']:.4g} (model alone)",
        f"peak RSS: {r['peak_rss'] / gib:.2f} GiB (largest DataLoader worker "
        f"{r['peak_rss_children'] / gib:.2f} GiB)",
    ]
    if r["cuda_peak"] is not None:
        lines.append(f"peak CUDA memory: {r['cuda_peak'] / gib:.2f} GiB")
    return "\n".join(lines)
