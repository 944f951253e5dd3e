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


_KEYWORD = re.compile(r"\b([a-z][a-z0-9_]*)=('[^']*'|\"[^\"]*\"|\S*)")


def as_flags(message, command):
    """A library error names keyword arguments (``threshold=1.5``, ``overwrite=True``); on the
    command line it names the command's flags instead (``--threshold 1.5``, ``--overwrite``).
    Names that are not options of ``command`` are left as they are."""
    if command is None:
        return message
    flags = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name:
            flags[p.name] = (max(p.opts, key=len), p.is_flag)

    def flag(match):
        name, value = match.groups()
        if name not in flags:
            return match.group(0)
        text, is_flag = flags[name]
        stripped = value.rstrip(",.;:)")
        tail = value[len(stripped):]
        if is_flag and stripped in ("True", ""):
            return text + tail
        if "/" not in stripped and os.sep not in stripped:  # a path keeps its quotes
            stripped = stripped.strip("'\"")
        return f"{text} {stripped}{tail}" if stripped else text + tail

    return _KEYWORD.sub(flag, message)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """emtile's own warnings (user-facing: an input far from the training data, overlapping
    slices) as one ``Warning: ...`` line on stderr; anything else as Python prints it."""
    if category.__module__.startswith("emtile") or os.path.abspath(str(filename)).startswith(_OWN):
        click.echo(f"Warning: {message}", err=True)
    else:
        click.echo(warnings.formatwarning(message, category, filename, lineno, line).rstrip(),
                   err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="emtile")
def main():
    """Tiled training and inference of U-Nets on large electron-microscopy volumes."""


if __name__ == "__main__":
    main()
