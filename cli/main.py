"""The ``emtile`` root command.

Each subcommand lives in its own module under ``cli/`` and is imported only when it is run (or
when ``--help`` lists it), so ``emtile --help`` stays instant. User mistakes (:class:`EmtileError`)
become a one-line ``Error: ...`` and exit code 1; anything else keeps its traceback.
"""

import importlib
import os
import re
import warnings

import click

from emtile import EmtileError, __version__

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN = (os.path.join(_ROOT, "emtile") + os.sep, os.path.join(_ROOT, "cli") + os.sep)
# command name -> "module:attribute" of its click command
COMMANDS = {
    "convert": "emtile.cli.convert:convert",
    "info": "emtile.cli.info:info",
    "predict": "emtile.cli.predict:predict",
    "bench": "emtile.cli.bench:bench",
    "train": "emtile.cli.train:train",
    "evaluate": "emtile.cli.evaluate:evaluate",
    "show": "emtile.cli.show:show",
    "export": "emtile.cli.export:export",
    "segment": "emtile.cli.segment:segment",
    "view": "emtile.cli.view:view",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self.get_command(ctx, name) is not None]

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # the command is not built yet
                return None
            raise
        return getattr(module, attr)

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            try:
                return super().invoke(ctx)
            except EmtileError as exc:
                command = self.get_command(ctx, ctx.invoked_subcommand or "")
                raise click.ClickException(as_flags(str(exc), command)) from None


# a keyword at the start, after white space or "(", with its value: quoted, or up to white space
_KEYWORD = re.compile(r"(?<![^\s(])([a-z][a-z0-9_]*)=('[^']*'|\"[^\"]*\"|\S*)")
# a quoted span (a path, a value): its quote opens after no letter or digit (not "convert's")
_QUOTED = re.compile(r"(?<![A-Za-z0-9])('[^']*'|\"[^\"]*\")")


def _names(command):
    """``{keyword: (flag or ARGUMENT, is_flag, the flag's off form)}`` of a command's params."""
    names = {}
    for p in command.params:
        if not p.name:
            continue
        if isinstance(p, click.Option):
            off = p.secondary_opts[0] if p.secondary_opts else None
            names[p.name] = (max(p.opts, key=len), p.is_flag, off)
        else:
            names[p.name] = (p.human_readable_name, False, None)
    return names


def as_flags(message, command):
    """A library error names keyword arguments (``threshold=1.5``, ``overwrite=True``,
    ``pred=``); on the command line it names the command's flags and arguments instead
    (``--threshold 1.5``, ``--overwrite``, ``PRED``). Names that are not parameters of
    ``command``, and text inside quotes (paths), are left as they are."""
    if command is None:
        return message
    names = _names(command)

    quoted = [m.span() for m in _QUOTED.finditer(message)]

    def flag(match):
        name, value = match.groups()
        if name not in names or any(a < match.start() < b for a, b in quoted):
            return match.group(0)
        text, is_flag, off = names[name]
        stripped = value.rstrip(",.;:)")
        tail = value[len(stripped):]
        if is_flag and stripped in ("True", ""):
            return text + tail
        if is_flag and stripped == "False":
            return (off or f"no {text}") + tail
        if "/" not in stripped and os.sep not in stripped:  # a path keeps its quotes
            stripped = stripped.strip("'\"")
        return f"{text} {stripped}{tail}" if stripped else text + tail

    return _KEYWORD.sub(flag, message)  # never inside quotes: '/runs/levels=2/out.zarr' stays


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """emtile's own warnings (user-facing: an input far from the training data, overlapping
    slices) as one ``Warning: ...`` line on stderr; anything else as Python prints it."""
    if category.__module__.startswith("emtile") or os.path.abspath(str(filename)).startswith(_OWN):
        ctx = click.get_current_context(silent=True)
        click.echo(f"Warning: {as_flags(str(message), ctx.command if ctx else None)}", err=True)
    else:
        click.echo(warnings.formatwarning(message, category, filename, lineno, line).rstrip(),
                   err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="emtile")
def main():
    """Tiled training and inference of U-Nets on large electron-microscopy volumes."""


if __name__ == "__main__":
    main()
