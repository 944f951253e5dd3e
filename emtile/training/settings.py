"""The settings of a training run: one typed, documented, checked object.

:class:`TrainSettings` is what ``emtile train`` builds from its options, what
:func:`emtile.train` takes (or builds from keyword arguments), what ``run.json`` and every
checkpoint's ``metadata.json`` record under ``settings``, and what ``--resume`` checks against
the run being continued. This module imports nothing heavy, so the command line can read its
choices (:data:`OPTIMIZERS`, :data:`SCHEDULES`) without loading torch.
"""

import dataclasses
from dataclasses import dataclass
from numbers import Integral

from emtile._errors import EmtileError, one_of as _one_of
from emtile.losses import AFFINITY_LOSSES, LOSSES
from emtile.training.targets import TARGETS, TILE_2D, check_target_fields

__all__ = ["TrainSettings", "OPTIMIZERS", "SCHEDULES", "TARGETS", "MODEL_DEFAULTS",
           "MODEL_DEFAULTS_3D", "TILE_2D", "jsonable"]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "poly")

#: The U-Net a new run builds when ``base``, ``depth`` or ``batch_norm`` is left as None: the
#: documented CPU recipe (0.5 M parameters). The paper's size is ``base=64`` (31 M parameters,
#: about 16 times the arithmetic per step).
MODEL_DEFAULTS = {"base": 16, "depth": 4, "batch_norm": True}
#: The 3-D network's defaults (``ndim=3``): 85 k parameters; at 10 nm, factors (2, 2, 2) twice
#: and a 72^3 tile (32^3 output) take about 0.4-0.6 s per step on 2 CPU threads.
MODEL_DEFAULTS_3D = {"base": 8, "depth": 2, "batch_norm": True}
_SLICE_FIELDS = ("train_slices", "val_slices")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides what a training run computes.

    Checked when built: a bad value raises :class:`emtile.EmtileError` naming it.

    Attributes
    ----------
    train_slices, val_slices : slice, int or list of int
        Slices to train on and to validate on (``slice(0, 25)``, ``[25, 27]``); ``val_slices``
        None skips validation (``best`` is then the last model). Overlap gives a warning.
    iterations : int
        Total optimiser steps (a resumed run continues up to this number).
    base, depth, batch_norm, dropout :
        The :class:`emtile.unet.UNet` (None: :data:`MODEL_DEFAULTS`, 16, 4, on: the CPU recipe;
        ``base=64`` is the paper's size). On resume they come from the checkpoint; giving a
        different value is an error.
    bn_momentum : float
        Momentum of the batch-norm running statistics (PyTorch's default is 0.1). With small
        batches of augmented patches, 0.1 makes the statistics used at validation and prediction
        follow the last ~10 patches: validation loss then swung 0.41 -> 0.72 -> 0.56 between
        checks at a learning rate of 2e-5 in the ISBI run. 0.01 averages over ~100 patches.
    freeze_bn : float or None
        Fraction of the run after which batch norm is frozen (with ``batch_norm`` only): its
        statistics are recomputed over ``FREEZE_BN_BATCHES`` (32) augmented training batches
        with the current weights, then stay fixed, the optimiser's moments restart, and the rest
        of the run trains the network as validation and prediction use it. Without it, a
        network trained on batches of one patch learns to rely on each patch's own statistics,
        which tiled prediction cannot use (on ISBI, validation V-Rand swung between 0.98 and
        0.41 from one check to the next). Only models validated after the freeze compete for
        ``best``. ``1.0`` or None: never.
    tile : int, (Z, Y, X) or None
        Training input patch size (a valid size for the network); the label patch is the
        model's output size for it (572 -> 388 at depth 4). None: 572 in 2-D; in 3-D the
        smallest valid input whose output spans about 32 voxels of the finest axis (the same
        physical length along each axis, at least 4 voxels; 72^3 -> 32^3 for the default
        network at 10 nm isotropic). ``"Z,Y,X"`` text is read as a tuple.
    ndim : {2, 3}
        2: slices (the paper's network, ``target="boundaries"``); 3: volumes
        (``target="affinities"``, or ``"boundaries"`` with z context): patches (Z, Y, X),
        ``train_slices`` / ``val_slices`` are z ranges (``"0:150"``), the network 3-D
        (:data:`MODEL_DEFAULTS_3D`), the loss ``affinity_loss``.
    target : {"boundaries", "affinities"}
        ``boundaries`` (binary labels, or object ids: interior where the in-plane
        4-neighbours carry the same id; one output channel; in 3-D each output voxel's
        interior probability with the sections around it as context, validated by V-Rand
        as in 2-D, not calibrated); ``affinities`` (3-D, object ids converted with
        ``emtile convert --labels --ids``): one output channel per offset, 1 = same object,
        pairs touching unlabelled voxels (or leaving the training range) out of the loss.
        No calibration for affinity models.
    offsets : str or sequence of (dz, dy, dx), optional
        Affinity offsets (``"-1,0,0;0,-1,0;0,0,-1;-3,0,0"``); None:
        :func:`emtile.affinities.default_offsets` of the training volume's voxel size.
    factors, kernels : str or sequence, optional
        3-D network: max-pool factors per level (``"1,2,2;2,2,2"``: ``depth`` entries; sets
        ``depth``) and kernel sizes per resolution level (``depth + 1``); None:
        :func:`emtile.unet.default_factors` of the voxel size and
        :func:`emtile.geometry.default_kernels`.
    affinity_loss : {"balanced_bce", "dice"}
        The affinity loss (:func:`emtile.losses.affinity_loss`).
    batch_size : int
    lr, optimizer, momentum, weight_decay :
        Base learning rate; ``"adam"`` or ``"sgd"`` (with ``momentum``, 0.99 as in the paper).
    schedule, warmup :
        ``"constant"``, ``"cosine"`` or ``"poly"`` (see :func:`emtile.training.loop.lr_factor`)
        with ``warmup`` linear-ramp iterations (None: 2% of ``iterations``, at most 200).
    loss : {"bce", "dice", "bce+dice"}
        ``bce`` is weighted by the paper's map (class balance + ``w0``, ``sigma`` border term;
        ``w0=0`` turns the border term off). ``class_balance`` is the exponent of the
        inverse-frequency class weights: ``True``/1 balances the classes (the paper),
        ``False``/0 (the default) turns class weights off, e.g. 0.5 balances halfway: with
        the border term they bias the output further towards membrane.
    workers : int
        DataLoader worker processes reading, augmenting and weighting patches (0: in-process).
    device : {"auto", "cpu", "cuda", "cuda:N"}
    amp : {"auto", "off", "bf16", "fp16"} or bool
        Mixed precision of the forward pass (:func:`emtile.device.resolve_amp`): ``"auto"``
        (the default) is bfloat16 where the device runs it natively (CUDA with bf16; CPUs with
        AVX512-BF16 or AMX, where it was 2.6× faster per step on this project's 2-core Zen 4
        machine), float16 with loss scaling on older CUDA devices, and off elsewhere. True is
        bfloat16 (float16 on CUDA without bf16) everywhere, False / None off. Validation
        always predicts in float32, as ``emtile predict`` does by default.
    clip : float, optional
        Gradient-norm clipping.
    val_every : int
        Validate (and save ``last``) every this many iterations, and at the end (0: at the end).
    val_tile : int or "auto", optional
        Tile size of validation prediction (None: ``"auto"``, the predictor's choice).
    seed : int
        Seeds the model initialisation, dropout and the patch stream.
    elastic, elastic_sigma, flip, intensity, noise, blur :
        Augmentation switches (see :class:`emtile.augment.Augmenter`; in 3-D
        :class:`emtile.augment3d.Augmenter3D`: flips, transposes among axes of one voxel size,
        in-plane elastic, intensity per section, missing and shifted sections for anisotropic
        data; ``noise`` and ``blur`` are 2-D only). ``elastic_sigma`` None: 10 px in 2-D, 4
        voxels in 3-D (in-plane, for the smaller 3-D tiles).
    foreground : float, optional
        Foreground balance of the patch sampler (see :class:`emtile.sampling.PatchDataset`).
    channels_last : bool
        Channels-last memory layout (faster convolutions on CPU; 2-D networks only).
    normalize : str
        How raw pixels become the model's input (:mod:`emtile.normalize`): ``"percentile"``
        (the default; ``"percentile:1,99.8"``), ``"minmax"`` or ``"dtype"``. Computed on the raw
        volume and recorded in the model, which ``emtile predict`` applies to its input.
    calibrate : bool
        At the end, fit a logit scale and offset on the training slices so that threshold 0.5
        gives the lowest pixel error and 0.7 the best V-Rand, and fold them into ``best``'s last
        layer (see :mod:`emtile.training.calibration`; ``last`` stays as trained, for
        resuming). With validation slices, the validation scores are measured before and after,
        and ``best`` keeps the calibrated model unless its V-Rand (best threshold) is lower by
        more than 0.01 (or ``keep_calibrated``). The record goes into ``best``'s metadata under
        ``calibration``.
    keep_calibrated : bool
        Keep the calibrated model as ``best`` even when its validation V-Rand is lower.
    tune_segment : bool
        At the very end, with validation slices (2-D boundary models only), segment the
        validation slices with ``emtile segment`` over a small grid of thresholds and merge
        thresholds and record the best pair and its V-Rand in ``best``'s metadata under
        ``segment`` (see :mod:`emtile.training.segment_tuning`), for ``emtile segment --settings
        model``.

    Examples
    --------
    >>> s = TrainSettings(train_slices=slice(0, 25), val_slices=slice(25, 30), base=16)
    >>> s.to_json()["train_slices"], s.model_args()
    ('0:25', {'base': 16, 'depth': 4, 'batch_norm': True, 'dropout': 0.0})
    >>> TrainSettings.from_json(s.to_json()) == s
    True
    """

    train_slices: object
    val_slices: object = None
    iterations: int = 3800
    base: int = None
    depth: int = None
    batch_norm: bool = None
    dropout: float = 0.0
    bn_momentum: float = 0.01
    freeze_bn: float = 0.7
    tile: object = None
    batch_size: int = 1
    lr: float = 2e-3
    optimizer: str = "adam"
    momentum: float = 0.99
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = None
    loss: str = "bce"
    w0: float = 10.0
    sigma: float = 5.0
    class_balance: float = 0.0
    workers: int = 1
    device: str = "auto"
    amp: object = "auto"
    clip: float = None
    val_every: int = 250
    val_tile: object = None
    seed: int = 0
    elastic: bool = True
    elastic_sigma: float = None
    flip: bool = True
    intensity: bool = True
    noise: float = 0.0
    blur: float = 0.0
    foreground: float = None
    channels_last: bool = True
    normalize: str = "percentile"
    calibrate: bool = True
    keep_calibrated: bool = False
    tune_segment: bool = True
    ndim: int = 2
    target: str = "boundaries"
    offsets: object = None
    factors: object = None
    kernels: object = None
    affinity_loss: str = AFFINITY_LOSSES[0]

    def __post_init__(self):
        from emtile.stacks import parse_slices

        for name in _SLICE_FIELDS:  # the CLI's text ("0:25", "25,27") from Python too
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, parse_slices(getattr(self, name), name))
        for name, lo in (("iterations", 1), ("batch_size", 1), ("workers", 0), ("val_every", 0)):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < lo:
                raise EmtileError(f"{name}={value!r} must be an integer >= {lo}")
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("loss", self.loss, LOSSES)
        if not _number(self.lr) or not self.lr > 0:
            raise EmtileError(f"lr={self.lr!r} must be positive")
        if not _number(self.bn_momentum) or not 0.0 < self.bn_momentum <= 1.0:
            raise EmtileError(f"bn_momentum={self.bn_momentum!r} must be in (0, 1]")
        freeze = self.freeze_bn
        if freeze is not None and not (_number(freeze) and 0.0 <= freeze <= 1.0):
            raise EmtileError(f"freeze_bn={self.freeze_bn!r} must be a fraction of the run in [0, 1] "
                              "(e.g. 0.7; 1 or None: never)")
        if not _number(self.class_balance) or not 0.0 <= float(self.class_balance) <= 1.0:
            raise EmtileError(f"class_balance={self.class_balance!r} must be a bool or a number in "
                              "[0, 1]")
        from emtile.device import check_amp
        from emtile.normalize import parse

        check_amp(self.amp)
        object.__setattr__(self, "normalize", str(parse(self.normalize)))
        self._check_target()

    def _check_target(self):
        """``ndim``, ``target``, ``offsets``, ``factors``, ``kernels``, ``tile``: checked, text
        parsed."""
        for name, value in check_target_fields(self).items():
            object.__setattr__(self, name, value)

    # -- derived values

    def model_args(self):
        """The :class:`emtile.unet.UNet` arguments: ``base``, ``depth``, ``batch_norm``, ``dropout``
        (None replaced by :data:`MODEL_DEFAULTS`); in 3-D also ``ndim``, ``factors`` and
        ``kernels`` (:data:`MODEL_DEFAULTS_3D`; factors None: the caller resolves them from the
        voxel size first)."""
        defaults = MODEL_DEFAULTS if self.ndim == 2 else MODEL_DEFAULTS_3D
        out = {k: default if getattr(self, k) is None else getattr(self, k)
               for k, default in defaults.items()}
        out["batch_norm"] = bool(out["batch_norm"])
        out = dict(out, dropout=self.dropout)
        if self.ndim == 3:
            out.update(ndim=3, factors=self.factors, kernels=self.kernels)
        return out

    def with_model(self, config, *, source="the run being resumed"):
        """These settings with the model fields of ``config`` (an existing model's arguments).

        A field given here (not None) that differs from ``config`` is an error naming
        ``source``; ``dropout`` is taken from ``config``.
        """
        for k in MODEL_DEFAULTS:
            value = getattr(self, k)
            if value is not None and value != config[k]:
                raise EmtileError(f"{k}={value!r} differs from {source} ({k}={config[k]!r}); "
                                  "leave it out or start a new run")
        extra = {}
        if config.get("ndim", 2) != self.ndim:
            raise EmtileError(f"ndim={self.ndim!r} differs from {source} (ndim="
                              f"{config.get('ndim', 2)!r}); leave it out or start a new run")
        if self.ndim == 3:
            for k in ("factors", "kernels"):
                given, theirs = getattr(self, k), tuple(tuple(v) for v in config[k])
                if given is not None and given != theirs:
                    raise EmtileError(f"{k}={given!r} differs from {source} ({k}={theirs!r}); "
                                      "leave it out or start a new run")
                extra[k] = theirs
        return dataclasses.replace(self, base=config["base"], depth=config["depth"],
                                   batch_norm=bool(config["batch_norm"]),
                                   dropout=config.get("dropout", self.dropout), **extra)

    def warmup_steps(self):
        """Linear warm-up iterations: ``warmup``, or 2% of ``iterations`` (at most 200)."""
        return min(200, self.iterations // 50) if self.warmup is None else int(self.warmup)

    def freeze_step(self):
        """The step after which batch norm is frozen, or None (never, or no batch norm)."""
        if self.freeze_bn is None or self.freeze_bn >= 1.0 or not self.model_args()["batch_norm"]:
            return None
        return int(round(self.freeze_bn * self.iterations))

    # -- run.json

    def to_json(self):
        """A JSON-ready dict of every field (slices as ``"start:stop"`` text)."""
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data):
        """Settings from :meth:`to_json`'s dict (e.g. ``run.json["settings"]``); unknown keys
        (from other emtile versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for k in _SLICE_FIELDS:
            if isinstance(values.get(k), str):
                start, _, stop = values[k].partition(":")
                values[k] = slice(int(start) if start else None, int(stop) if stop else None)
        return cls(**values)


def _number(value):
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def jsonable(v):
    """A setting's or a score's value as JSON: slices as ``"start:stop"``, ranges and tuples as lists,
    NumPy scalars as numbers; anything else JSON cannot hold as its ``repr``."""
    if isinstance(v, slice):
        return f"{'' if v.start is None else v.start}:{'' if v.stop is None else v.stop}"
    if isinstance(v, (range, tuple, list)):
        return [jsonable(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (bool, int, float, str)):  # NumPy scalars
        return v.item()
    if v is not None and not isinstance(v, (bool, int, float, str, dict)):
        return repr(v)
    return v
