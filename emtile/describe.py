"""What ``emtile info`` says about anything emtile reads or writes: a volume, a model, a run.

:func:`info` (``emtile.info``) recognises the path and returns a plain dict; :func:`format_info`
prints it. A volume (:func:`describe_volume`) is described by its shape, dtype, chunks,
compression, sizes, voxel size and where it came from, completeness and, for a prediction store,
the model, options, region and mask that made it (its provenance).
A model folder (``config.json``) or bioimage.io package is described from its files alone:
architecture, parameters, valid tile sizes, the data it was trained on and at which voxel size,
its input normalisation, its calibration, its validation scores, each V-Rand named by its
threshold, and the segmentation settings tuned on the validation slices. A training run folder
(``run.json``) is described by its settings, how far it got, its best model and where to find it.
"""

import json
import math
from pathlib import Path

import numpy as np

from emtile import store as _store
from emtile._errors import EmtileError
from emtile.locations import remote
from emtile.stacks import slab_depth, slice_runs
from emtile.tiff import TIFF_SUFFIXES
from emtile.voxels import SOURCE_WORDS
from emtile.volume import open_volume

__all__ = ["info", "describe_volume", "describe_model", "describe_run", "format_info",
           "is_run_folder"]

RUN_FILE = "run.json"  # emtile.training.run.RUN_FILE (not imported: it pulls in torch)


def is_run_folder(path):
    """True for a training run folder (``run.json``, written by ``emtile train``)."""
    p = Path(str(path))
    return p.is_dir() and (p / RUN_FILE).is_file()


def _is_model(path):
    from emtile.package import is_package

    p = Path(str(path))
    return (p.is_dir() and (p / "config.json").is_file()) or (p.exists() and is_package(p))


def info(path, *, stats=False, progress=False, storage_options=None):
    """Describe ``path`` (what ``emtile info`` prints): ``{"what": "volume" | "model" | "run",
    ...}``.

    A volume's dict is :func:`describe_volume`'s (``stats`` and ``progress`` are for it); a
    model folder's or package's :func:`describe_model`'s; a run folder's :func:`describe_run`'s.
    :func:`format_info` turns any of them into text. An object-store URL (``s3://``, ``gs://``,
    ``https://``, with ``storage_options``) is a volume.
    """
    from emtile.locations import at

    path = at(path, storage_options)
    if remote(path) is not None:
        return describe_volume(path, stats=stats, progress=progress)
    if is_run_folder(path):
        return describe_run(path)
    if _is_model(path):
        return describe_model(path)
    return describe_volume(path, stats=stats, progress=progress)


def _metadata(path):
    from emtile.package import is_package, package_metadata
    from emtile.unet import load_metadata

    meta = package_metadata(path) if is_package(path) else load_metadata(path)
    return meta.get("emtile", {}) if isinstance(meta, dict) else {}


def _target_record(path):
    """The model's :func:`emtile.model.target_record` (what its channels are)."""
    from emtile.model import read_metadata, target_record

    return target_record(read_metadata(path))


def _geometry(sm):
    """Halo, smallest valid tile, step and a few valid sizes: numbers when every axis agrees
    (every 2-D model), lists (z, y, x) for an anisotropic 3-D model."""
    if sm.uniform:
        return {"halo": sm.halo, "min_size": sm.min_size, "step": sm.align,
                "valid_sizes": sm.valid_sizes(sm.min_size, 1024), "border": 2 * sm.halo}
    return {"halo": list(sm.halos), "min_size": list(sm.min_sizes), "step": list(sm.aligns),
            "valid_sizes": [sm.valid_sizes(m, m + 8 * a, axis=k)
                            for k, (m, a) in enumerate(zip(sm.min_sizes, sm.aligns))],
            "border": [2 * h for h in sm.halos]}


