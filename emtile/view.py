"""Look at emtile's stores: the raw volume, its prediction, its segmentation and labels, in
neuroglancer (served from here) or napari.

Which layer is which, and how it is drawn, is decided once (:func:`plan_layers`), from what each
store records (its ``emtile`` attributes, its NGFF metadata):

=========== ===================================== ==========================================
role        store                                 layer
=========== ===================================== ==========================================
raw         an image                              image, grey
pred        probabilities ``(Z, Y, X)``           image, a heat map (jet) over the raw, 50 %
pred        affinities ``(C, Z, Y, X)``           channels 0, 1, 2 as red, green, blue
pred        its ``labels/mask`` (when present)    segmentation, hidden
seg         a label image (emtile segment's)      segmentation (a colour per id)
labels      binary labels or instance ids          segmentation, hidden
=========== ===================================== ==========================================

**Neuroglancer.** :class:`NeuroglancerView` serves each store read-only over HTTP with CORS
(neuroglancer's own ``StaticFileServer``, one per store, under a random token, on 127.0.0.1 by
default) and starts neuroglancer's Python viewer, whose page and JavaScript come from the
installed ``neuroglancer`` package (nothing is fetched from the internet). The browser reads the
stores as ``zarr3://`` (``zarr://`` for Zarr v2) sources and their NGFF 0.5 metadata itself:
levels, voxel size, a region's translation. The viewer's dimensions are the raw volume's voxel
size (:func:`emtile.store.voxel_size`), in nm, shown x right, y down. Affinities are one layer
whose channel axis is a neuroglancer channel dimension (``c^``) when each chunk holds the first
three channels (neuroglancer cannot split a channel dimension across chunks), else three
additive layers, one per channel (its ``c'`` position), in red, green and blue.

**napari.** :func:`napari_layers` gives each layer's ``add_image`` / ``add_labels`` call (lazy
Dask arrays of every level, the voxel size as ``scale``, colours), so napari needs no reader
plugin; :func:`open_napari` makes them in a viewer.

Neither viewer is a dependency: ``pip install 'emtile[view]'`` (neuroglancer) or
``pip install 'emtile[napari]'``; a missing one is one line.
"""

from dataclasses import dataclass, field
from pathlib import Path

from emtile._errors import EmtileError

__all__ = ["ViewSettings", "Layer", "plan_layers", "viewer_state", "NeuroglancerView",
           "napari_layers", "open_napari", "VIEWERS", "ROLES"]

VIEWERS = ("neuroglancer", "napari")
ROLES = ("raw", "pred", "seg", "labels")


@dataclass(frozen=True)
class ViewSettings:
    """How ``emtile view`` shows its stores (the CLI's defaults are these fields)."""

    #: neuroglancer (served here, opened in the browser) or napari (a window on this machine).
    viewer: str = field(default="neuroglancer", metadata={
        "help": "neuroglancer (served from here, opened in your browser) or napari."})
    #: The neuroglancer page's port (0: any free one).
    port: int = field(default=0, metadata={
        "help": "Port of the neuroglancer page (0: any free port)."})
    #: The address the servers listen on (127.0.0.1: this machine only).
    bind: str = field(default="127.0.0.1", metadata={
        "help": "Address the neuroglancer servers listen on (0.0.0.0 to reach them from other "
                "machines, e.g. through an SSH tunnel's host)."})
    #: Open the page in a browser (else only print its URL).
    browser: bool = field(default=True, metadata={
        "help": "Open the neuroglancer page in a browser (--no-browser: print its URL only)."})

    def __post_init__(self):
        if self.viewer not in VIEWERS:
            raise EmtileError(f"viewer={self.viewer!r} is not a viewer: choose neuroglancer or "
                              f"napari")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 0 <= self.port <= 65535:
            raise EmtileError(f"port={self.port!r} is not a port: give 0 (any free port) to "
                              f"65535")


@dataclass(frozen=True)
class Layer:
    """One layer: which store, drawn how."""

    name: str  # the layer's name in the viewer
    role: str  # raw, pred, seg or labels
    path: str  # the Zarr group (or array) folder
    kind: str  # "image" or "segmentation"
    style: str  # "grey", "heat", "rgb" or "segments"
    dtype: str
    shape: tuple
    axes: str  # the array's axis names, e.g. "zyx" or "czyx"
    voxel_size: tuple  # nm per spatial axis, as the store records it (1 when it records none)
    zarr_format: int
    datasets: tuple  # the level arrays' paths inside ``path`` ("" for an array itself)
    visible: bool = True
    channel_chunk: int = 0  # channels per chunk (0: no channel axis)


