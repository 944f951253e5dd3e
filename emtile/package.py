"""bioimage.io model packages: what emtile's U-Net looks like in one, and reading one back.

A package is a ``.zip`` (or the same files unpacked in a folder) holding ``rdf.yaml``, the model
description in the bioimage.io format 0.5, next to the weights and test tensors.
:func:`emtile.export.export_model` writes one from a model folder; :func:`read_package` (reached
through :func:`emtile.model.load`, so a package is a model wherever a model folder is) rebuilds the
:class:`~emtile.unet.UNet` from it, with the model folder's metadata it carries.

The tensor descriptions are built here, as the plain data ``rdf.yaml`` holds, so that the writer
and the reader share one definition (:func:`input_description`, :func:`output_description`):

* input ``(batch, channel, y, x)`` for a 2-D U-Net, ``(batch, channel, z, y, x)`` for a 3-D one,
  each spatial size ``min + n * step`` with ``min`` the smallest valid input along that axis and
  ``step`` the product of its down-sampling factors (``2 ** depth`` in 2-D): exactly
  :class:`~emtile.geometry.ShapeMap`'s valid sizes per axis, padding declared as ``reflect``
  (emtile mirrors context at a volume's border);
* output with the same axes, each spatial size a reference to the input's with offset
  ``-2 * halo`` of that axis: the unpadded convolutions crop the halo inside the model; the
  channels of an affinity model (its ``metadata.json`` records ``target: affinities`` and the
  ``offsets``) are named by their offsets (:func:`affinity_channel_names`);
* pre-processing: the model's recorded input normalisation (:mod:`emtile.normalize`) as
  bioimage.io steps (:func:`preprocessing`): ``scale_linear`` for ``dtype``, ``scale_range``
  over each image for ``minmax`` (percentiles 0 and 100) and ``percentile``;
  post-processing: sigmoid (the U-Net returns logits).

Reading needs neither ``bioimageio.spec`` nor ``bioimageio.core``: ``rdf.yaml`` is parsed with
``yaml.safe_load`` (plain data only) and checked against the description emtile's U-Net with the
named arguments would have; the weights are read with ``torch.load(weights_only=True)``, which
refuses any pickle holding more than tensors and plain containers, after their SHA-256 is checked
against the description. A package that names another architecture, unknown or out-of-bounds
arguments, other tensor shapes or processing, or lacks a file, is refused with one line.
"""

import hashlib
import io
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from emtile._errors import EmtileError

