"""``emtile export``: a model folder as a bioimage.io model package (format 0.5).

The package is a zip in the community's exchange format for trained models (bioimage.io), checked
by ``bioimageio.core``'s ``test_model`` in emtile's tests:

* ``rdf.yaml``, the model description, built and validated with ``bioimageio.spec``: the tensors
  of :mod:`emtile.package` (the valid-convolution geometry exactly: input sizes
  ``min + n * 2**depth``, output sizes the input's minus ``2 * halo``; per axis for a 3-D U-Net,
  whose tensors are ``(batch, channel, z, y, x)``; emtile's input scaling and the sigmoid; an
  affinity model's channels named by their offsets), authors,
  licence, citations (the U-Net paper; the ISBI 2012 data unless told otherwise), and the
  training metadata (``metadata.json``) under ``config.emtile`` and as an attachment;
* ``weights.pt``: the state dict saved by ``torch.save`` (tensors only, so it loads with
  ``torch.load(weights_only=True)``), architecture ``emtile.unet.UNet`` with the model's
  arguments; optionally ``weights.torchscript.pt``, traced;
* ``test_input.npy`` / ``test_output.npy``: a crop of a real slice (a block of a real volume for a
  3-D model), of a valid size, and the model's float32 probabilities for it (what
  ``bioimageio.core`` checks the package against); the same as TIFF sample tensors and a 2:1
  cover image (a 3-D model's: the middle section of the output and the input beside it);
* ``README.md``, written from the model's metadata.

Writing needs the ``bioimageio`` extra (``pip install 'emtile[bioimageio]'``); reading a package
back (:func:`emtile.unet.load_model`) needs nothing beyond emtile. The zip is written next to its
destination and moved there only once it is complete and reads back, through emtile's own reader,
to a model that reproduces the test output.
"""

import copy
import json
import os
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emtile._errors import EmtileError
from emtile.package import (INPUT_ID, OUTPUT_ID, affinity_channel_names, affinity_offsets,
                            input_description, is_package, output_description)

__all__ = ["export_model", "ExportResult"]

DEFAULT_AUTHOR = "emtile contributors"
TEST_OUTPUT = 64  # the test crop is the smallest valid input whose output is at least this wide
TEST_OUTPUT_3D = 16  # the same per axis for a 3-D model's test block
CITE_UNET = {"text": "Ronneberger O, Fischer P, Brox T (2015). U-Net: Convolutional Networks for "
                     "Biomedical Image Segmentation. MICCAI 2015, LNCS 9351, 234-241.",
             "doi": "10.1007/978-3-319-24574-4_28"}
CITE_ISBI = [
    {"text": "Arganda-Carreras I, Turaga SC, Berger DR, et al. (2015). Crowdsourcing the creation "
             "of image segmentation algorithms for connectomics. Front. Neuroanat. 9:142 (the "
             "ISBI 2012 challenge data).", "doi": "10.3389/fnana.2015.00142"},
    {"text": "Cardona A, Saalfeld S, Preibisch S, et al. (2010). An integrated micro- and "
             "macroarchitectural analysis of the Drosophila brain by computer-assisted serial "
             "section electron microscopy. PLoS Biol 8(10): e1000333 (the ISBI 2012 images).",
     "doi": "10.1371/journal.pbio.1000333"},
]
TAGS = ["emtile", "unet", "2d", "pytorch", "electron-microscopy", "semantic-segmentation"]
TAGS_3D = ["emtile", "unet", "3d", "pytorch", "electron-microscopy", "semantic-segmentation"]


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    path: str
    format_version: str
    min_size: object  # int (2-D), or one per axis (z, y, x) for a 3-D model
    step: object
    halo: object
    test_input: tuple  # (Y, X) of the test crop; (Z, Y, X) of a 3-D model's test block
    test_output: tuple
    sample: str  # where the test crop comes from
    weights: tuple  # weight formats written

    def __str__(self):
        if isinstance(self.min_size, tuple):
            sizes = ", ".join(f"{a} {m} + n*{s}" for a, m, s in
                              zip("zyx", self.min_size, self.step))
            geometry = (f"input {sizes}, output = input - "
                        f"({', '.join(str(2 * h) for h in self.halo)})")
        else:
            geometry = (f"input {self.min_size} + n*{self.step} per axis, output = input - "
                        f"{2 * self.halo}")
        return (f"{self.path}: bioimage.io model {self.format_version}, {geometry}; test tensors "
                f"{'x'.join(map(str, self.test_input))} -> {'x'.join(map(str, self.test_output))} "
                f"({self.sample}); weights {', '.join(self.weights)}")


