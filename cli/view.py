"""``emtile view``: the raw volume, its prediction, segmentation and labels in neuroglancer
(served from here until Ctrl-C) or napari."""

import click

from emtile.cli._types import defaults
from emtile.view import ViewSettings

_D = defaults(ViewSettings)
_HELP = {f: ViewSettings.__dataclass_fields__[f].metadata["help"] for f in _D.__dict__}


@click.command()
@click.argument("raw", required=False)
@click.option("--pred", default=None,
              help="Prediction store (pred.zarr): probabilities as a heat map, affinities as "
                   "RGB; its predicted mask comes along, hidden.")
@click.option("--seg", default=None, help="Segmentation store (seg.zarr): a colour per object.")
@click.option("--labels", default=None,
              help="Labels store (binary or instance ids, from emtile convert), hidden at first.")
@click.option("--viewer", type=click.Choice(["neuroglancer", "napari"]), default=_D.viewer,
              show_default=True, help=_HELP["viewer"])
@click.option("--port", type=click.IntRange(0, 65535), default=_D.port, show_default=True,
              help=_HELP["port"])
@click.option("--bind", default=_D.bind, show_default=True, help=_HELP["bind"])
@click.option("--browser/--no-browser", default=_D.browser, show_default=True,
              help=_HELP["browser"])
def view(raw, pred, seg, labels, viewer, port, bind, browser):
    """Show RAW (an OME-Zarr store, e.g. from emtile convert) with --pred, --seg and --labels
    in neuroglancer: the stores are served read-only from this machine (127.0.0.1 unless
    --bind says otherwise), the page's URL is printed and opened in your browser, and it keeps
    serving until Ctrl-C. With --viewer napari they open in a napari window instead.

    Needs pip install 'emtile[view]' (neuroglancer) or 'emtile[napari]'. On a remote machine,
    tunnel the printed port and the stores' ports (or --bind 0.0.0.0 on a trusted network)."""
    from emtile.view import NeuroglancerView, open_napari, plan_layers

    settings = ViewSettings(viewer=viewer, port=port, bind=bind, browser=browser)
    layers = plan_layers(raw, pred=pred, seg=seg, labels=labels)
    if settings.viewer == "napari":
        open_napari(layers)
        return
    with NeuroglancerView(layers, port=settings.port, bind=settings.bind) as shown:
        click.echo(shown.url)
        for layer in layers:
            click.echo(f"  {layer.name}: {layer.path} ({layer.kind}, {layer.style})", err=True)
        click.echo("serving until Ctrl-C", err=True)
        if settings.browser:
            import webbrowser

            webbrowser.open(shown.url)
        _serve_until_interrupted()


def _serve_until_interrupted():
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
