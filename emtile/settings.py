"""The settings of prediction and segmentation: typed, documented, checked objects.

:class:`PredictSettings` and :class:`SegmentSettings` sit beside
:class:`emtile.training.settings.TrainSettings`: each default lives here once, the command line
builds its options' defaults from these fields, :func:`emtile.predict` and
:func:`emtile.segment` take one (or its fields as keyword arguments), and every output records
the settings that made it in its attributes. Built settings are checked: a bad value
raises :class:`emtile.EmtileError` naming the field. Checks that need the model or the data
(a tile size valid for the model's depth, an overlap that fits the tile) happen when the stage
is planned.

This module imports nothing heavy.
"""

import dataclasses
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Optional

from emtile._errors import EmtileError, one_of as _one_of, whole_number as _whole

__all__ = ["PredictSettings", "SegmentSettings", "DTYPES", "BLENDS", "METHODS", "MODES",
           "SEEDS", "CALIBRATIONS", "AUTO_TILE_MEMORY", "CHUNK_TARGET", "split_overrides"]

DTYPES = ("uint8", "float16", "float32")
BLENDS = ("none", "linear", "cosine", "gaussian")
METHODS = ("cc", "ws")
MODES = ("auto", "2d", "3d")
SEEDS = ("components", "distance")
CALIBRATIONS = ("auto", "map", "none")  # emtile.segmenter.levels
AUTO_TILE_MEMORY = 2**30  # activation memory tile="auto" may use
CHUNK_TARGET = 512  # output chunks are the multiple of the tile stride nearest to this


def _fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
        raise EmtileError(f"{name}={value!r} must be a number between 0 and 1")


class _Settings:
    """What both settings classes share: JSON for provenance."""

    def to_json(self):
        """A JSON-ready dict of every field."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(value):
    """A field's value as JSON (:func:`emtile.training.settings.jsonable`; arrays as lists)."""
    from emtile.training.settings import jsonable

    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):
        value = value.tolist()
    return jsonable(value)


