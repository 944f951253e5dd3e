"""The valid-convolution U-Net of Ronneberger et al. (2015), its shape map, and model folders.

Every 3×3 convolution is unpadded, so a 572×572 input gives a 388×388 output at depth 4 and each
output pixel sees a fixed context of 92 pixels per side (:attr:`UNet.halo`). That is what makes
tiled prediction exact (see :mod:`emtile.geometry`). The same network in 3-D (``ndim=3``) takes
per-level max-pool factors and kernel sizes, as anisotropic serial-section data needs
(``factors=((1, 2, 2), (2, 2, 2))``: no pooling and ``(1, 3, 3)`` kernels across sections while
they are thicker than the in-plane pixels; :func:`default_factors` picks them from a voxel size);
its halo and alignment are then per axis (:attr:`UNet.halos`, :attr:`UNet.aligns`).

A model is saved as a folder that can be trusted: ``model.safetensors`` (tensors only; loading it
cannot run code), ``config.json`` (the constructor arguments) and optionally ``metadata.json``
(whatever the trainer wants to keep: epochs, losses, data paths). :func:`load_folder` rebuilds
the model from the folder alone. emtile never unpickles anything from a model folder: a
``model.pt`` (or any other pickle) is refused, not read. :func:`emtile.model.load` (and
``emtile.load_model``) reads any source: a model folder (through :func:`load_folder`), a training
run folder or a bioimage.io package.
"""

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from emtile._errors import EmtileError
from emtile.geometry import (ShapeMap, center_crop, check_factors, check_kernels,
                             default_factors, per_axis)

__all__ = ["UNet", "default_factors", "save_model", "load_folder", "load_metadata"]

WEIGHTS = "model.safetensors"
PICKLED_WEIGHTS = ("model.pt", "model.pth", "model.bin", "model.ckpt")  # refused, never read
CONFIG = "config.json"
METADATA = "metadata.json"
FORMAT = "emtile-unet"
# bounds on the constructor arguments: a crafted config.json must not make emtile build something
# absurd (depth 8 is a 256x down-sampling; the paper's U-Net has depth 4, base 64, 31 M parameters)
LIMITS = {"in_channels": (1, 1024), "out_channels": (1, 1024), "base": (1, 1024), "depth": (1, 8)}
NDIMS = (2, 3)
MAX_PARAMETERS = 2**30  # 4 GiB of float32 weights


# --------------------------------------------------------------------------- building blocks


def _layers(ndim):
    """``(Conv, BatchNorm, MaxPool, ConvTranspose)`` of ``ndim`` spatial dimensions."""
    if ndim == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d
    return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d