__all__ = ["is_package", "load_package", "read_package", "read_description", "package_metadata",
           "input_description", "output_description", "preprocessing", "affinity_offsets",
           "affinity_channel_names", "space_axes", "POSTPROCESSING", "SCALE_RANGE_EPS"]

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
ARCHITECTURE = {"import_from": "emtile.unet", "callable": "UNet"}
INPUT_ID, OUTPUT_ID = "raw", "probability"
MAX_RDF_BYTES = 16 * 2**20
POSTPROCESSING = [{"id": "sigmoid"}, {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
_FLOAT32 = {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}
SCALE_RANGE_EPS = 1e-6  # bioimage.io's scale_range: (x - lo) / (hi - lo + eps)
DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32",
          "float64", "bool")  # the bioimage.io data types


# --------------------------------------------------------------------------- the description


def space_axes(ndim):
    """The spatial axis ids of a ``ndim``-D model: ``["y", "x"]`` or ``["z", "y", "x"]``."""
    return list("zyx"[3 - ndim:])


def preprocessing(dtype, normalization=None, *, ndim=2):
    """emtile's input mapping for ``dtype`` as bioimage.io pre-processing steps (plain data).

    ``dtype`` normalisation (None, a model that records none): integers are divided by their
    dtype's maximum, as :func:`emtile.normalize.apply` does: cast to float32, multiply by
    ``float32(1 / max)``. ``scale_linear`` computes the same in float32 (a float32 tensor times
    the gain, plus an offset of 0), so uint8 pixels give bit-identical model inputs. Floats and
    booleans are only cast to float32.

    ``minmax`` and ``percentile``: ``scale_range`` over each image's (channel, y, x) with the
    percentiles 0 and 100 or the model's (``(x - lo) / (hi - lo + 1e-6)``); (channel, z, y, x)
    for a 3-D model (``ndim=3``). emtile computes them over the whole volume it predicts; a
    bioimage.io consumer computes them per image, the same for a single image.

    Parameters
    ----------
    dtype : str or numpy dtype
        The input pixels' type (the package's input ``data.type``).
    normalization : str or dict, optional
        The model's recorded input normalisation (``metadata.json``, ``emtile.normalization``:
        see :func:`emtile.normalize.parse`).

    Returns
    -------
    list of dict
        ``[{"id": ..., "kwargs": {...}}, ...]`` as in ``rdf.yaml``, starting and ending with
        ``ensure_dtype: float32``.
    """
    from emtile.normalize import rule_of

    rule = rule_of(normalization)
    dt = np.dtype(dtype)
    if dt.name not in DTYPES:
        raise EmtileError(f"input dtype {dt} cannot be described: bioimage.io inputs are one of "
                          f"{', '.join(DTYPES)}")
    if rule.method != "dtype":
        low, high = (0.0, 100.0) if rule.method == "minmax" else (rule.low, rule.high)
        return [dict(_FLOAT32), {"id": "scale_range", "kwargs": {
            "axes": ["channel"] + space_axes(ndim), "min_percentile": float(low),
            "max_percentile": float(high), "eps": SCALE_RANGE_EPS}}, dict(_FLOAT32)]
    if dt.kind not in "ui":
        return [dict(_FLOAT32)]
    gain = float(np.float32(1.0 / np.iinfo(dt).max))  # the float32 factor emtile multiplies by
    return [dict(_FLOAT32), {"id": "scale_linear", "kwargs": {"gain": gain}}, dict(_FLOAT32)]


def _channels(n, prefix):
    return [prefix] if n == 1 else [f"{prefix}{i}" for i in range(n)]


def input_description(shape_map, *, channels=1, dtype="uint8", normalization=None):
    """The input tensor of a U-Net with ``shape_map`` as ``rdf.yaml`` describes it (a dict).

    Axes ``(batch, channel, y, x)``, or ``(batch, channel, z, y, x)`` for a 3-D shape map. Each
    spatial size is ``min + n * step``: ``min`` is the smallest valid input along that axis and
    ``step`` its alignment (``2 ** depth`` in 2-D; :class:`~emtile.geometry.ShapeMap` has no
    other valid sizes). Missing context at an image's border is mirrored (``pad: reflect``,
    NumPy's ``"reflect"``), as in emtile.
    """
    space = [{"type": "space", "id": axis, "size": {"min": m, "step": step}}
             for axis, m, step in zip(space_axes(shape_map.ndim), shape_map.min_sizes,
                                      shape_map.aligns)]
    return {"id": INPUT_ID, "axes": [
        {"type": "batch"},
        {"type": "channel", "channel_names": _channels(channels, "raw")},
        *space,
    ], "data": {"type": np.dtype(dtype).name}, "pad": {"mode": "reflect"},
        "preprocessing": preprocessing(dtype, normalization, ndim=shape_map.ndim)}


def output_description(shape_map, *, channels=1, channel_names=None):
    """The output tensor (a dict): spatial sizes are the input's minus ``2 * halo`` of each axis
    (a size reference with that offset: the model crops the halo itself), sigmoid
    probabilities; ``channel_names`` (default ``foreground``, ``foreground0``, ...) for the
    channels of an affinity model (:func:`affinity_channel_names`)."""
    space = [{"type": "space", "id": axis,
              "size": {"tensor_id": INPUT_ID, "axis_id": axis, "offset": -2 * halo}}
             for axis, halo in zip(space_axes(shape_map.ndim), shape_map.halos)]
    names = list(channel_names) if channel_names else _channels(channels, "foreground")
    return {"id": OUTPUT_ID, "axes": [
        {"type": "batch"},
        {"type": "channel", "channel_names": names},
        *space,
    ], "data": {"type": "float32", "range": [0.0, 1.0]},
        "postprocessing": [dict(p) for p in POSTPROCESSING]}


def affinity_offsets(meta, *, channels, ndim):
    """The offsets of an affinity model from its ``metadata.json`` (``meta``; the entries under
    ``emtile``, or at the top): a list of ``channels`` offsets of ``ndim`` integers when it
    records ``target: affinities``, None for any other model; a one-line error when the record
    does not fit the network."""
    info = meta.get("emtile", meta) if isinstance(meta, dict) else {}
    if not isinstance(info, dict) or info.get("target") != "affinities":
        return None
    offsets = info.get("offsets")
    ok = (isinstance(offsets, list) and len(offsets) == channels
          and all(isinstance(o, (list, tuple)) and len(o) == ndim
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in o)
                  for o in offsets))
    if not ok:
        raise EmtileError(f"metadata.json records target='affinities' with offsets={offsets!r}; "
                          f"expected {channels} offset{'s' if channels != 1 else ''} (one per "
                          f"output channel) of {ndim} integers each")
    return [[int(v) for v in o] for o in offsets]