@dataclass(frozen=True)
class PredictSettings(_Settings):
    """Everything that decides what ``emtile predict`` computes and how fast.

    Attributes
    ----------
    tile : int, tuple, "auto" or None
        Valid input tile size along the model's axes (572 at depth 4 gives 388-px outputs);
        None: 572 for a 2-D model, ``"auto"`` for a 3-D one.
        ``"auto"``: the valid size computing the fewest pixels for this volume whose forward
        pass fits in ``max_tile_memory`` bytes (timed on the model when the run is long).
    batch_size : int
        Tiles per forward pass (1 was fastest per tile on a 2-core CPU).
    num_workers : int, optional
        DataLoader processes reading tiles in a run in this process (None: 0 on the CPU, up to 4
        on CUDA).
    device : {"auto", "cpu", "cuda", "cuda:N"}
    amp : {"off", "auto", "bf16", "fp16"} or None
        Mixed precision of the forward pass (:func:`emtile.device.resolve_amp`); None and
        ``"off"``: float32.
    blend : {"none", "linear", "cosine", "gaussian"}
        How overlapping outputs are weighted when ``overlap > 0``.
    overlap : int
        Minimum output overlap between neighbouring tiles, in pixels.
    tta : bool
        Average over the 8 in-plane flips / transposes of each tile; for an affinity model,
        over the exchanges of alike axes (6 for an isotropic 3-D model, y and x for an
        anisotropic one), each offset's channel renamed back.
    roi : tuple of slices, optional
        The region to predict; context outside it is read from the volume.
    dtype : {"uint8", "float16", "float32"}
        Probability storage: uint8 stores ``round(255 p)``.
    threshold : float, optional
        Also write ``labels/mask``: 1 where ``p > threshold``.
    channels_last : bool
        Convolutions in channels_last memory format.
    compile : bool
        ``torch.compile`` the model.
    max_tile_memory : int
        Activation memory in bytes that ``tile="auto"`` may use.
    max_block_px : int
        Output pixels per block (the unit of work, writing and resumption).
    chunk_size : int
        Target output chunk edge along the model's axes.
    threads : int, optional
        Torch threads per process on the CPU (None: this process's setting here, cores / workers
        on a local cluster, 1 on other clusters). A resumed run must use the same count.
    levels : int
        Resolution levels of the output (each halves y and x).
    normalize : str or emtile.normalize.Scaling, optional
        How raw pixels become the model's input (None: the rule the model records).
    shards : "auto", "none" or tuple of int
        Zarr v3 sharding of every array written (probabilities, mask, every level): ``"auto"``
        one shard file per block per level (the blocks own whole shards); ``"none"`` (or None)
        one file per chunk, as before; a shard shape per spatial axis of the output (``Z,Y,X``,
        whole multiples of the output chunks that divide the block). Changes files, never the
        array bytes.
    """

    tile: object = None
    batch_size: int = 1
    num_workers: Optional[int] = None
    device: str = "auto"
    amp: Optional[str] = "off"
    blend: str = "none"
    overlap: int = 0
    tta: bool = False
    roi: Optional[tuple] = None
    dtype: str = "uint8"
    threshold: Optional[float] = None
    channels_last: bool = True
    compile: bool = False
    max_tile_memory: int = AUTO_TILE_MEMORY
    max_block_px: int = 2**22
    chunk_size: int = CHUNK_TARGET
    threads: Optional[int] = None
    levels: int = 1
    normalize: object = None
    shards: object = "auto"

    def __post_init__(self):
        _whole("batch_size", self.batch_size, least=1)
        self._check_shards()
        if self.num_workers is not None:
            _whole("num_workers", self.num_workers, least=0)
        if self.threads is not None:
            _whole("threads", self.threads, least=1)
        _whole("levels", self.levels, least=1)
        _whole("max_block_px", self.max_block_px, least=1)
        _whole("chunk_size", self.chunk_size, least=1)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("blend", self.blend, BLENDS)
        if self.threshold is not None:
            _fraction("threshold", self.threshold)
        if self.amp is not None:
            from emtile.device import check_amp

            check_amp(self.amp)

    def _check_shards(self):
        """``shards``: "auto", "none", None or positive whole numbers."""
        v = self.shards
        if v is None or (isinstance(v, str) and v in ("auto", "none")):
            return
        if not (isinstance(v, (tuple, list)) and v and all(
                isinstance(n, Integral) and not isinstance(n, bool) and n > 0 for n in v)):
            raise EmtileError(f"shards={v!r} is not a shard shape: give 'auto', 'none' or one "
                              f"positive whole number per axis (e.g. (16, 512, 512))")


