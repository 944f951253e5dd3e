"""A model loaded once, into one object: the network, where it came from and what it records.

:func:`load` is the one way in. It takes a model folder (``config.json`` + ``model.safetensors``,
read by :func:`emtile.unet.load_folder`), a training run folder (``run.json``; its ``best/``
model), a bioimage.io package (a ``.zip``, or a folder with ``rdf.yaml``, read by
:func:`emtile.package.read_package`), a :class:`~emtile.unet.UNet` in memory, or a
:class:`Model` (returned as it is), and returns a frozen :class:`Model`: the network in eval
mode, its source, its metadata (``metadata.json``), the input normalisation and voxel size its
training recorded, and the SHA-256 of its config and weights, which identifies it across
processes. Everything that needs these asks the :class:`Model`; nothing reads the files again.

The choice between a folder, a run and a package is made here only: :mod:`emtile.unet`,
:mod:`emtile.package` and :mod:`emtile.normalize` do not import this module or each other in
a circle (``tests/test_imports.py``). Loading is as safe as each reader: safetensors only for
folders (a pickle is refused, never read), ``torch.load(weights_only=True)`` after the recorded
SHA-256 for packages, every config bounds-checked before anything is built.

``import emtile.model`` does not import torch; :func:`load` does.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from emtile import normalize, package
from emtile._errors import EmtileError

__all__ = ["Model", "load", "load_model", "read_metadata", "weights_hash", "is_run_folder",
           "target_record", "KINDS", "TARGETS"]

KINDS = ("folder", "run", "package", "memory")
RUN_FILE = "run.json"  # emtile.training.run.RUN_FILE (not imported: it pulls in torch)
BEST = "best"
TARGETS = ("boundaries", "affinities")  # what a model's channels are; boundaries when unrecorded


def weights_hash(net):
    """sha256 (hex) of a network's config and weights: what identifies it across processes."""
    h = hashlib.sha256(json.dumps(net.config, sort_keys=True).encode())
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded model (made by :func:`load`). Frozen: a field cannot be replaced.

    Attributes
    ----------
    net : emtile.unet.UNet
        The network, in eval mode.
    source : str
        The path it was loaded from, as given ("" for a network in memory).
    kind : str
        ``"folder"`` (a model folder), ``"run"`` (a training run folder: its ``best/``),
        ``"package"`` (a bioimage.io package) or ``"memory"``.
    metadata : dict
        The model folder's ``metadata.json`` (a package carries its folder's; {} if none).
    normalization : dict or None
        The input normalisation its training recorded (``metadata["emtile"]["normalization"]``;
        None: nothing recorded, the ``dtype`` rule, see :func:`emtile.normalize.rule_of`).
    voxel_size : tuple of float or None
        The training data's voxel size in nm, (z, y, x), when recorded.
    weights_sha256 : str
        :func:`weights_hash` of the network when it was loaded.

    Examples
    --------
    >>> from emtile.unet import UNet
    >>> m = load(UNet(base=2, depth=2))
    >>> m.kind, m.source, m.halo, m.shape_map.min_size, m.normalization
    ('memory', '', 20, 44, None)
    """

    net: object = field(repr=False)
    source: str
    kind: str
    metadata: dict = field(repr=False)
    normalization: dict = None
    voxel_size: tuple = None
    weights_sha256: str = ""

    def __post_init__(self):
        assert self.kind in KINDS, self.kind

    # -- the network's geometry (see emtile.geometry.ShapeMap)

    @property
    def config(self):
        """The network's constructor arguments (``config.json``)."""
        return self.net.config

    @property
    def ndim(self):
        """Spatial dimensions the network convolves (2 or 3)."""
        return self.net.ndim

    @property
    def in_channels(self):
        return self.net.in_channels

    @property
    def out_channels(self):
        return self.net.out_channels

    @property
    def depth(self):
        return self.net.depth

    @property
    def shape_map(self):
        """The network's :class:`~emtile.geometry.ShapeMap` (valid sizes, halo, alignment)."""
        return self.net.shape_map

    @property
    def halo(self):
        """Context pixels per side of every output pixel (92 at depth 4); an error where it
        differs per axis (an anisotropic 3-D network: see :attr:`halos`)."""
        return self.net.halo

    @property
    def target(self):
        """What its output channels are: ``"affinities"`` or ``"boundaries"`` (when its
        metadata records no ``target``; see :func:`target_record`)."""
        return target_record(self.metadata).get("target", "boundaries")

    @property
    def offsets(self):
        """The offsets ``[(dz, dy, dx), ...]`` of an affinity model's channels, in channel
        order; None for any other model."""
        offsets = target_record(self.metadata).get("offsets")
        return None if offsets is None else [tuple(o) for o in offsets]

    @property
    def halos(self):
        """Context pixels per side, per axis (``(z, y, x)`` for a 3-D network)."""
        return self.net.halos