def affinity_channel_names(offsets):
    """Channel names of an affinity model, one per offset: ``aff_dz-1_dy0_dx0`` for
    ``(-1, 0, 0)`` (``aff_dy-1_dx0`` in 2-D)."""
    return ["aff_" + "_".join(f"d{axis}{v}" for axis, v in zip(space_axes(len(o)), o))
            for o in offsets]


# --------------------------------------------------------------------------- reading


def is_package(path):
    """True for a path that names a bioimage.io package: a ``.zip``, or a folder with
    ``rdf.yaml`` (or ``bioimageio.yaml``) and no emtile ``config.json``."""
    p = Path(path)
    if p.is_dir():
        return (not (p / "config.json").exists()
                and any((p / name).is_file() for name in RDF_NAMES))
    return p.suffix.lower() == ".zip"


class _Files:
    """The files of a package, zipped or unpacked; ``read(name)`` -> bytes or a one-line error."""

    def __init__(self, path):
        self.path, self.label = Path(path), f"bioimage.io package {str(path)!r}"
        self.zip = None
        if not self.path.exists():
            raise EmtileError(f"{self.label} does not exist")
        if self.path.is_file():
            try:
                self.zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise EmtileError(f"{self.label} is not a zip file ({exc}): a bioimage.io "
                                  f"package is a zip with rdf.yaml, written by emtile export"
                                  ) from None
            self.names = set(self.zip.namelist())
        else:
            self.names = {p.name for p in self.path.iterdir() if p.is_file()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.zip is not None:
            self.zip.close()

    def read(self, name, *, field, max_bytes):
        """The bytes of ``name`` (``field`` says where rdf.yaml names it)."""
        pure = PurePosixPath(str(name))
        if "://" in str(name) or pure.is_absolute() or ".." in pure.parts or len(pure.parts) != 1:
            raise EmtileError(f"{self.label}: {field}={str(name)!r} is not a file in the package "
                              f"(emtile reads only files stored in the package, by plain name)")
        if str(pure) not in self.names:
            raise EmtileError(f"{self.label} has no file {str(pure)!r} (named by {field} in "
                              f"rdf.yaml): the package is incomplete")
        size = (self.zip.getinfo(str(pure)).file_size if self.zip is not None
                else (self.path / str(pure)).stat().st_size)
        if size > max_bytes:
            raise EmtileError(f"{self.label}: {str(pure)!r} ({field}) has {size:,} bytes, more "
                              f"than {max_bytes:,} that this model can need")
        if self.zip is not None:
            return self.zip.read(str(pure))
        return (self.path / str(pure)).read_bytes()


def read_description(path):
    """The parsed ``rdf.yaml`` (a dict) of the package at ``path``; nothing in it is checked
    beyond being a YAML mapping of a model (see :func:`load_package` for the checks)."""
    with _Files(path) as files:
        return _read_rdf(files)


def _read_rdf(files):
    import yaml

    name = next((n for n in RDF_NAMES if n in files.names), None)
    if name is None:
        raise EmtileError(f"{files.label} has no rdf.yaml (nor bioimageio.yaml): it is not a "
                          f"bioimage.io package")
    text = files.read(name, field="the description", max_bytes=MAX_RDF_BYTES)
    try:
        rdf = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EmtileError(f"{files.label}: {name} is not valid YAML ({first})") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        got = rdf.get("type") if isinstance(rdf, dict) else type(rdf).__name__
        raise EmtileError(f"{files.label}: {name} describes type={got!r}, not a model")
    version = str(rdf.get("format_version", ""))
    if not version.startswith("0.5."):
        raise EmtileError(f"{files.label}: format_version={version!r}; emtile reads bioimage.io "
                          f"model descriptions of format 0.5")
    return rdf


def package_metadata(path):
    """The model folder's ``metadata.json`` that the package at ``path`` carries (under
    ``config.emtile.metadata`` in rdf.yaml), or {}."""
    with _Files(path) as files:
        return _recorded_metadata(_read_rdf(files))


def _recorded_metadata(rdf):
    config = rdf.get("config")
    emtile = config.get("emtile") if isinstance(config, dict) else None
    meta = emtile.get("metadata") if isinstance(emtile, dict) else None
    return meta if isinstance(meta, dict) else {}


def _get(rdf, path, label):
    """``rdf[a][b][0]...`` for ``path`` "a.b.0", or a one-line error naming the missing field."""
    value = rdf
    for key in path.split("."):
        try:
            value = value[int(key)] if key.isdigit() else value[key]
        except (KeyError, IndexError, TypeError, ValueError):
            raise EmtileError(f"{label}: rdf.yaml has no {path}") from None
    return value


def _architecture(rdf, label):
    """The UNet keyword arguments named by the package, refusing any other architecture."""
    entry = _get(rdf, "weights", label)
    if not isinstance(entry, dict) or not isinstance(entry.get("pytorch_state_dict"), dict):
        formats = sorted(entry) if isinstance(entry, dict) else []
        raise EmtileError(f"{label} has no pytorch_state_dict weights (it has "
                          f"{', '.join(formats) or 'none'}); emtile reads pytorch_state_dict "
                          f"weights of emtile.unet.UNet")
    arch = _get(rdf, "weights.pytorch_state_dict.architecture", label)
    named = {k: arch.get(k) for k in ARCHITECTURE} if isinstance(arch, dict) else {}
    if named != ARCHITECTURE:
        what = (f"{named.get('import_from')}.{named.get('callable')}" if named
                else repr(arch))
        raise EmtileError(f"{label}: the architecture is {what}, not emtile.unet.UNet; emtile "
                          f"loads only its own U-Net")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise EmtileError(f"{label}: architecture kwargs={kwargs!r} is not a mapping")
    return kwargs


def _axes_signature(axes):
    """What emtile compares of a tensor's axes: type, id, channel count, size, halo."""
    out = []
    for a in axes if isinstance(axes, list) else [axes]:
        if not isinstance(a, dict):
            out.append(repr(a))
        elif a.get("type") == "batch":
            out.append(("batch", a.get("size")))
        elif a.get("type") == "channel":
            names = a.get("channel_names")
            out.append(("channel", len(names) if isinstance(names, list) else names))
        else:
            size = a.get("size")
            if isinstance(size, dict) and "tensor_id" in size:
                size = {"tensor_id": size["tensor_id"], "axis_id": size.get("axis_id"),
                        "offset": size.get("offset", 0)}
            out.append((a.get("type"), a.get("id"), size, a.get("halo")))
    return out


def _processing_signature(steps):
    """The steps' ids and kwargs, with numbers (gains, offsets, percentiles, eps) as the float32
    numbers applied."""
    out = []
    for s in steps if isinstance(steps, list) else [steps]:
        if not isinstance(s, dict):
            out.append(repr(s))
            continue
        kwargs = dict(s.get("kwargs") or {})
        for key in ("gain", "offset", "eps", "min_percentile", "max_percentile"):
            if key in kwargs:  # YAML reads 1e-06 as text: compare the numbers
                try:
                    kwargs[key] = float(np.float32(float(kwargs[key])))
                except (TypeError, ValueError):
                    pass
        if s.get("id") == "scale_linear":
            kwargs.setdefault("offset", 0.0)
        out.append((s.get("id"), kwargs))
    return out


def _check_tensors(rdf, shape_map, config, label):
    """Refuse tensor descriptions that are not this U-Net's geometry and processing."""
    inputs, outputs = _get(rdf, "inputs", label), _get(rdf, "outputs", label)
    counts = [len(t) if isinstance(t, list) else "?" for t in (inputs, outputs)]
    if counts != [1, 1] or not isinstance(inputs[0], dict) or not isinstance(outputs[0], dict):
        raise EmtileError(f"{label} has {counts[0]} inputs and {counts[1]} outputs; emtile's UNet "
                          f"has one of each")
    dtype = _get(rdf, "inputs.0.data.type", label)
    if dtype not in DTYPES:
        raise EmtileError(f"{label}: inputs[0].data.type={dtype!r} is not a bioimage.io type")
    recorded = _recorded_metadata(rdf).get("emtile", {})
    try:
        want_in = input_description(shape_map, channels=config["in_channels"], dtype=dtype,
                                    normalization=recorded.get("normalization")
                                    if isinstance(recorded, dict) else None)
    except EmtileError as exc:
        raise EmtileError(f"{label}: config.emtile.metadata: {exc}") from None
    want_out = output_description(shape_map, channels=config["out_channels"])
    want_out["axes"] = [dict(a, size=dict(a["size"], tensor_id=inputs[0].get("id")))
                        if isinstance(a.get("size"), dict) and "tensor_id" in a["size"] else a
                        for a in want_out["axes"]]
    unet = (f"emtile's UNet (depth {shape_map.depth}, {config['in_channels']} in, "
            f"{config['out_channels']} out channels)")
    for where, got, want in (("inputs[0].axes", inputs[0].get("axes"), want_in["axes"]),
                             ("outputs[0].axes", outputs[0].get("axes"), want_out["axes"])):
        g, w = _axes_signature(got), _axes_signature(want)
        if g != w:
            i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            shown_g = g[i] if i < len(g) else "nothing"
            shown_w = w[i] if i < len(w) else "nothing"
            raise EmtileError(f"{label}: {where}[{i}] is {shown_g}; {unet} needs {shown_w} "
                              f"(axes batch, channel, {', '.join(space_axes(shape_map.ndim))})")
    for where, got, want in (
            ("inputs[0].preprocessing", inputs[0].get("preprocessing", []),
             want_in["preprocessing"]),
            ("outputs[0].postprocessing", outputs[0].get("postprocessing", []),
             want_out["postprocessing"])):
        if _processing_signature(got) != _processing_signature(want):
            raise EmtileError(f"{label}: {where} is {_processing_signature(got)}; emtile runs "
                              f"{_processing_signature(want)} for {dtype} inputs")


def _meta_model(config, label):
    """UNet(**config) on the meta device: its shape map, full config and parameter shapes, with
    no memory and no weights; the constructor's bounds checks run first."""
    import torch

    from emtile.unet import UNet

    try:
        with torch.device("meta"):
            net = UNet(**config)
    except TypeError as exc:
        raise EmtileError(f"{label}: architecture kwargs has unknown arguments ({exc})") from None
    except EmtileError as exc:
        raise EmtileError(f"{label}: architecture kwargs are not valid: {exc}") from None
    return net


def _read_weights(files, rdf, expected, label):
    """The state dict: SHA-256 checked, then ``torch.load(weights_only=True)``, then checked
    key by key against the shapes ``expected``."""
    import torch

    entry = _get(rdf, "weights.pytorch_state_dict", label)
    source = _get(rdf, "weights.pytorch_state_dict.source", label)
    nbytes = sum(t.numel() * t.element_size() for t in expected.values())
    data = files.read(source, field="weights.pytorch_state_dict.source",
                      max_bytes=nbytes + 2**20 + nbytes // 10)
    sha = entry.get("sha256")
    if sha is not None and hashlib.sha256(data).hexdigest() != str(sha).lower():
        raise EmtileError(f"{label}: {source!r} does not match the sha256 in rdf.yaml (the "
                          f"weights were changed or damaged)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ... from a foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmtileError(f"{label}: {source!r} is not a plain state dict: torch.load("
                          f"weights_only=True) refused it ({first[:200]}); emtile never "
                          f"unpickles anything else") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise EmtileError(f"{label}: {source!r} holds a {type(state).__name__}, not a state dict "
                          f"of named tensors")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    missing, unexpected = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    wrong = [k for k in want if k in shapes and shapes[k] != want[k]]
    if missing or unexpected or wrong:
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
                if unexpected else f"{wrong[0]!r} has shape {shapes[wrong[0]]}, expected "
                f"{want[wrong[0]]}")
        raise EmtileError(f"{label}: the weights do not match the architecture kwargs: {what}")
    return state


def read_package(path, *, device="cpu"):
    """``(UNet, metadata)`` of a bioimage.io package written by
    :func:`emtile.export.export_model` (a ``.zip`` or an unpacked folder), read once.

    The package must name ``emtile.unet.UNet`` with arguments that pass its bounds checks,
    describe exactly that U-Net's tensors (:func:`input_description`, :func:`output_description`)
    and hold ``pytorch_state_dict`` weights that ``torch.load(weights_only=True)`` reads, with
    the SHA-256 recorded. The model is returned in eval mode, identical to the folder it was
    exported from; the metadata is that folder's ``metadata.json`` (:func:`package_metadata`).
    """
    from emtile.unet import UNet

    with _Files(path) as files:
        label = files.label
        rdf = _read_rdf(files)
        config = _architecture(rdf, label)
        meta = _meta_model(config, label)
        _check_tensors(rdf, meta.shape_map, meta.config, label)
        state = _read_weights(files, rdf, meta.state_dict(), label)
    model = UNet(**config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), _recorded_metadata(rdf)


def load_package(path, device="cpu"):
    """The :class:`~emtile.unet.UNet` of a bioimage.io package (:func:`read_package`'s)."""
    return read_package(path, device=device)[0]