# --------------------------------------------------------------------------- which layers


def _node(path, role):
    """The Zarr node at ``path`` (a group or an array), or a one-line error."""
    import zarr

    from emtile.store import is_zarr_store

    from emtile.locations import local_only

    local_only(path, role, "emtile view serves local stores (a public s3://, gs:// or https:// "
                           "store opens in neuroglancer directly, as zarr://URL)")
    p = Path(str(path))
    if not p.exists():
        raise EmtileError(f"{role}={str(path)!r} does not exist")
    if not is_zarr_store(p):
        raise EmtileError(f"{role}={str(path)!r} is not a Zarr / OME-Zarr store: emtile view "
                          f"shows stores (emtile convert {p.name} {p.stem}.zarr makes one)")
    try:
        return zarr.open(str(p), mode="r")
    except Exception as exc:  # damaged metadata
        raise EmtileError(f"{role}={str(path)!r} cannot be opened as Zarr: "
                          f"{type(exc).__name__}: {exc}") from None


def _levels(node):
    """``(level-0 array, dataset paths, axis names, attrs)`` of a group or an array."""
    import zarr

    from emtile.store import multiscales

    if isinstance(node, zarr.Array):
        axes = "".join(node.metadata.dimension_names or ()) if node.metadata.zarr_format == 3 \
            else ""
        return node, ("",), axes, {}
    attrs = node.attrs.asdict()
    ms = multiscales(attrs)
    paths = tuple(d["path"] for d in ms["datasets"]) if ms else ("0",)
    axes = "".join(a["name"] for a in ms["axes"]) if ms else ""
    return node[paths[0]], paths, axes, attrs


def _layer(path, role, *, name=None, visible=True):
    from emtile.store import voxel_size

    node = _node(path, role)
    try:
        array, datasets, axes, attrs = _levels(node)
    except (KeyError, TypeError, IndexError):
        raise EmtileError(f"{role}={str(path)!r} has no image at its multiscales' first dataset "
                          f"(nor at '0')") from None
    shape = tuple(int(s) for s in array.shape)
    axes = axes if len(axes) == len(shape) else {2: "yx", 3: "zyx", 4: "czyx"}.get(len(shape), "")
    if not axes or len(shape) not in (2, 3, 4):
        raise EmtileError(f"{role}={str(path)!r} has shape {shape}: emtile view shows (Y, X), "
                          f"(Z, Y, X) or (C, Z, Y, X) images")
    meta = attrs.get("emtile") or {}
    spatial = len(axes.replace("c", ""))
    voxel = voxel_size(path, spatial) if datasets != ("",) else None
    style, kind = _style(role, meta, shape, axes)
    title = name or ("affinities" if style == "rgb" else role)
    if meta and not meta.get("complete", True):
        title += " (incomplete)"
    return Layer(name=title, role=role, path=str(path), kind=kind, style=style,
                 dtype=str(array.dtype), shape=shape, axes=axes,
                 voxel_size=tuple(voxel or (1.0,) * spatial), zarr_format=node.metadata.zarr_format,
                 datasets=datasets, visible=visible,
                 channel_chunk=int(array.chunks[axes.index("c")]) if "c" in axes else 0)


def _style(role, meta, shape, axes):
    """``(style, kind)`` of a store in a role."""
    if role in ("seg", "labels"):
        return "segments", "segmentation"
    if role == "pred" and "c" in axes and meta.get("target") == "affinities":
        return "rgb", "image"
    if role == "pred" and "c" in axes and shape[axes.index("c")] != 1:
        return "rgb", "image"  # several channels: the first three as RGB
    return ("heat" if role == "pred" else "grey"), "image"