@dataclass(frozen=True)
class SegmentSettings(_Settings):
    """Everything that decides the labels ``emtile segment`` writes.

    Attributes
    ----------
    method : {"cc", "ws"}
        ``cc``: connected components of the interior (``p > threshold``), the boundary then
        flooded from them. ``ws``: seeds flooded into fragments, merged while the boundary
        probability on their shared face (its ``merge_quantile``, or its mean) is at most
        ``merge_threshold``.
    mode : {"auto", "2d", "3d"}
        ``2d``: each z-slice on its own; ``3d``: connected through z; ``auto``: 3d only for a
        stack predicted by a 3-D model.
    threshold : float
        Interior is ``p > threshold``.
    min_size : int
        Objects of fewer interior pixels join the neighbour they share the largest face with.
    merge_threshold : float
        ws: the highest boundary probability on a face for its fragments to merge.
    seeds : {"components", "distance"}
        ws: the interior's connected components, or the maxima of its distance to the
        boundary (affinities: the links' components, or the maxima of the distance to the
        voxels with an unlinked pair; :mod:`emtile.segmenter.affinity`).
    merge_quantile : float or None
        ws: measure a face by this quantile (in (0, 1]) of its pixels' boundary probabilities;
        None: by their mean.
    keep_boundaries : bool
        Leave boundary pixels 0 instead of giving them to the cells.
    invert : bool
        The map is a boundary map (1 = membrane, e.g. another tool's): read ``1 - p``.
    block_size : tuple of int, optional
        Block shape, one number per axis of the prediction (None: about 4 M pixels). The labels
        do not depend on it.
    grow : int or None
        How far, in pixels, a flood carries a label; also the context a block reads. None: 32
        for a probability map, 4 for affinities (``emtile.segmenter.driver.GROW``).
    levels : int
        Resolution levels of the label image (each samples every other pixel in y and x).
    seed_cap, seed_radius, interior_rounds : int
        ws with distance seeds: the distance cap, the radius of a seed's neighbourhood and the
        rounds a seed floods the interior first.
    offsets : str or None
        Affinities that record no offsets (a foreign (C, Z, Y, X) array): one ``dz,dy,dx`` per
        channel, ``;``-separated, the three nearest neighbours among them. With affinities,
        ``threshold`` links a pair (affinity above it) and ``merge_threshold`` compares
        ``1 - affinity`` of the pairs across a face (:mod:`emtile.segmenter.affinity`).
    recut : float or None
        The input is a segmentation made from affinities: relabel it at this merge threshold
        from its stored fragments and region graph (no fragments computed again).
    calibrate : {"auto", "map", "none"}
        A probability map's levels: ``map`` reads them on the scale the defaults were tuned on
        (each level becomes the reference level of the same rank in the whole map, so a map
        more or less sure of itself gets the same labels: :mod:`emtile.segmenter.levels`);
        ``none``: as stored. ``auto``: ``map`` while ``threshold`` and ``merge_threshold`` are
        the defaults, ``none`` when either is set (a given threshold means the map's own level).
        Affinities are read as stored.
    """

    method: str = "ws"
    mode: str = "auto"
    threshold: float = 0.88
    min_size: int = 0
    merge_threshold: float = 0.2
    seeds: str = "components"
    merge_quantile: Optional[float] = 0.5
    keep_boundaries: bool = False
    invert: bool = False
    block_size: Optional[tuple] = None
    grow: Optional[int] = None
    levels: int = 1
    seed_cap: int = 12
    seed_radius: int = 2
    interior_rounds: int = 40
    offsets: Optional[str] = None
    recut: Optional[float] = None
    calibrate: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise EmtileError(f"method={self.method!r} is not supported: choose cc or ws")
        if self.seeds not in SEEDS:
            raise EmtileError(f"seeds={self.seeds!r} is not supported: choose components or "
                              f"distance")
        q = self.merge_quantile
        if q is not None and (isinstance(q, bool) or not isinstance(q, Real) or not 0 < q <= 1):
            raise EmtileError(f"merge_quantile={q!r} must be a number in (0, 1], or None for "
                              f"the mean")
        _one_of("mode", self.mode, MODES)
        _one_of("calibrate", self.calibrate, CALIBRATIONS)
        _fraction("threshold", self.threshold)
        _fraction("merge_threshold", self.merge_threshold)
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, Integral) \
                or self.min_size < 0:
            raise EmtileError(f"min_size={self.min_size!r} must be a whole number of pixels, 0 "
                              f"or more")
        for name in ("seed_cap", "seed_radius", "interior_rounds"):
            _whole(name, getattr(self, name), least=1)
        if self.recut is not None:
            _fraction("recut", self.recut)


def split_overrides(settings_cls, settings, overrides, runner_cls, runner):
    """``(settings, runner)`` with ``overrides`` applied: each keyword goes to the settings
    field or the runner field of its name; any other name is one line naming it."""
    names = {f.name for f in dataclasses.fields(settings_cls)}
    runner_names = {f.name for f in dataclasses.fields(runner_cls)}
    unknown = sorted(set(overrides) - names - runner_names)
    if unknown:
        raise EmtileError(f"{unknown[0]}= is not a setting: choose among "
                          f"{', '.join(sorted(names | runner_names))}")
    mine = {k: v for k, v in overrides.items() if k in names}
    theirs = {k: v for k, v in overrides.items() if k in runner_names}
    if settings is None:
        settings = settings_cls(**mine)
    elif not isinstance(settings, settings_cls):
        raise EmtileError(f"settings= must be a {settings_cls.__name__}, not "
                          f"{type(settings).__name__}")
    elif mine:
        settings = dataclasses.replace(settings, **mine)
    if runner is None:
        runner = runner_cls(**theirs)
    elif theirs:
        runner = dataclasses.replace(runner, **theirs)
    return settings, runner