class DoubleConv(nn.Sequential):
    """Two unpadded convolutions (3×3 by default), each followed by (batch norm and) ReLU."""

    def __init__(self, cin, cout, batch_norm=False, kernel=(3, 3), ndim=2):
        conv, norm, _, _ = _layers(ndim)
        layers = []
        for c in (cin, cout):
            layers.append(conv(c, cout, kernel, bias=not batch_norm))
            if batch_norm:
                layers.append(norm(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Down(nn.Sequential):
    """Max-pool by ``factor`` (2×2 by default), then a double convolution doubling the
    channels."""

    def __init__(self, cin, cout, batch_norm=False, dropout=0.0, factor=(2, 2), kernel=(3, 3),
                 ndim=2):
        pool = _layers(ndim)[2]
        layers = [pool(factor), DoubleConv(cin, cout, batch_norm, kernel, ndim)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class Up(nn.Module):
    """Transposed convolution by ``factor`` (2×2 by default; halving the channels),
    concatenation with the centre-cropped skip connection, then a double convolution."""

    def __init__(self, cin, cout, batch_norm=False, factor=(2, 2), kernel=(3, 3), ndim=2):
        super().__init__()
        self.ndim = ndim
        self.up = _layers(ndim)[3](cin, cin // 2, factor, stride=factor)
        self.conv = DoubleConv(cin // 2 + cout, cout, batch_norm, kernel, ndim)

    def forward(self, x, skip):
        x = self.up(x)
        return self.conv(torch.cat([center_crop(skip, x.shape[-self.ndim:]), x], dim=1))


# --------------------------------------------------------------------------- the model


def _check_config(*, in_channels, out_channels, base, depth, batch_norm, dropout, ndim=2,
                  factors=None, kernels=None):
    """EmtileError for arguments of the wrong type or out of bounds (see ``LIMITS``); returns
    the checked ``(factors, kernels)``, one tuple per level."""
    values = dict(in_channels=in_channels, out_channels=out_channels, base=base, depth=depth)
    for name, value in values.items():
        lo, hi = LIMITS[name]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise EmtileError(f"{name}={value!r} must be an integer from {lo} to {hi}")
    if not isinstance(batch_norm, bool) and batch_norm not in (0, 1):
        raise EmtileError(f"batch_norm={batch_norm!r} must be true or false")
    if (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)
            or not 0.0 <= dropout < 1.0):
        raise EmtileError(f"dropout={dropout!r} must be a number in [0, 1)")
    if not isinstance(ndim, int) or isinstance(ndim, bool) or ndim not in NDIMS:
        raise EmtileError(f"ndim={ndim!r} must be 2 or 3 (spatial dimensions of the model)")
    factors = check_factors(factors, depth, ndim)
    kernels = check_kernels(kernels, factors, ndim)
    n = _n_parameters(in_channels, out_channels, base, factors, kernels)
    if n > MAX_PARAMETERS:
        raise EmtileError(f"base={base}, depth={depth} would give {n:,} parameters, more than "
                          f"emtile builds ({MAX_PARAMETERS:,}); use a smaller base or depth")
    return factors, kernels


def _n_parameters(cin, cout, base, factors, kernels):
    """Weights and biases of a UNet without batch norm (a bound on what the constructor allocates)."""
    def conv(a, b, size):
        return a * b * math.prod(size) + b

    depth = len(factors)
    widths = [base * 2**level for level in range(depth + 1)]
    n = conv(cin, base, kernels[0]) + conv(base, base, kernels[0]) + conv(base, cout, (1,))
    for i in range(depth):
        w0, w1 = widths[i], widths[i + 1]
        n += conv(w0, w1, kernels[i + 1]) + conv(w1, w1, kernels[i + 1])  # down
        n += (conv(w1, w0, factors[i]) + conv(w0 + w0, w0, kernels[i])
              + conv(w0, w0, kernels[i]))  # up
    return n


class UNet(nn.Module):
    """Valid-convolution U-Net, 2-D or 3-D; ``forward`` returns logits (apply a sigmoid for
    probabilities).

    Parameters
    ----------
    in_channels : int
        Input channels (1 for grey-level EM).
    out_channels : int
        Output channels (1 for membranes; more for several classes or affinities, each its own
        sigmoid).
    base : int
        Channels of the first level, doubled at every level down (64 in the paper).
    depth : int
        Number of max-pools (4 in the paper).
    batch_norm : bool
        Batch normalisation after every convolution (not in the paper).
    dropout : float
        Dropout probability at the end of the contracting path (the paper uses 0.5 when training).
    ndim : {2, 3}
        Spatial dimensions: 2 (slices, the paper's) or 3 (volumes, ``(N, C, Z, Y, X)``).
    factors : sequence, optional
        Max-pool factor per level (``depth`` entries, each an int or one per axis): default 2
        along every axis; for serial sections ``(1, 2, 2)`` at the levels still anisotropic
        (:func:`default_factors` picks them from a voxel size), e.g.
        ``((1, 2, 2), (1, 2, 2), (2, 2, 2))``.
    kernels : sequence, optional
        Convolution kernel size per resolution level (``depth + 1`` entries, odd; each an int or
        one per axis): default 3, but 1 along the axes a level down-samples less than the others
        (``(1, 3, 3)`` at anisotropic levels, :func:`emtile.geometry.default_kernels`).

    ``config`` (what ``config.json`` records) names ``ndim``, ``factors`` and ``kernels`` only
    when they differ from the paper's 2-D network, so a 2-D model's config is as it always was.

    Examples
    --------
    >>> net = UNet(base=8, depth=4)
    >>> net.output_size(572), net.input_size(388), net.halo
    (388, 572, 92)
    >>> net(torch.zeros(1, 1, 188, 188)).shape
    torch.Size([1, 1, 4, 4])
    >>> net3 = UNet(base=2, depth=2, ndim=3, factors=((1, 2, 2), (2, 2, 2)))
    >>> net3.halos, net3.aligns, net3(torch.zeros(1, 1, 18, 44, 44)).shape
    ((8, 20, 20), (2, 4, 4), torch.Size([1, 1, 2, 4, 4]))
    """

    def __init__(self, in_channels=1, out_channels=1, base=64, depth=4, batch_norm=False,
                 dropout=0.0, ndim=2, factors=None, kernels=None):
        super().__init__()
        factors, kernels = _check_config(
            in_channels=in_channels, out_channels=out_channels, base=base, depth=depth,
            batch_norm=batch_norm, dropout=dropout, ndim=ndim, factors=factors, kernels=kernels)
        self.ndim = int(ndim)
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base=base,
                           depth=depth, batch_norm=bool(batch_norm), dropout=float(dropout))
        if (ndim, factors, kernels) != (2, check_factors(None, depth, 2),
                                        check_kernels(None, check_factors(None, depth, 2), 2)):
            self.config.update(ndim=self.ndim, factors=[list(f) for f in factors],
                               kernels=[list(k) for k in kernels])
        self.shape_map = ShapeMap(depth, self.ndim, factors=factors, kernels=kernels)
        widths = [base * 2**level for level in range(depth + 1)]
        self.inc = DoubleConv(in_channels, base, batch_norm, kernels[0], ndim)
        self.downs = nn.ModuleList(
            Down(widths[i], widths[i + 1], batch_norm, dropout if i == depth - 1 else 0.0,
                 factors[i], kernels[i + 1], ndim)
            for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], batch_norm, factors[i], kernels[i],
                                    ndim)
                                 for i in reversed(range(depth)))
        self.head = _layers(ndim)[0](base, out_channels, 1)

    # -- shape map (pure arithmetic, see emtile.geometry.ShapeMap)

    @property
    def in_channels(self):
        return self.config["in_channels"]

    @property
    def out_channels(self):
        return self.config["out_channels"]

    @property
    def depth(self):
        return self.config["depth"]

    @property
    def factors(self):
        """Max-pool factor per level, one tuple per level (one value per axis)."""
        return self.shape_map.factors

    @property
    def kernels(self):
        """Convolution kernel size per resolution level (``depth + 1`` tuples)."""
        return self.shape_map.kernels

    @property
    def halo(self):
        """Context pixels per side of every output pixel (92 at depth 4); an error where it
        differs per axis (see :attr:`halos`)."""
        return self.shape_map.halo

    @property
    def halos(self):
        """Context pixels per side, per axis."""
        return self.shape_map.halos

    @property
    def align(self):
        """Tile origins must be multiples of ``2 ** depth`` for exact stitching (see
        :attr:`aligns`)."""
        return self.shape_map.align

    @property
    def aligns(self):
        """Per axis: tile origins must be multiples of the product of the axis's factors."""
        return self.shape_map.aligns

    @property
    def min_size(self):
        return self.shape_map.min_size

    @property
    def min_sizes(self):
        return self.shape_map.min_sizes

    def output_size(self, n_in):
        """Output size for input size ``n_in`` (int or tuple); EmtileError if not valid."""
        return self.shape_map.output_size(n_in)

    def input_size(self, n_out):
        """Input size that gives output size ``n_out`` (int or tuple)."""
        return self.shape_map.input_size(n_out)

    def valid_sizes(self, lo, hi, axis=None):
        """Valid input sizes between ``lo`` and ``hi`` inclusive (along ``axis``; None: every
        axis)."""
        return self.shape_map.valid_sizes(lo, hi, axis)

    def is_valid(self, n):
        return self.shape_map.is_valid(n)

    def check(self, n, name="tile"):
        return self.shape_map.check(n, name)

    def activation_bytes(self, tile, batch_size=1):
        """Rough peak memory of one inference forward pass on ``batch_size`` tiles of ``tile``
        (an int along every axis, or one per axis).

        Measured on CPU (float32, 2-D): the skip connections, the two largest feature maps and
        the concatenation at full resolution, about ``6 * base`` floats per input pixel.
        """
        voxels = math.prod(per_axis(tile, self.ndim, "tile"))
        return 4 * batch_size * voxels * (self.in_channels + 6 * self.config["base"])

    # -- forward

    def forward(self, x):
        k = self.ndim
        if x.ndim != k + 2 or x.shape[1] != self.in_channels:
            axes = "H, W" if k == 2 else "D, H, W"
            raise EmtileError(f"UNet input has shape {tuple(x.shape)}; expected (N, "
                              f"{self.in_channels}, {axes})")
        sizes = tuple(int(v) for v in x.shape[2:])
        if not self.shape_map.is_valid(sizes):
            self._invalid_input(sizes)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)

    def _invalid_input(self, sizes):
        sm = self.shape_map
        axis = next(a for a, n in enumerate(sizes) if sm.output_along(n, a) is None)
        lo, hi = sm.nearest_valid(sizes[axis], axis)
        near = f"{lo} and {hi}" if lo is not None else f"{hi} (the smallest)"
        shown = "x".join(str(n) for n in sizes)
        where = "" if self.ndim == 2 and sm.uniform else f" along {'zyx'[3 - self.ndim + axis]}"
        raise EmtileError(f"UNet input of size {shown} is not valid for depth {self.depth}"
                          f"{where}: nearest valid sizes are {near}")

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