def plan_layers(raw=None, *, pred=None, seg=None, labels=None):
    """The layers of ``emtile view``, in drawing order (raw at the bottom).

    Parameters
    ----------
    raw, pred, seg, labels : str or Path, optional
        Zarr / OME-Zarr stores: the image, a prediction (probabilities or affinities; its
        predicted mask, ``pred.zarr/labels/mask``, comes along hidden), a segmentation,
        labels (binary or instance ids). At least one.

    Returns
    -------
    list of Layer
    """
    given = {"raw": raw, "pred": pred, "seg": seg, "labels": labels}
    if all(v is None for v in given.values()):
        raise EmtileError("nothing to show: give raw= (the image store) and/or pred=, seg=, "
                          "labels=")
    layers = []
    for role, path in given.items():
        if path is None:
            continue
        layers.append(_layer(path, role, visible=role != "labels"))
        mask = Path(str(path)) / "labels" / "mask"
        if role == "pred" and (mask / "zarr.json").exists():
            layers.append(_layer(mask, "pred", name="mask", visible=False))
            layers[-1] = _replace(layers[-1], kind="segmentation", style="segments")
    return layers


def _replace(layer, **changes):
    from dataclasses import replace

    return replace(layer, **changes)


# --------------------------------------------------------------------------- neuroglancer

_TOP = {"uint8": 255, "uint16": 65535, "int8": 127, "int16": 32767}


def _one_chunk_rgb(layer):
    """True when neuroglancer can read the first three channels as one channel dimension."""
    return layer.channel_chunk >= min(3, layer.shape[layer.axes.index("c")])


def _shader(layer):
    """The GLSL of an image layer: grey, a heat map, or three channels as RGB."""
    if layer.style == "grey":
        return "#uicontrol invlerp grey(clamp=true)\nvoid main() { emitGrayscale(grey()); }\n"
    if layer.style == "heat":
        top = _TOP.get(layer.dtype, 1)
        return (f"#uicontrol invlerp p(range=[0, {top}], clamp=true)\n"
                f"void main() {{ emitRGB(colormapJet(p())); }}\n")
    n = layer.shape[layer.axes.index("c")]
    r, g, b = (f"toNormalized(getDataValue({min(i, n - 1)}))" for i in range(3))
    return f"void main() {{ emitRGB(vec3({r}, {g}, {b})); }}\n"


def _source(layer, url):
    """A layer's ``source``: its store's URL, as neuroglancer names Zarr (v2 or v3); for a
    channel axis, renamed to a channel dimension (``c^``) so the shader reads channels."""
    scheme = "zarr3" if layer.zarr_format == 3 else "zarr"
    src = f"{scheme}://{url.rstrip('/')}/"
    if layer.style != "rgb" or not _one_chunk_rgb(layer):
        return src
    voxel = iter(layer.voxel_size)
    dims = {("c^" if a == "c" else a): ([1, ""] if a == "c" else [next(voxel) * 1e-9, "m"])
            for a in layer.axes}
    return {"url": src, "transform": {"outputDimensions": dims}}


def viewer_state(layers, urls):
    """Neuroglancer's JSON state for ``layers`` served at ``urls`` (``{layer name: URL}``):
    layers named and drawn as :func:`plan_layers` says, dimensions in the first layer's voxel
    size (nm), four panels for a volume, one for a single image."""
    first = layers[0]
    spatial = first.axes.replace("c", "")
    state = {
        "dimensions": {a: [v * 1e-9, "m"] for a, v in zip(spatial, first.voxel_size)},
        "displayDimensions": list(spatial[::-1]),  # x right, y down, then z
        "layers": [],
        "layout": "4panel" if "z" in spatial and first.shape[first.axes.index("z")] > 1
        else "xy",
    }
    for layer in layers:
        entry = {"type": layer.kind, "name": layer.name, "source": _source(layer, urls[layer.name]),
                 "visible": layer.visible}
        if layer.kind == "image":
            entry["shader"] = _shader(layer)
            entry["opacity"] = 1.0 if layer.style == "grey" else 0.5
            if layer.style != "grey":
                entry["blend"] = "additive"
        if layer.style == "rgb" and not _one_chunk_rgb(layer):
            state["layers"].extend(_channel_layers(entry, layer))
        else:
            state["layers"].append(entry)
    state["selectedLayer"] = {"layer": layers[-1].name, "visible": False}
    return state