def describe_model(path):
    """A model folder or package as a dict: ``architecture`` (its config), ``parameters``,
    ``geometry`` (halo, smallest valid tile, step, a few valid sizes), and what its
    ``metadata.json`` records: ``training``, ``voxel_size``, ``normalization``, ``calibration``,
    ``segment`` (the segmentation settings tuned on the validation slices,
    :mod:`emtile.training.segment_tuning`; None when not tuned), ``metrics``."""
    import torch

    from emtile.model import load_model
    from emtile.package import is_package
    from emtile.unet import UNet

    net = load_model(path)  # checks the folder or package completely
    with torch.device("meta"):
        n_params = sum(p.numel() for p in UNet(**net.config).parameters())
    info = _metadata(path)
    target = _target_record(path)
    geometry = _geometry(net.shape_map)
    training = {k: info[k] for k in ("kind", "raw", "labels", "train_slices", "val_slices",
                                     "iteration", "iterations", "seed", "elapsed_s")
                if k in info}
    settings = info.get("settings") or {}
    return {
        "what": "model", "path": str(path),
        "format": "bioimage.io package" if is_package(path) else "emtile model folder",
        "architecture": dict(net.config), "parameters": int(n_params),
        "geometry": geometry,
        "training": training,
        "settings": {k: settings[k] for k in ("lr", "loss", "w0", "class_balance", "freeze_bn",
                                              "tile", "amp", "normalize") if k in settings},
        "voxel_size": info.get("voxel_size"),
        "normalization": info.get("normalization"),
        "calibration": info.get("calibration"),
        "segment": info.get("segment"),
        "metrics": info.get("metrics") or {},
        "target": target.get("target", "boundaries"),
        "offsets": target.get("offsets"),
    }