# --------------------------------------------------------------------------- inputs


def _spec():
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise EmtileError("emtile export needs bioimageio.spec: pip install 'emtile[bioimageio]'"
                          ) from None
    from bioimageio.spec.model import v0_5

    return v0_5


def _check_destination(path, overwrite, inputs):
    """The package to write, checked by the output rule (:func:`emtile.store.check_output`); an
    existing file is replaced only when it is a bioimage.io package."""
    from emtile import store

    path = Path(path)
    if path.suffix.lower() != ".zip":
        raise EmtileError(f"path={str(path)!r} must end in .zip (a bioimage.io package is a zip)")
    store.check_output(None, inputs=inputs, files={"path": path}, overwrite=overwrite)
    if path.exists():
        import zipfile

        ours = zipfile.is_zipfile(path)
        if ours:
            with zipfile.ZipFile(path) as z:
                ours = "rdf.yaml" in z.namelist()
        if not ours:
            raise EmtileError(f"path={str(path)!r} exists and is not a bioimage.io package; "
                              f"emtile replaces only its own kind of file")
    return path


def _default_slice(meta):
    """The first validation slice the model was trained with, else its first training slice."""
    for key in ("val_slices", "train_slices"):
        zs = meta.get(key)
        if isinstance(zs, list) and zs and isinstance(zs[0], int):
            return zs[0]
    return 0


def _open_sample(sample, meta, noun, kind):
    """``(sample, array)``: the volume to cut the test input from, ``sample`` or else the raw
    volume the model's metadata records (one line naming ``sample=`` when there is none)."""
    from emtile.volume import open_volume

    if sample is None:
        sample = meta.get("raw")
        if not isinstance(sample, str) or not Path(sample).exists():
            raise EmtileError(f"no sample {noun} for the test tensors: the model's metadata.json "
                              f"records raw={sample!r}, which is not an existing volume; give "
                              f"sample= ({kind} to cut the test input from)")
    return sample, open_volume(sample)