# --------------------------------------------------------------------------- model folders


def save_model(model, directory, *, metadata=None):
    """Save ``model`` as a folder: ``model.safetensors``, ``config.json`` (+ ``metadata.json``).

    ``metadata`` is any JSON-serialisable dict (training settings, epochs, scores).
    """
    from safetensors.torch import save_file

    if not isinstance(model, UNet):
        raise EmtileError(f"save_model expects an emtile UNet, got {type(model).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise EmtileError(f"model folder {str(directory)!r} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    if metadata is not None:
        try:
            meta_text = json.dumps(metadata, indent=2, sort_keys=True)
        except TypeError as exc:
            raise EmtileError(f"metadata is not JSON-serialisable: {exc}") from None
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, directory / WEIGHTS)
    _write_atomic(directory / CONFIG,
                  json.dumps({"format": FORMAT, "version": 1, "config": model.config}, indent=2))
    if metadata is not None:
        _write_atomic(directory / METADATA, meta_text)
    else:
        (directory / METADATA).unlink(missing_ok=True)  # a previous model's, not this one's
    return directory


def _write_atomic(path, text):
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _read_config(directory):
    directory = Path(directory)
    if not directory.exists():
        raise EmtileError(f"model folder {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise EmtileError(f"model {str(directory)!r} is not a folder: an emtile model is a folder "
                          f"with {CONFIG} and {WEIGHTS}")
    path = directory / CONFIG
    if not path.exists() and (directory / "run.json").is_file():
        found = [n for n in ("best", "last") if (directory / n / CONFIG).is_file()]
        pick = (f"use {str(directory / 'best')!r} (the best validated model) or "
                f"{str(directory / 'last')!r} (the latest)" if found else
                "it holds no model yet (no best/ or last/)")
        raise EmtileError(f"{str(directory)!r} is a training run folder, not a model: {pick}")
    if not path.exists():
        raise EmtileError(f"model folder {str(directory)!r} has no {CONFIG}: an emtile model is a "
                          f"folder with {CONFIG} and {WEIGHTS} (written by emtile.save_model)")
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
        config = doc["config"]
        if doc.get("format") != FORMAT or not isinstance(config, dict):
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise EmtileError(f"{str(path)!r} is not an emtile model config: {exc}") from None
    return config


