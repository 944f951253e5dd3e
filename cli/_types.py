"""click parameter types shared by the commands: integer tuples, slice lists and ROIs.

Each type turns a malformed value into a usage error that names the option, the value and the
accepted form, e.g. ``--roi '0:5,a:b' is not a valid ROI: expected start:stop per axis``.
"""

import click


class IntTuple(click.ParamType):
    """``Z,Y,X`` (or any fixed or free length) comma-separated positive numbers."""

    name = "N,N,N"

    def __init__(self, length=None, *, cast=int, positive=True):
        self.length = length
        self.cast = cast
        self.positive = positive

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            out = tuple(self.cast(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 1,512,512", param, ctx)
        if self.length is not None and len(out) != self.length:
            self.fail(f"{value!r} has {len(out)} values; expected {self.length}", param, ctx)
        if self.positive and any(v <= 0 for v in out):
            self.fail(f"{value!r}: every value must be positive", param, ctx)
        return out


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