def target_record(metadata):
    """``{"target": ..., "offsets": [[dz, dy, dx], ...]}`` as a model's ``metadata.json``
    records them (at its top level, or in its ``emtile`` section), checked: a target of
    :data:`TARGETS`, and for affinities one offset per channel, each a list of whole numbers of
    one length; {} when it records no target (a boundary model)."""
    meta = metadata if isinstance(metadata, dict) else {}
    section = meta.get("emtile") if isinstance(meta.get("emtile"), dict) else {}
    source = meta if "target" in meta else section
    if "target" not in source:
        return {}
    target = source["target"]
    if target not in TARGETS:
        raise EmtileError(f"the model's metadata records target={target!r}: emtile knows "
                          f"{', '.join(TARGETS)}")
    if target != "affinities":
        return {"target": target}
    offsets = source.get("offsets")
    ok = (isinstance(offsets, list) and offsets and
          all(isinstance(o, list) and o and len(o) == len(offsets[0]) and
              all(isinstance(v, int) and not isinstance(v, bool) for v in o) for o in offsets))
    if not ok:
        raise EmtileError(f"the model's metadata records offsets={offsets!r}: an affinity model "
                          f"needs a list of [dz, dy, dx] lists of whole numbers, one per channel")
    return {"target": target, "offsets": [list(o) for o in offsets]}


def is_run_folder(path):
    """True for a training run folder (``run.json``, written by ``emtile train``)."""
    p = Path(path)
    return p.is_dir() and (p / RUN_FILE).is_file()


def _best(run):
    """The ``best/`` model folder of a training run folder, or a one-line error."""
    run = Path(run)
    best = run / BEST
    if (best / "config.json").is_file():
        return best
    last = run / "last"
    pick = (f"use {str(last)!r} (the latest model) or wait until validation saves one"
            if (last / "config.json").is_file() else "it holds no model yet (no best/ or last/)")
    raise EmtileError(f"model={str(run)!r} is a training run folder with no best/ model: {pick}")


def _check_source(source):
    from emtile.locations import local_only

    if not isinstance(source, (str, os.PathLike)):
        raise EmtileError(f"model must be an emtile UNet, a Model, or the path of a model folder, "
                          f"a training run folder or a bioimage.io package; got "
                          f"{type(source).__name__}")
    local_only(source, "model", "models are read from local disk (copy it here first)")
    return Path(source)


def _make(net, *, source, kind, metadata):
    record = normalize.model_record(metadata)
    return Model(net=net, source=source, kind=kind, metadata=metadata,
                 normalization=record.get("normalization"), voxel_size=record.get("voxel_size"),
                 weights_sha256=weights_hash(net))


def load(source, *, device=None):
    """Load a model once: a :class:`Model` from any source emtile reads.

    Parameters
    ----------
    source : str, path, emtile.unet.UNet or Model
        A model folder (``config.json`` + ``model.safetensors``), a training run folder
        (``run.json``; its ``best/`` model is loaded), a bioimage.io package (``.zip`` or a
        folder with ``rdf.yaml``), a network in memory (put in eval mode, moved to ``device``
        when one is given), or a :class:`Model` (returned as it is, its network moved to
        ``device`` when one is given).
    device : str or torch.device, optional
        Where the network's weights go; None: ``"cpu"`` for a path, where they are for a
        network in memory.

    Returns
    -------
    Model

    Raises
    ------
    EmtileError
        In one line, for a missing or incomplete source, a config out of bounds, weights that do
        not match it, a pickle where safetensors are expected, or a package whose weights do not
        match their recorded SHA-256 or are more than a plain state dict.
    """
    if isinstance(source, Model):
        if device is not None:
            source.net.to(device)
        return source
    from emtile.unet import UNet, load_folder, load_metadata

    if isinstance(source, UNet):
        net = source if device is None else source.to(device)
        return _make(net.eval(), source="", kind="memory", metadata={})
    path = _check_source(source)
    device = "cpu" if device is None else device
    if package.is_package(path):
        net, meta = package.read_package(path, device=device)
        return _make(net, source=str(source), kind="package", metadata=meta)
    folder, kind = (_best(path), "run") if is_run_folder(path) else (path, "folder")
    net = load_folder(folder, device=device)
    return _make(net, source=str(source), kind=kind, metadata=load_metadata(folder))


def load_model(source, device="cpu"):
    """The network alone: ``load(source, device=device).net`` (an :class:`~emtile.unet.UNet`
    in eval mode), for any source :func:`load` takes."""
    return load(source, device=device).net


def read_metadata(source):
    """A model's metadata (``metadata.json``; {} if none) without loading its weights: of a
    :class:`Model`, a model folder, a run folder's ``best/`` or a package; {} for a network in
    memory."""
    if isinstance(source, Model):
        return source.metadata
    from emtile.unet import UNet, load_metadata

    if isinstance(source, UNet):
        return {}
    path = _check_source(source)
    if package.is_package(path):
        return package.package_metadata(path)
    return load_metadata(_best(path) if is_run_folder(path) else path)