def _test_crop(shape_map, sample, sample_slice, meta):
    """A centred crop of one slice of ``sample``, of the smallest valid size whose output is at
    least ``TEST_OUTPUT`` wide (context mirrored if the image is smaller) -> (crop, description)."""
    from emtile.geometry import read_window

    sample, arr = _open_sample(sample, meta, "image", "a volume")
    if arr.ndim not in (2, 3) or np.dtype(arr.dtype).kind not in "biuf":
        raise EmtileError(f"sample={str(sample)!r} has shape {tuple(arr.shape)} and dtype "
                          f"{arr.dtype}; expected a (Z, Y, X) or (Y, X) volume of numbers")
    z = _default_slice(meta) if sample_slice is None else sample_slice
    if arr.ndim == 3 and (not isinstance(z, int) or not 0 <= z < arr.shape[0]):
        raise EmtileError(f"sample_slice={z!r} is outside the sample's {arr.shape[0]} slices "
                          f"(0 to {arr.shape[0] - 1})")
    short = TEST_OUTPUT - shape_map.output_size(shape_map.min_size)  # valid: min + k * align
    n = shape_map.min_size + shape_map.align * max(0, -(-short // shape_map.align))
    start = [(s - n) // 2 for s in arr.shape[-2:]]
    lead = [z] if arr.ndim == 3 else []  # only the window is read (mirrored past the border)
    crop = read_window(arr, lead + start, [v + 1 for v in lead] + [a + n for a in start])
    crop = crop.reshape(n, n)
    where = f"slice {z} of {Path(sample).name}" if arr.ndim == 3 else Path(sample).name
    return np.ascontiguousarray(crop), f"{n}x{n} crop of {where}"


def _test_block(shape_map, sample, sample_slice, meta):
    """A 3-D model's test input: a centred block of the volume ``sample``, of the smallest valid
    size per axis whose output is at least ``TEST_OUTPUT_3D`` along it (context mirrored where
    the volume is smaller) -> (block, description)."""
    from emtile.geometry import read_window

    if sample_slice is not None:
        raise EmtileError(f"sample_slice={sample_slice} picks a slice for a 2-D model's test "
                          f"input; a 3-D model's is a centred block of sample")
    sample, arr = _open_sample(sample, meta, "volume", "a (Z, Y, X) volume")
    if arr.ndim != 3 or np.dtype(arr.dtype).kind not in "biuf":
        raise EmtileError(f"sample={str(sample)!r} has shape {tuple(arr.shape)} and dtype "
                          f"{arr.dtype}; a 3-D model needs a (Z, Y, X) volume of numbers")
    size = []
    for a in range(3):
        m, step = shape_map.min_sizes[a], shape_map.aligns[a]
        short = TEST_OUTPUT_3D - shape_map.output_along(m, a)
        size.append(m + step * max(0, -(-short // step)))
    start = [(s - n) // 2 for s, n in zip(arr.shape, size)]
    block = read_window(arr, start, [a + n for a, n in zip(start, size)]).reshape(size)
    return (np.ascontiguousarray(block),
            f"{'x'.join(map(str, size))} block at the centre of {Path(sample).name}")


def _model_input(crop, normalization):
    """``crop`` normalised as the package's pre-processing describes it (float32): the
    ``dtype`` rule as emtile applies it, or ``scale_range`` over the crop (its own percentiles,
    ``(x - lo) / (hi - lo + eps)``, as a bioimage.io consumer computes it per image)."""
    from emtile.normalize import apply, rule_of
    from emtile.package import SCALE_RANGE_EPS

    rule = rule_of(normalization)
    if rule.method == "dtype":
        return apply(crop, "dtype")
    low, high = (0.0, 100.0) if rule.method == "minmax" else (rule.low, rule.high)
    x = np.asarray(crop, np.float32)
    lo, hi = np.percentile(x, [low, high])
    return (x - np.float32(lo)) / np.float32(hi - lo + SCALE_RANGE_EPS)


def _probabilities(net, crop, normalization=None):
    """The model's float32 probabilities for ``crop`` (Y, X) -> (1, C, Y', X') ((Z, Y, X) ->
    (1, C, Z', Y', X') for a 3-D model), as emtile computes
    them: the input normalised (:func:`_model_input`), the U-Net, a float32 sigmoid."""
    import torch

    x = torch.from_numpy(_model_input(crop, normalization)[None, None].copy())
    with torch.inference_mode():
        return torch.sigmoid(net.eval()(x).float()).numpy()


# --------------------------------------------------------------------------- the files


def _write_torchscript(net, crop, path):
    """Trace the U-Net into ``path``; check the trace against the model at two valid sizes (the
    crop and the smallest), so a size frozen into the trace cannot pass."""
    import torch

    from emtile.normalize import dtype_scaled as input_to_float

    x = torch.from_numpy(input_to_float(crop)[None, None].copy())
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracing warns about its deprecation and the shape checks
        traced = torch.jit.trace(_traceable(net.eval()), x)
        m = net.min_sizes
        other = torch.rand(2, net.in_channels, *m[:-1], m[-1] + net.aligns[-1],
                           generator=torch.Generator().manual_seed(0))
        for t in (x, other):
            if not torch.equal(traced(t), net(t)):
                raise EmtileError("the traced TorchScript model differs from the U-Net; export "
                                  "with torchscript=False")
        torch.jit.save(traced, str(path))


def _traceable(net):
    """``net``, or, where its halo, alignment and smallest size differ per axis (a 3-D U-Net with
    factors such as (1, 2, 2)), a shallow copy whose one-number properties (``halo``, ``align``,
    ``min_size``) are None: ``torch.jit.trace`` looks up every attribute of the module, and those
    properties raise for such a net. The copy shares the layers; the trace is the same."""
    if net.shape_map.uniform:
        return net
    view = copy.copy(net)
    view.__class__ = type("UNetPerAxis", (type(net),),
                          {"halo": None, "align": None, "min_size": None})
    return view


def _cover(crop, probs, path):
    """A 2:1 cover: the test crop beside the first output channel (grey, centred, black border);
    for a 3-D model the output's middle section beside the input section it lies in."""
    from PIL import Image

    from emtile.normalize import dtype_scaled as input_to_float

    p = probs[0, 0]
    if crop.ndim == 3:  # the output's middle section and the input's section under it
        mid = p.shape[0] // 2
        crop, p = crop[(crop.shape[0] - p.shape[0]) // 2 + mid], p[mid]
    n, w = crop.shape
    left = np.clip(input_to_float(crop), 0, 1)
    right = np.zeros((n, w), np.float32)
    o, ox = (n - p.shape[0]) // 2, (w - p.shape[1]) // 2
    right[o:o + p.shape[0], ox:ox + p.shape[1]] = p
    img = np.rint(np.concatenate([left, right], axis=1) * 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def _preprocessing_text(normalization):
    """The README's words for the input normalisation."""
    from emtile.normalize import rule_of

    rule = rule_of(normalization)
    if rule.method == "dtype":
        return ("integer pixels divided by their dtype's maximum (uint8: x / 255) in float32, "
                "as emtile does")
    low, high = (0, 100) if rule.method == "minmax" else (rule.low, rule.high)
    return (f"each image scaled so that its {low:g}th and {high:g}th percentiles become 0 and 1 "
            f"(emtile's {str(rule)!r} normalisation; emtile computes them over the whole volume "
            f"it predicts)")


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{value[0]}..{value[-1]} ({len(value)} values)"
    return str(value)


def _io_lines(sm, info):
    """The README's input and output of a 2-D U-Net."""
    return [f"- input `{INPUT_ID}` (batch, channel, y, x): each spatial size must be "
            f"{sm.min_size} + n * {sm.align} (n = 0, 1, ...; the valid sizes of a depth-"
            f"{sm.depth} U-Net with unpadded 3x3 convolutions)",
            f"- output `{OUTPUT_ID}` (batch, channel, y, x): each spatial size is the input's "
            f"minus {2 * sm.halo}; output pixel (i, j) is the centre of the input, "
            f"{sm.halo} pixels in from each side",
            f"- pre-processing: {_preprocessing_text(info.get('normalization'))}; "
            "post-processing: sigmoid",
            f"- to predict a whole image, pad it by {sm.halo} pixels per side, mirroring "
            f"(NumPy `reflect`, declared as the input's padding), up to a valid size, and keep "
            f"origins of tiles on multiples of {sm.align} so that tiles agree exactly (emtile "
            f"predict does this)", ""]


def _io_lines_3d(sm, info, offsets):
    """The README's input and output of a 3-D U-Net (per axis), and its channels."""
    def per_axis(values, unit=""):
        return ", ".join(f"{a} {v}{unit}" for a, v in zip("zyx", values))

    sizes = ", ".join(f"{a} {m} + n * {s}" for a, m, s in zip("zyx", sm.min_sizes, sm.aligns))
    lines = [f"- input `{INPUT_ID}` (batch, channel, z, y, x): the spatial sizes must be {sizes} "
             f"(n = 0, 1, ... per axis; the valid sizes of a depth-{sm.depth} U-Net with "
             f"unpadded convolutions, down-sampling factors {sm.factors} and kernels "
             f"{sm.kernels} per level)",
             f"- output `{OUTPUT_ID}` (batch, channel, z, y, x): each spatial size is the input's "
             f"minus twice the halo ({per_axis([2 * h for h in sm.halos])}); output voxel "
             f"(k, i, j) is the centre of the input, {per_axis(sm.halos, ' voxels')} in from "
             f"each side"]
    if offsets is not None:
        lines.append("- output channels: affinities, one per offset (dz, dy, dx) in voxels: "
                     "channel k at voxel v is the probability that v and v + offset_k lie in "
                     "the same object (1 = same object); "
                     + ", ".join(f"`{n}` {tuple(o)}" for n, o in
                                 zip(affinity_channel_names(offsets), offsets)))
    lines += [f"- pre-processing: {_preprocessing_text(info.get('normalization'))}; "
              "post-processing: sigmoid",
              f"- to predict a whole volume, pad it by the halo per side, mirroring (NumPy "
              f"`reflect`, declared as the input's padding), up to a valid size, and keep tile "
              f"origins on multiples of {per_axis(sm.aligns)} so that tiles agree exactly "
              f"(emtile predict does this)", ""]
    return lines


def _readme(*, name, description, net, meta, crop_info, test_in, test_out, cite_isbi, authors,
            license, offsets=None):
    """The package's README.md, written from the model's config and metadata."""
    sm, cfg = net.shape_map, net.config
    info = meta.get("emtile", meta) if isinstance(meta, dict) else {}
    lines = [f"# {name}", "", description, "",
             "Exported by emtile (`emtile export`) from a model folder; emtile reads this package "
             "back with `emtile predict --model model.zip`.", "",
             "## Architecture", "",
             f"The valid-convolution U-Net of Ronneberger et al. (2015), `emtile.unet.UNet` with "
             f"`{json.dumps(cfg)}` ({sum(p.numel() for p in net.parameters()):,} parameters). "
             f"It returns logits; the package's post-processing applies the sigmoid.", "",
             "## Input and output", ""] + (_io_lines(sm, info) if sm.ndim == 2 else
                                           _io_lines_3d(sm, info, offsets)) + [
             f"Test tensors: a {crop_info} ({test_in} -> {test_out}).", ""]
    lines += ["## Training", ""]
    keys = ("raw", "labels", "train_slices", "val_slices", "iteration", "iterations", "seed",
            "input_size", "output_size", "elapsed_s")
    rows = [f"- {k}: {_fmt(info[k])}" for k in keys if k in info]
    settings = info.get("settings")
    if isinstance(settings, dict):
        rows.append("- settings: " + ", ".join(f"{k}={_fmt(v)}"
                                               for k, v in sorted(settings.items())))
    calibration = info.get("calibration") if isinstance(info.get("calibration"), dict) else {}
    if "offset" in calibration and calibration.get("kept", True):
        rows.append(f"- output calibration: logit scale {_fmt(calibration.get('scale', 1.0))} and "
                    f"offset {_fmt(calibration['offset'])} folded into the last layer")
    lines += rows or ["The model folder records no training metadata."]
    lines += ["", "The full record is `metadata.json` (also under `config.emtile.metadata` in "
              "rdf.yaml).", "", "## Validation", ""]
    metrics = info.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines.append(f"Scores at the saved iteration on the validation slices "
                     f"{_fmt(info.get('val_slices', '?'))} (emtile's ISBI 2012 metrics):")
        lines += [f"- {k}: {_fmt(v)}" for k, v in sorted(metrics.items())]
        if isinstance(calibration.get("val_after"), dict):
            lines += ["", "After the output calibration (the weights in this package):"]
            lines += [f"- {k}: {_fmt(v)}" for k, v in sorted(calibration["val_after"].items())]
    else:
        lines.append("No validation scores were recorded for this model.")
    lines += ["", "To validate it on new data: `emtile predict --model model.zip vol.zarr "
              "pred.zarr`, then `emtile evaluate pred.zarr labels.zarr`.", "",
              "## Citations", "", f"- {CITE_UNET['text']} doi:{CITE_UNET['doi']}"]
    if cite_isbi:
        lines += [f"- {c['text']} doi:{c['doi']}" for c in CITE_ISBI]
    lines += ["", "## Authors and licence", "", ", ".join(authors) + f"; licence {license}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the description


def _geometry(sm):
    """``config.emtile.geometry``: one number per quantity in 2-D, one per axis (z, y, x) in 3-D."""
    if sm.ndim == 2:
        return {"min_size": sm.min_size, "step": sm.align, "halo": sm.halo, "depth": sm.depth}
    return {"axes": ["z", "y", "x"], "min_sizes": list(sm.min_sizes), "steps": list(sm.aligns),
            "halos": list(sm.halos), "depth": sm.depth}


def _tensor_words(ndim, offsets):
    """``(input description, output description)`` of the tensors."""
    image = "EM image (one channel)" if ndim == 2 else "EM volume (one channel; z, y, x)"
    if offsets is None:
        return image, "probability of the foreground class (sigmoid)"
    axes = "zyx"[3 - ndim:]
    named = "_".join(f"d{a}{chr(65 + i)}" for i, a in enumerate(axes))
    return image, (f"affinities (sigmoid): P(v and v + offset in one object), 1 = same; channel "
                   f"aff_{named} is offset ({', '.join(chr(65 + i) for i in range(ndim))})")


def _build_description(m, files, *, name, description, net, meta, crop, authors, license,
                       cite_isbi, torchscript, offsets=None):
    """The validated ``bioimageio.spec`` ModelDescr of the files in the folder ``files``."""
    import torch
    from pydantic import ValidationError

    from bioimageio.spec.common import FileDescr

    sm, cfg = net.shape_map, net.config
    info = meta.get("emtile", {}) if isinstance(meta, dict) else {}
    inp = input_description(sm, channels=cfg["in_channels"], dtype=crop.dtype,
                            normalization=info.get("normalization"))
    out = output_description(sm, channels=cfg["out_channels"], channel_names=None if offsets is None
                             else affinity_channel_names(offsets))
    words_in, words_out = _tensor_words(sm.ndim, offsets)
    version = torch.__version__.split("+")[0]
    weights = {"pytorch_state_dict": {
        "source": files / "weights.pt", "pytorch_version": version,
        "architecture": {"callable": "UNet", "import_from": "emtile.unet", "kwargs": cfg}}}
    if torchscript:
        weights["torchscript"] = {"source": files / "weights.torchscript.pt",
                                  "pytorch_version": version, "parent": "pytorch_state_dict"}
    try:
        return m.ModelDescr(
            name=name, description=description,
            authors=[m.Author(name=a) for a in authors], license=license,
            cite=[CITE_UNET] + (CITE_ISBI if cite_isbi else []),
            tags=TAGS if sm.ndim == 2 else TAGS_3D,
            documentation=FileDescr(source=files / "README.md"),
            covers=[FileDescr(source=files / "cover.png")],
            attachments=[FileDescr(source=files / "metadata.json")],
            inputs=[m.InputTensorDescr(
                **inp, description=words_in,
                test_tensor=FileDescr(source=files / "test_input.npy"),
                sample_tensor=FileDescr(source=files / "sample_input.tif"))],
            outputs=[m.OutputTensorDescr(
                **out, description=words_out,
                test_tensor=FileDescr(source=files / "test_output.npy"),
                sample_tensor=FileDescr(source=files / "sample_output.tif"))],
            weights=m.WeightsDescr(**weights),
            config={"bioimageio": {"architecture_type": "UNet", "model_parameter_count":
                                   sum(p.numel() for p in net.parameters())},
                    "emtile": {"format": "emtile-unet", "version": 1, "unet": cfg,
                               "geometry": _geometry(sm),
                               "metadata": meta}})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise EmtileError(f"the bioimage.io description is not valid: {where}: "
                          f"{err.get('msg')} (got {err.get('input')!r})") from None


def export_model(model, path, *, sample=None, sample_slice=None, name=None, description=None,
                 authors=None, license="MIT", cite_isbi=True, torchscript=False, overwrite=False):
    """Write the model folder ``model`` as a bioimage.io model package (format 0.5) at ``path``.

    Parameters
    ----------
    model : str or Path
        A model folder written by ``emtile train`` or :func:`emtile.save_model`.
    path : str or Path
        The package to write, ending in ``.zip``.
    sample : str or Path, optional
        A volume (anything :func:`emtile.open_volume` opens, shape (Z, Y, X) or (Y, X)) to cut the
        test input from; default: the raw volume the model was trained on (``metadata.json``).
        A 3-D model's test input is the centred block of the smallest valid size whose output
        is at least 16 voxels along each axis.
    sample_slice : int, optional
        The slice of ``sample`` (2-D models); default: the model's first validation slice, else
        its first training slice, else 0. The crop is centred, of the smallest valid size whose
        output is at least 64 pixels wide.
    name, description : str, optional
        The package's name (letters, digits, spaces, ``_+-()``) and one-line description.
    authors : list of str, optional
        Default: ``["emtile contributors"]``.
    license : str
        SPDX identifier of the weights' licence (default MIT, emtile's).
    cite_isbi : bool
        Cite the ISBI 2012 data (Arganda-Carreras et al. 2015; Cardona et al. 2010) as the
        training data (default); the U-Net paper is always cited.
    torchscript : bool
        Also write traced TorchScript weights.
    overwrite : bool
        Replace an existing package at ``path``.

    Returns
    -------
    ExportResult
    """
    from emtile.locations import local_only
    from emtile.package import load_package
    from emtile.unet import load_folder, load_metadata

    local_only(model, "model", "export reads a model folder on local disk")
    local_only(path, "path", "a bioimage.io package is written as a local .zip (copy it to the "
                             "store afterwards)")
    m = _spec()
    from bioimageio.spec import save_bioimageio_package

    if is_package(model):
        raise EmtileError(f"model={str(model)!r} is a bioimage.io package; export takes an emtile "
                          f"model folder (config.json, model.safetensors)")
    net = load_folder(model)
    meta = load_metadata(model)
    path = _check_destination(path, overwrite, inputs=[model, sample])
    if net.in_channels != 1:
        raise EmtileError(f"the model has in_channels={net.in_channels}; emtile exports "
                          f"single-channel models (its test input is one image slice)")
    offsets = affinity_offsets(meta, channels=net.out_channels, ndim=net.ndim)
    authors = list(authors) if authors else [DEFAULT_AUTHOR]
    sm = net.shape_map
    name = name or (f"emtile U-Net depth {sm.depth} base {net.config['base']}" if sm.ndim == 2
                    else f"emtile 3-D U-Net depth {sm.depth} base {net.config['base']}")
    description = description or _default_description(sm, offsets)
    if sm.ndim == 2:
        crop, crop_info = _test_crop(sm, sample, sample_slice, meta.get("emtile", meta))
    else:
        crop, crop_info = _test_block(sm, sample, sample_slice, meta.get("emtile", meta))
    normalization = meta.get("emtile", {}).get("normalization") if isinstance(meta, dict) else None
    probs = _probabilities(net, crop, normalization)

    with tempfile.TemporaryDirectory(prefix="emtile-export-") as tmp:
        files = Path(tmp)
        _write_files(files, net, crop, probs, meta, torchscript)
        (files / "README.md").write_text(_readme(
            name=name, description=description, net=net, meta=meta, crop_info=crop_info,
            test_in="x".join(map(str, crop.shape)),
            test_out="x".join(map(str, probs.shape[-sm.ndim:])), cite_isbi=cite_isbi,
            authors=authors, license=license, offsets=offsets))
        descr = _build_description(m, files, name=name, description=description, net=net,
                                   meta=meta, crop=crop, authors=authors, license=license,
                                   cite_isbi=cite_isbi, torchscript=torchscript, offsets=offsets)
        # a temporary name of this run's own beside the package: two exports never share it
        tmp_zip = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp.zip")
        try:
            save_bioimageio_package(descr, output_path=tmp_zip)
            again = load_package(tmp_zip)  # emtile's own reader, as predict will use it
            if not np.array_equal(_probabilities(again, crop, normalization), probs):
                raise EmtileError(f"path={str(path)!r}: the package written does not reproduce "
                                  f"the model's outputs on its test input; nothing was written")
            os.replace(tmp_zip, path)
        finally:
            if tmp_zip.exists():
                tmp_zip.unlink()
    per_axis = sm.ndim == 3
    return ExportResult(path=str(path), format_version=str(descr.format_version),
                        min_size=sm.min_sizes if per_axis else sm.min_size,
                        step=sm.aligns if per_axis else sm.align,
                        halo=sm.halos if per_axis else sm.halo,
                        test_input=tuple(crop.shape), test_output=tuple(probs.shape[-sm.ndim:]),
                        sample=crop_info, weights=("pytorch_state_dict",)
                        + (("torchscript",) if torchscript else ()))


def _default_description(sm, offsets):
    """The package's one-line description when none is given."""
    if sm.ndim == 2 and offsets is None:
        return (f"Valid-convolution U-Net (Ronneberger et al. 2015) for 2-D electron-microscopy "
                f"slices, trained with emtile: per-pixel foreground probabilities, {2 * sm.halo} "
                f"pixels smaller than its input.")
    what = ("foreground probabilities" if offsets is None else
            f"affinities to {len(offsets)} neighbours, one channel per offset, named by it")
    smaller = "x".join(str(2 * h) for h in sm.halos)
    return (f"Valid-convolution {sm.ndim}-D U-Net (Ronneberger et al. 2015) for electron-"
            f"microscopy {'volumes' if sm.ndim == 3 else 'slices'}, trained with emtile: per-"
            f"{'voxel' if sm.ndim == 3 else 'pixel'} {what}, {smaller} smaller than its input "
            f"({', '.join('zyx'[3 - sm.ndim:])}).")


def _write_files(files, net, crop, probs, meta, torchscript):
    """The package's weights, test and sample tensors, cover and metadata in ``files``."""
    import tifffile
    import torch

    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, files / "weights.pt")
    if torchscript:
        _write_torchscript(net, crop, files / "weights.torchscript.pt")
    np.save(files / "test_input.npy", crop[None, None])
    np.save(files / "test_output.npy", probs)
    tifffile.imwrite(files / "sample_input.tif", crop)
    tifffile.imwrite(files / "sample_output.tif", probs[0])
    _cover(crop, probs, files / "cover.png")
    (files / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