def _read_weights(directory):
    """The state dict in ``model.safetensors``; never anything else (nothing is unpickled)."""
    directory = Path(directory)
    path = directory / WEIGHTS
    if path.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise EmtileError(f"{str(path)!r} is not a valid safetensors file ({exc}); refusing to "
                              f"read it any other way (a pickle could run code)") from None
    pickled = [name for name in PICKLED_WEIGHTS if (directory / name).exists()]
    if pickled:
        raise EmtileError(f"model folder {str(directory)!r} has {pickled[0]} but no {WEIGHTS}: "
                          f"emtile reads weights only from {WEIGHTS} and never unpickles a file "
                          f"(a pickle can run code); convert trusted weights with "
                          f"emtile.save_model")
    raise EmtileError(f"model folder {str(directory)!r} has no weights: expected {WEIGHTS}")


def load_folder(directory, device="cpu"):
    """Rebuild a :class:`UNet` from a model folder written by :func:`save_model`.

    Nothing in the folder is executed: the weights are read with safetensors only, the
    architecture from ``config.json`` (checked for types and bounds before anything is built).
    The model is returned in eval mode. A model folder only: :func:`emtile.model.load` also
    reads training run folders and bioimage.io packages.
    """
    config = _read_config(directory)
    try:
        with torch.device("meta"):  # no memory: the expected tensor shapes only
            expected = UNet(**config).state_dict()
    except TypeError as exc:
        raise EmtileError(f"config.json in {str(directory)!r} has unknown arguments: {exc}") from None
    except EmtileError as exc:
        raise EmtileError(f"config.json in {str(directory)!r} is not valid: {exc}") from None
    state = _read_weights(directory)
    if not isinstance(state, dict):
        raise EmtileError(f"weights in {str(directory)!r} are not a state dict")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected
             if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
                if unexpected else f"{wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, "
                f"expected {tuple(expected[wrong[0]].shape)}")
        raise EmtileError(f"weights in {str(directory)!r} do not match its config.json: {what}")
    model = UNet(**config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise EmtileError(f"weights in {str(directory)!r} do not match its config.json: "
                          f"{first}") from None
    return model.to(device).eval()


def load_metadata(directory):
    """The ``metadata.json`` dict of a model folder ({} if there is none)."""
    _read_config(directory)
    path = Path(directory) / METADATA
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise EmtileError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise EmtileError(f"{str(path)!r} holds a JSON {type(meta).__name__}, not an object")
    return meta