def describe_run(path):
    """A training run folder as a dict: ``settings``, ``iterations_done`` (of ``last/``),
    ``best`` (:func:`describe_model` of ``best/``, when it exists), ``folders`` and ``log``."""
    p = Path(str(path))
    try:
        run = json.loads((p / RUN_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise EmtileError(f"{str(p / RUN_FILE)!r} cannot be read as a training run: {exc}") from None
    out = {"what": "run", "path": str(p), "settings": run.get("settings", {}),
           "raw": run.get("raw"), "labels": run.get("labels"),
           "train_slices": run.get("train_slices"), "val_slices": run.get("val_slices"),
           "normalization": run.get("normalization"), "voxel_size": run.get("voxel_size"),
           "folders": [n for n in ("best", "last") if (p / n / "config.json").exists()],
           "log": str(p / "train.csv") if (p / "train.csv").exists() else None,
           "iterations_done": None, "best": None}
    if "last" in out["folders"]:
        out["iterations_done"] = _metadata(p / "last").get("iteration")
    if "best" in out["folders"]:
        out["best"] = describe_model(p / "best")
    return out


# --------------------------------------------------------------------------- volumes

def _du(path):
    if remote(path) is not None:  # the objects' sizes, where the store lists them
        loc = remote(path)
        try:
            return int(loc.filesystem().du(loc.fs_path(), total=True))
        except Exception:  # http(s) lists nothing: unknown
            return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_volume(path, *, stats=False, progress=False):
    """Describe a volume: shape, dtype, chunks, compression, sizes, voxel size, completeness.

    Parameters
    ----------
    path : str or Path
        Anything :func:`emtile.open_volume` reads.
    stats : bool
        Also compute min / max / mean, reading the volume slab by slab (bounded memory).

    Returns
    -------
    dict
        ``what`` is ``"volume"``; ``complete`` is True/False for stores emtile wrote and None
        for other sources; ``partial`` (stores converted with ``allow_partial`` from a TIFF cut
        short) says what was expected and what was found, else None. Instance labels
        (converted with ``ids=True``) add ``ids`` (True), ``max_id`` and ``id_count`` (None
        when it was not counted).
    """
    p = remote(path) or Path(str(path))
    meta = _store.emtile_attrs(p) if _store.is_zarr_store(p) else None
    try:
        arr = open_volume(path)
    except EmtileError:
        if meta is None or meta.get("complete"):
            raise
        arr = None  # an emtile store killed before its arrays were written: say so
    out = {
        "path": str(path),
        "shape": tuple(int(s) for s in arr.shape) if arr is not None else None,
        "dtype": str(arr.dtype) if arr is not None else None,
        "chunks": None,
        "compressor": None,
        "bytes_uncompressed": int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
        if arr is not None else None,
        "bytes_on_disk": _du(p) if remote(path) is not None else
        _du(h5[0] if (h5 := _store.split_hdf5_path(path)) else path)
        if Path(str(path)).exists() else None,
        "voxel_size": None,
        "levels": None,
        "kind": None,
        "complete": None,
        "partial": None,
    }
    if hasattr(arr, "chunks") and hasattr(arr, "compressors"):
        out["chunks"] = tuple(int(c) for c in arr.chunks)
        out["compressor"] = ", ".join(_codec_name(c) for c in arr.compressors) or "none"
        shards = getattr(arr, "shards", None)
        out["shards"] = tuple(int(c) for c in shards) if shards else None
    if remote(path) is None and p.suffix.lower() in TIFF_SUFFIXES and p.is_file():
        import tifffile

        with tifffile.TiffFile(p) as tf:
            page = tf.pages[0]
            out["compressor"] = f"TIFF {page.compression.name.lower()}"
            out["chunks"] = (1,) + (tuple(page.chunks) if page.is_tiled else tuple(page.shape[:2]))
    if _store.is_zarr_store(p):
        node = _store.open_zarr(p)
        attrs = node.attrs.asdict()
        meta = attrs.get("emtile")
        if meta is not None:
            out["complete"] = bool(meta.get("complete"))
            out["kind"] = meta.get("kind")
            out["partial"] = meta.get("partial")
            if meta.get("provenance"):  # a prediction: what made it
                out["provenance"] = meta["provenance"]
            if meta.get("target"):  # an affinity prediction: its channels' offsets
                out.update(target=meta["target"], offsets=meta.get("offsets"))
            if meta.get("kind") == "labels" and meta.get("threshold") is not None:
                out["threshold"] = meta["threshold"]  # a predicted mask
            if meta.get("segment"):  # a segmentation: the settings that shaped its labels
                out.update(segment=meta["segment"], objects=meta.get("objects"),
                           source=meta.get("source"))
            if meta.get("ids"):  # instance labels (convert's ids=True)
                out.update(ids=True, max_id=meta.get("max_id"), id_count=meta.get("id_count"))
        ms = _store.multiscales(attrs)
        if ms:
            out["levels"] = len(ms["datasets"])
            out["bytes_on_disk_level0"] = _du(p / ms["datasets"][0]["path"])
            out["voxel_size"] = _store.spatial_scale(ms)
            out["voxel_unit"] = _axes_unit(ms)
            out.update(_voxel_origin(meta))
    if stats and arr is not None:
        out.update(_stats(arr, progress=progress))
    out["what"] = "volume"
    return out


def _axes_unit(ms):
    """The unit of a multiscales entry's spatial axes as ``info`` prints it (``nm``), or None
    when they have none or differ."""
    units = {a.get("unit") for a in ms["axes"] if a.get("type") == "space"}
    unit = units.pop() if len(units) == 1 else None
    return "nm" if unit == "nanometer" else unit


def _voxel_origin(meta):
    """``voxel_size_source`` (one of :data:`emtile.voxels.VOXEL_SOURCES`, or ``"input"`` / ``"prediction"``
    for what predict and segment wrote) and a ``voxel_size_note`` when the size is not known,
    from an emtile store's attributes."""
    if meta is None:
        return {}
    source = meta.get("voxel_size_source")
    if source is None:  # predict and segment copy their input's; older stores recorded none
        source = ("input" if meta.get("provenance") or meta.get("threshold") is not None else
                  "prediction" if meta.get("segment") else None)
    out = {"voxel_size_source": source}
    if meta.get("voxel_size_given", True) is False:
        out["voxel_size_note"] = (
            "not given at conversion; recorded as 1 nm" if source in (None, "not given") else
            f"y, x {SOURCE_WORDS[source]}; no slice spacing there, z recorded as x")
    return out


def _size(n):
    """Bytes as tqdm writes them (three significant digits, SI prefixes: ``7.86MB``)."""
    from tqdm import tqdm

    return "-" if n is None else tqdm.format_sizeof(n, "B")


def _format_partial(partial):
    """One line for a store converted with --allow-partial: what was expected, what was found."""
    found = "x".join(str(n) for n in partial["found"])
    return f"converted {found} (the complete pages); expected {partial['expected']}"


def _format_volume(d):
    """What ``emtile info`` prints for the dict that :func:`describe_volume` returns."""
    complete = {True: "yes", False: "NO (interrupted or still being written)", None: "-"}[d["complete"]]
    lines = [
        f"path          {d['path']}",
        f"shape         {d['shape'] or '-'}",
        f"dtype         {d['dtype'] or '-'}",
        f"chunks        {d['chunks'] or '-'}",
        *([f"shards        {d['shards']} (one file per shard, the chunks inside it)"]
          if d.get("shards") else []),
        f"compressor    {d['compressor'] or '-'}",
        f"uncompressed  {_size(d['bytes_uncompressed'])}",
    ]
    if d.get("bytes_on_disk_level0") is not None and d["bytes_uncompressed"] is not None:
        ratio = d["bytes_uncompressed"] / max(d["bytes_on_disk_level0"], 1)
        lines.append(f"on disk       {_size(d['bytes_on_disk_level0'])} (ratio {ratio:.2f}); "
                     f"whole store {_size(d['bytes_on_disk'])}")
    else:
        lines.append(f"on disk       {_size(d['bytes_on_disk'])}")
    if d["voxel_size"]:
        vs = " x ".join(f"{v:g}" for v in d["voxel_size"].values())
        unit = d.get("voxel_unit", "nm") or "(no unit)"
        source = d.get("voxel_size_source")
        note = (f"  ({d['voxel_size_note']})" if d.get("voxel_size_note") else
                f", {SOURCE_WORDS[source]}" if source in SOURCE_WORDS else "")
        lines.append(f"voxel size    {vs} {unit} ({','.join(d['voxel_size'])}){note}")
    if d["levels"]:
        lines.append(f"levels        {d['levels']}")
    if d["kind"]:
        lines.append(f"kind          {d['kind']}" + (f" ({_ids_text(d)})" if d.get("ids") else ""))
    if d.get("target"):
        lines.append(f"target        {_target_text(d)}")
    lines.append(f"complete      {complete}")
    if d.get("partial"):
        lines.append(f"partial       YES: {_format_partial(d['partial'])}")
    if d.get("provenance"):
        lines += _format_provenance(d["path"], d["provenance"])
    if d.get("threshold") is not None:
        lines.append(f"mask of       cell interior where p > {d['threshold']:g}")
    if d.get("segment"):
        lines += _format_segment(d)
    for key in ("min", "max", "mean"):
        if key in d:
            lines.append(f"{key:<13} {d[key]:.6g}")
    return "\n".join(lines)


def _ids_text(d):
    """``instance ids: 525 ids, max id 525`` (the count only where convert could afford it)."""
    parts = [f"{d['id_count']:,} ids" if d.get("id_count") is not None else None,
             f"max id {d['max_id']:,}" if d.get("max_id") is not None else None]
    shown = ", ".join(p for p in parts if p)
    return "instance ids" + (f": {shown}" if shown else "") + "; 0 = unlabelled"


def _format_segment(d):
    """The lines of a segmentation's record (``emtile segment``'s settings that applied)."""
    settings = ", ".join(f"{k} {'mean' if v is None and k == 'merge_quantile' else v}"
                         for k, v in d["segment"].items() if k != "block")
    objects = d.get("objects")
    return [f"segmented     {d.get('source')}" + (f" into {objects:,} objects" if objects is not None
                                                    else ""),
            f"settings      {settings}"]


def _format_provenance(path, p):
    """The lines of a prediction store's provenance (``emtile predict``'s record)."""
    region = p.get("region") or []
    names = "zyx"[-len(region):] if 0 < len(region) <= 3 else None
    where = ", ".join(f"{names[i] if names else i} {a}:{b}" for i, (a, b) in enumerate(region))
    offset = [a for a, _ in region]
    norm = p.get("normalization") or ["dtype", None, None]
    norm_text = (norm[0] if norm[1] is None else
                 f"{norm[0]} ({norm[1]:.6g} -> 0, {norm[2]:.6g} -> 1)")
    options = (f"tile {'x'.join(str(t) for t in p.get('tile', []))}, tta "
               f"{'on' if p.get('tta') else 'off'}, amp {p.get('amp', 'off')}, blend "
               f"{p.get('blend')}, overlap {','.join(str(o) for o in p.get('overlap', []))}, "
               f"dtype {p.get('dtype')}, normalisation {norm_text}, device {p.get('device')}")
    mask = (f"{path.rstrip('/')}/{p['mask']} (cell interior where p > {p['threshold']:g})"
            if p.get("mask") else f"none: {p['mask_note']}" if p.get("mask_note") else
            "none (predict --threshold T writes one)")
    return [f"model         {p.get('model')}",
            f"input         {p.get('input')}",
            f"region        {where}" + (f" (offset {','.join(map(str, offset))} in the input)"
                                        if any(offset) else " (the whole input)"),
            f"options       {options}",
            f"mask          {mask}"]


def _target_text(d):
    """``affinities, channel k of offset k: -1,0,0; 0,-1,0; 0,0,-1`` (or the target alone)."""
    offsets = d.get("offsets")
    if d["target"] != "affinities" or not offsets:
        return str(d["target"])
    return ("affinities, channel k of offset k (dz,dy,dx; 1 = same object): "
            + "; ".join(",".join(str(v) for v in o) for o in offsets))


def _codec_name(codec):
    name = type(codec).__name__
    cname = getattr(codec, "cname", None)
    level = getattr(codec, "clevel", None)
    if cname is not None:
        cname = getattr(cname, "value", cname)
        return f"{name}({cname}, level {level})"
    return name


def _stats(arr, *, progress=False):
    from tqdm.auto import tqdm

    if arr.ndim < 3:
        data = np.asarray(arr[...], dtype=np.float64)
        return {"min": float(data.min()), "max": float(data.max()), "mean": float(data.mean())}
    chunk_z = (getattr(arr, "chunks", None) or (1,))[0]
    depth = slab_depth(arr.shape, np.dtype(arr.dtype).itemsize, chunk_z=chunk_z)
    lo, hi, total = math.inf, -math.inf, 0.0
    for z0 in tqdm(range(0, arr.shape[0], depth), disable=not progress, desc="stats", delay=1.0):
        slab = np.asarray(arr[z0:z0 + depth])
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
        total += float(slab.sum(dtype=np.float64))
    return {"min": lo, "max": hi, "mean": total / max(int(np.prod(arr.shape)), 1)}


# --------------------------------------------------------------------------- text


def _slices_text(zs):
    """Slice indices as runs: ``[0, 1, 2, 5]`` -> ``0:3,5``."""
    if not isinstance(zs, list) or not all(isinstance(z, int) for z in zs):
        return str(zs)
    return ",".join(str(a) if b == a + 1 else f"{a}:{b}" for a, b in slice_runs(sorted(zs)))


def _factors_text(a):
    """`` (factors 1,2,2; 2,2,2)`` for a model whose down-sampling is not 2 along every axis."""
    factors = a.get("factors")
    if not factors:
        return ""
    return " (factors " + "; ".join(",".join(str(v) for v in np.atleast_1d(f))
                                    for f in factors) + ")"


def _sizes_text(g):
    if isinstance(g["min_size"], list):  # per axis (an anisotropic 3-D model)
        return "; ".join(f"{ax} " + _sizes_text({k: v[i] for k, v in g.items()})
                         for i, ax in enumerate("zyx"[-len(g["min_size"]):]))
    sizes = g["valid_sizes"]
    shown = ", ".join(str(s) for s in sizes[:4])
    if 572 in sizes and sizes.index(572) > 3:
        shown += ", ..., 572"
    return (f"{g['min_size']} + {g['step']} n ({shown}, ...); output = input - {g['border']} "
            f"(context {g['halo']} px per side)")


def _calibration_text(cal):
    if not cal:
        return "none"
    from emtile.training.calibration import calibration_text

    text = calibration_text(cal)
    if cal.get("kept") is False:
        text = "tried and not kept: " + text
    return text


def _model_lines(d, indent=""):
    from emtile.normalize import describe as describe_normalization
    from emtile.training.validation import format_scores

    a, g, t = d["architecture"], d["geometry"], d["training"]
    lines = [
        f"architecture  U-Net {a.get('ndim', 2)}-D{_factors_text(a)}, depth {a['depth']}, "
        f"base {a['base']}, batch norm "
        f"{'on' if a['batch_norm'] else 'off'}, dropout {a['dropout']:g}, "
        f"{a['in_channels']} -> {a['out_channels']} channels",
        f"parameters    {d['parameters']:,}",
        f"tile sizes    {_sizes_text(g)}",
    ]
    if d.get("target"):
        lines.append(f"target        {_target_text(d)}")
    if t:
        where = ", ".join(f"{k} {t[k]}" for k in ("raw", "labels") if k in t)
        sl = ", ".join(f"{k.replace('_', ' ')} {_slices_text(t[k])}"
                       for k in ("train_slices", "val_slices") if k in t)
        lines.append(f"trained on    {where}" + (f"; {sl}" if sl else ""))
        if "iteration" in t:
            lines.append(f"iteration     {t['iteration']} of {t.get('iterations', '?')}"
                         + (f" ({t['kind']} checkpoint)" if t.get("kind") else "")
                         + (f", seed {t['seed']}" if "seed" in t else ""))
    else:
        lines.append("trained on    (not recorded)")
    vs = d["voxel_size"]
    lines.append("voxel size    " + (" x ".join(f"{v:g}" for v in vs) + " nm (z, y, x of the "
                                     "training data)" if vs else "not recorded"))
    lines.append(f"normalisation {describe_normalization(d['normalization'])}")
    lines.append(f"calibration   {_calibration_text(d['calibration'])}")
    cal = d["calibration"] or {}
    lines.append(f"validation    {format_scores(d['metrics']) or 'not recorded'}"
                 + (" (before calibration)" if cal.get("kept") and cal.get("val_after") else ""))
    if cal.get("val_after") and cal.get("kept"):
        lines.append(f"  calibrated  {format_scores(cal['val_after'])}")
    if d.get("segment"):
        from emtile.training.segment_tuning import tuned_text

        lines.append(f"segmentation  {tuned_text(d['segment'])}")
        lines.append("              (emtile segment --settings model starts from them)")
    return [indent + line for line in lines]


def format_info(d):
    """What ``emtile info`` prints for an :func:`info` dict (a volume, a model or a run)."""
    if d["what"] == "volume":
        return _format_volume(d)
    if d["what"] == "model":
        return "\n".join([f"path          {d['path']}", f"kind          {d['format']}",
                          *_model_lines(d)])
    s = d["settings"]
    done = d["iterations_done"]
    lines = [f"path          {d['path']}",
             "kind          emtile training run",
             f"progress      {done if done is not None else 0} of {s.get('iterations', '?')} "
             f"iterations" + (" (resume with emtile train ... --resume)"
                              if done is not None and done < s.get("iterations", 0) else ""),
             f"data          raw {d['raw']}, labels {d['labels']}; train slices "
             f"{_slices_text(d['train_slices'])}, validation slices "
             f"{_slices_text(d['val_slices'])}",
             f"log           {d['log'] or '-'} (emtile show --log {d['path']} -o curve.png)"]
    if d["best"]:
        lines += ["", f"best model    {Path(d['path']) / 'best'}  (emtile predict --model "
                      f"{Path(d['path']) / 'best'} ...)", *_model_lines(d["best"], "  ")]
    else:
        lines.append("best model    none yet")
    return "\n".join(lines)
