"""click parameter types and options shared by the commands, so that one option means one thing
with the same values everywhere: integer tuples, slice lists, ROIs, ``--device``, ``--amp``,
``--progress/--no-progress`` and the words for raw images and labels.

Each type turns a malformed value into a usage error that names the option, the value and the
accepted form, e.g. ``--roi '0:5,a:b' is not a valid ROI: expected start:stop per axis``.
"""

import re

import click

#: How every command describes its raw image and label volumes.
RAW_HELP = "Image volume (TIFF, image folder, Zarr / OME-Zarr, HDF5), axes Z,Y,X."
LABELS_HELP = ("Binary labels of the same shape: 1 (or 255) = cell interior, 0 = membrane "
               "(emtile convert --labels writes them); for --target affinities (and 2-D "
               "boundaries from objects) instance ids, 0 = unlabelled (emtile convert --labels "
               "--ids).")


class IntTuple(click.ParamType):
    """``Z,Y,X`` comma-separated positive numbers (``length`` of them, when given)."""

    name = "N,N,N"

    def __init__(self, length=None, *, cast=int, positive=True, example="1,512,512",
                 names="Z,Y,X"):
        self.length = length
        self.cast = cast
        self.positive = positive
        self.example = example
        self.names = names
        self.name = names

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        kind = "numbers" if self.cast is float else "integers"
        try:
            out = tuple(self.cast(v) for v in text.split(","))
        except ValueError:
            self.fail(f"{text} is not a comma-separated list of {kind}: give {self.names}, "
                      f"e.g. {self.example}", param, ctx)
        if self.length is not None and len(out) != self.length:
            self.fail(f"{text} has {len(out)} value{'s' if len(out) != 1 else ''}; give "
                      f"{self.length} ({self.names}), e.g. {self.example}", param, ctx)
        if self.positive and any(v <= 0 for v in out):
            self.fail(f"{text}: every value must be positive, e.g. {self.example}", param, ctx)
        return out


class Sizes(click.ParamType):
    """Positive integers separated by commas, one per axis (``572`` or ``20,132,132``), or one
    of :attr:`words`; a subclass sets the wording of its two errors. One number is returned as an
    int when :attr:`scalar`, else every value as a tuple."""

    name = "N|Z,Y,X"
    words = ()
    invalid = "is not a list of sizes: give Z,Y,X"
    nonpositive = "every size must be positive"
    scalar = True

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, (int, tuple)) or value in self.words:
            return value
        try:
            sizes = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} {self.invalid}", param, ctx)
        if min(sizes) <= 0:
            self.fail(f"{value!r}: {self.nonpositive}", param, ctx)
        return sizes[0] if self.scalar and len(sizes) == 1 else sizes


class Shards(Sizes):
    """``auto``, ``none`` or a shard shape ``Z,Y,X`` (positive integers): predict and convert."""

    name = "auto|none|Z,Y,X"
    words = ("auto", "none")
    invalid = "is not a shard shape: give auto, none or Z,Y,X such as 16,512,512"
    nonpositive = "every shard size must be positive"
    scalar = False


class Device(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    name = "auto|cpu|cuda|cuda:N"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
            return text
        self.fail(f"{value!r} is not a device: choose auto, cpu, cuda or cuda:N (e.g. cuda:1)",
                  param, ctx)


def device_option():
    """``--device``, the same in every command."""
    return click.option("--device", type=Device(), default="auto", show_default=True,
                        help="Where the model runs: auto (a CUDA device when there is one), "
                             "cpu, cuda or cuda:N (the N-th CUDA device).")


def amp_option(default, note=""):
    """``--amp MODE``, the same in every command (``--amp`` alone is ``auto``)."""
    from emtile.device import AMP_CHOICES

    return click.option(
        "--amp", type=click.Choice(AMP_CHOICES), default=default, show_default=True,
        is_flag=False, flag_value="auto",
        help="Mixed precision of the forward pass: off (float32), bf16, fp16, or auto (bf16 "
             "where the device runs it natively: CUDA, CPUs with AVX512-BF16 or AMX; fp16 on "
             "older CUDA; else off). --amp alone means auto." + note)


def progress_option():
    """``--progress/--no-progress``, the same in every command."""
    return click.option("--progress/--no-progress", default=True, show_default=True,
                        help="Show a progress bar.")


def parse_slice(text):
    """``'25:30'`` -> ``slice(25, 30)``; ``':5'``, ``'3:'`` and ``':'`` work as in Python."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(text)
    start, stop = (int(p) if p.strip() else None for p in parts)
    return slice(start, stop)


class SliceList(click.ParamType):
    """Slice indices: ``25:30`` (a range), ``25,27`` (a list) or ``3`` -> a slice or list of ints."""

    name = "SLICES"

    def convert(self, value, param, ctx):
        if isinstance(value, (slice, list)):
            return value
        text = str(value).strip()
        try:
            if ":" in text:
                return parse_slice(text)
            return [int(v) for v in text.split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a slice range like 25:30 or a list like 25,27", param, ctx)


class Roi(click.ParamType):
    """``z0:z1,y0:y1,x0:x1`` -> a tuple of slices (one per axis, empty bounds allowed)."""

    name = "ROI"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(parse_slice(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a valid ROI: expected start:stop per axis, e.g. 0:5,0:256,0:256",
                      param, ctx)


def defaults(cls):
    """The field defaults of a settings dataclass, by name (``defaults(PredictSettings).tile``):
    every command takes its options' defaults from here, so each default lives once."""
    import dataclasses
    from types import SimpleNamespace

    return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(cls)
                              if f.default is not dataclasses.MISSING})


def _runner_option(f):
    """The click option of one :class:`emtile.blockwise.Runner` field, from its metadata."""
    import typing

    meta = f.metadata
    kind = next((t for t in (f.type, *typing.get_args(f.type)) if t in (int, float, str)), str)
    if meta.get("path"):
        type_ = click.Path()
    elif kind is int:
        type_ = click.IntRange(min=meta.get("min"))
    elif kind is float:
        type_ = click.FloatRange(min=meta.get("min"), min_open=True)
    else:
        type_ = None
    return click.option("--" + f.name.replace("_", "-"), f.name, default=f.default, type=type_,
                        show_default=f.default is not None, metavar=meta.get("metavar"),
                        help=meta["help"])


def runner_options():
    """``--cluster``, ``--cluster-workers``, ``--scheduler-file``, ``--blocks-per-task``,
    ``--retries`` and ``--cluster-timeout``: where a blockwise command's blocks run, built once from the
    fields of :class:`emtile.blockwise.Runner`, so they mean the same in every command."""
    import dataclasses

    from emtile.blockwise import Runner

    options = [_runner_option(f) for f in dataclasses.fields(Runner)
               if f.metadata.get("cli", True)]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def pop_runner(params):
    """The :class:`emtile.blockwise.Runner` of a command's options, taken out of ``params``."""
    import dataclasses

    from emtile.blockwise import Runner

    names = [f.name for f in dataclasses.fields(Runner) if f.metadata.get("cli", True)]
    return Runner(**{n: params.pop(n) for n in names if n in params})