def _channel_layers(entry, layer):
    """The first three channels as additive layers, red, green and blue, each at its position
    along the channel axis (``c'``): for stores that chunk their channels apart."""
    out = []
    for k in range(min(3, layer.shape[layer.axes.index("c")])):
        colour = ", ".join("v" if i == k else "0.0" for i in range(3))
        out.append({**entry, "name": f"{layer.name} {k}", "localPosition": [k],
                    "shader": "void main() { float v = toNormalized(getDataValue()); "
                              f"emitRGB(vec3({colour})); }}\n"})
    return out


def _require(module, extra):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EmtileError(f"viewer={module!r} needs the {module} package: pip install "
                          f"'emtile[{extra}]'") from None


class NeuroglancerView:
    """The stores served read-only over HTTP with CORS, and neuroglancer's viewer showing them;
    ``url`` is the page. A context manager: leaving it (or :meth:`close`) stops every server.

    Parameters
    ----------
    layers : list of Layer
        From :func:`plan_layers`.
    port : int
        The page's port (0: any free one); the stores get free ports of their own.
    bind : str
        The address every server listens on.
    """

    def __init__(self, layers, *, port=0, bind="127.0.0.1"):
        ng = _require("neuroglancer", "view")
        from neuroglancer.static_file_server import StaticFileServer

        self._ng, self._servers, self.layers = ng, [], list(layers)
        try:
            self.sources = {}
            for layer in self.layers:
                server = StaticFileServer(static_dir=layer.path, bind_address=bind, daemon=True)
                self._servers.append(server)
                self.sources[layer.name] = server.url
            ng.set_server_bind_address(bind, port)
            self.viewer = ng.Viewer()
            self.state = viewer_state(self.layers, self.sources)
            self.viewer.set_state(ng.ViewerState(self.state))
            self.url = self.viewer.get_viewer_url()
        except OSError as exc:
            self.close()
            raise EmtileError(f"port={port} on {bind} cannot be served: "
                              f"{exc.strerror or exc}; give another port, or 0 for any free "
                              f"one") from None
        except BaseException:
            self.close()
            raise

    def close(self):
        """Stop the viewer's server and every store's."""
        if getattr(self, "viewer", None) is not None:
            self._ng.server.stop()
            self.viewer = None
        while self._servers:
            self._servers.pop().stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- napari


def napari_layers(layers):
    """``[(method, data, kwargs)]``: each layer as the napari ``Viewer`` call that adds it
    (``"add_image"`` or ``"add_labels"``), its data a list of lazy Dask arrays (every level),
    ``scale`` its voxel size (nm), ``translate`` where a region starts (nm)."""
    import dask.array as da
    import zarr

    from emtile.store import offset_voxels

    calls = []
    for layer in layers:
        node = zarr.open(layer.path, mode="r")
        data = [da.from_zarr(node if p == "" else node[p]) for p in layer.datasets]
        kwargs = {"name": layer.name, "scale": layer.voxel_size, "visible": layer.visible}
        start = offset_voxels(layer.path) if layer.datasets != ("",) else None
        if start:
            kwargs["translate"] = tuple(s * v for s, v in zip(start, layer.voxel_size))
        if layer.style == "rgb":  # the first three channels, in red, green and blue
            c = layer.axes.index("c")
            data = [d[(slice(None),) * c + (slice(0, 3),)] for d in data]
            kwargs.update(channel_axis=c, colormap=["red", "green", "blue"][:data[0].shape[c]],
                          blending="additive", name=[f"{layer.name} {k}" for k in "rgb"]
                          [:data[0].shape[c]])
        elif layer.style in ("grey", "heat"):
            top = _TOP.get(layer.dtype, 1)
            kwargs.update(colormap="gray" if layer.style == "grey" else "turbo",
                          contrast_limits=(0, top))
            if layer.style == "heat":
                kwargs.update(opacity=0.5, blending="additive")
        kw = {"multiscale": len(data) > 1}
        calls.append(("add_labels" if layer.kind == "segmentation" else "add_image",
                      data if len(data) > 1 else data[0], {**kwargs, **kw}))
    return calls


def open_napari(layers, *, run=True):
    """A napari viewer showing ``layers`` (needs a display); ``run`` enters napari's event loop
    until its window is closed."""
    napari = _require("napari", "napari")
    viewer = napari.Viewer(title="emtile view")
    for method, data, kwargs in napari_layers(layers):
        getattr(viewer, method)(data, **kwargs)
    if run:
        napari.run()
    return viewer
