"""emtile view: which layers, how they are drawn, and neuroglancer serving real stores (its
page from the installed package, each store's metadata and chunks with CORS)."""

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from emtile import EmtileError
from emtile.cli.main import main
from emtile.store import create_image, create_label_image, mark_complete
from emtile.view import ViewSettings, napari_layers, plan_layers, viewer_state

SHAPE = (4, 40, 48)
VOXEL = (40.0, 8.0, 8.0)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """raw, pred (probabilities + its mask), affinities, seg and labels: small real stores."""
    d = tmp_path_factory.mktemp("view")
    rng = np.random.default_rng(0)
    raw = create_image(d / "raw.zarr", SHAPE, np.uint8, voxel_size=VOXEL, chunks=(1, 32, 32),
                       levels=2)
    raw["0"][...] = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    raw["1"][...] = 7
    mark_complete(raw)
    pred = create_image(d / "pred.zarr", SHAPE, np.uint8, voxel_size=VOXEL, kind="probabilities")
    pred["0"][...] = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    mask = create_label_image(d / "pred.zarr" / "labels" / "mask", SHAPE, np.uint8,
                              source="../../")
    mask["0"][...] = pred["0"][...] > 127
    mark_complete(mask)
    mark_complete(pred)
    for name, chunks in (("aff.zarr", None), ("aff3.zarr", (3, 1, 40, 48))):
        # channels chunked apart (as create_image chunks them by default), or together
        aff = create_image(d / name, (3, *SHAPE), "uint8", axes="czyx", voxel_size=VOXEL,
                           chunks=chunks, kind="probabilities",
                           attrs={"target": "affinities",
                                  "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
        aff["0"][...] = 0
        aff["0"][0, :, :SHAPE[1] // 2] = 255  # channel 0 (red) in the top half,
        aff["0"][1, :, SHAPE[1] // 2:] = 255  # channel 1 (green) in the bottom half
        mark_complete(aff)
    seg = create_image(d / "seg.zarr", SHAPE, np.uint32, voxel_size=VOXEL, kind="labels",
                       attrs={"segment": {}})
    seg["0"][...] = np.broadcast_to((np.arange(SHAPE[2]) // 12 + 1).astype(np.uint32), SHAPE)
    mark_complete(seg)
    labels = create_image(d / "labels.zarr", SHAPE, np.uint8, voxel_size=VOXEL, kind="labels")
    labels["0"][...] = 1
    mark_complete(labels)
    (d / "raw.tif").write_bytes(b"II*\0")
    return d


def test_layers_are_named_and_drawn_by_what_each_store_holds(stores):
    d = stores
    layers = plan_layers(d / "raw.zarr", pred=d / "pred.zarr", seg=d / "seg.zarr",
                         labels=d / "labels.zarr")
    got = [(l.name, l.kind, l.style, l.visible) for l in layers]
    assert got == [("raw", "image", "grey", True), ("pred", "image", "heat", True),
                   ("mask", "segmentation", "segments", False),
                   ("seg", "segmentation", "segments", True),
                   ("labels", "segmentation", "segments", False)]
    assert layers[0].voxel_size == VOXEL and layers[0].datasets == ("0", "1")
    aff = plan_layers(pred=d / "aff3.zarr")[0]
    assert (aff.name, aff.style, aff.axes, aff.shape) == ("affinities", "rgb", "czyx", (3, *SHAPE))
    assert aff.channel_chunk == 3

    state = viewer_state(layers + [aff], {l.name: f"http://h/{l.name}" for l in layers + [aff]})
    assert state["dimensions"] == {a: [v * 1e-9, "m"] for a, v in zip("zyx", VOXEL)}
    assert state["layout"] == "4panel" and state["displayDimensions"] == ["x", "y", "z"]
    by_name = {l["name"]: l for l in state["layers"]}
    assert by_name["raw"]["source"] == "zarr3://http://h/raw/"
    assert "emitGrayscale" in by_name["raw"]["shader"]
    assert "colormapJet" in by_name["pred"]["shader"] and "range=[0, 255]" in by_name["pred"]["shader"]
    assert by_name["seg"]["type"] == "segmentation" and "shader" not in by_name["seg"]
    rgb = by_name["affinities"]
    assert rgb["source"]["transform"]["outputDimensions"] == {
        "c^": [1, ""], **{a: [v * 1e-9, "m"] for a, v in zip("zyx", VOXEL)}}
    assert all(f"getDataValue({i})" in rgb["shader"] for i in range(3))
    # channels in chunks of one: neuroglancer cannot make them a channel dimension
    apart = plan_layers(pred=d / "aff.zarr")[0]
    three = viewer_state([apart], {"affinities": "http://h/a"})["layers"]
    assert [(l["name"], l["source"], l["localPosition"]) for l in three] == [
        (f"affinities {k}", "zarr3://http://h/a/", [k]) for k in range(3)]
    assert [l["shader"].count("vec3(v") for l in three] == [1, 0, 0] and all(
        l["blend"] == "additive" for l in three)


@pytest.mark.parametrize("kwargs, line", [
    ({}, "nothing to show: give raw="),
    ({"raw": "nowhere.zarr"}, "raw='nowhere.zarr' does not exist"),
    ({"raw": "raw.tif"}, "is not a Zarr / OME-Zarr store: emtile view shows stores (emtile "
                         "convert raw.tif raw.zarr makes one)"),
])
def test_what_cannot_be_shown_is_one_line(stores, monkeypatch, kwargs, line):
    monkeypatch.chdir(stores)
    with pytest.raises(EmtileError, match=re.escape(line)):
        plan_layers(**kwargs)
    with pytest.raises(EmtileError, match="viewer='vtk' is not a viewer"):
        ViewSettings(viewer="vtk")
    args = ["view", *([kwargs["raw"]] if "raw" in kwargs else []), "--no-browser"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_cli_defaults_are_the_settings_fields():
    import click
    import dataclasses

    cmd = main.get_command(click.Context(main), "view")
    params = {p.name: p for p in cmd.params}
    for f in dataclasses.fields(ViewSettings):
        assert params[f.name].default == f.default, f.name


def _get(url, origin=None):
    req = urllib.request.Request(url, headers={"Origin": origin} if origin else {})
    with urllib.request.urlopen(req, timeout=20) as r:
        return r.status, dict(r.headers), r.read()


def test_neuroglancer_serves_the_page_from_the_package_and_every_layer(stores):
    """The page and its JavaScript come from the installed neuroglancer package (no address
    outside this machine in it); each layer's metadata and a chunk come back, byte for byte,
    with the CORS header the page needs to read them from another port."""
    pytest.importorskip("neuroglancer")
    import neuroglancer

    from emtile.view import NeuroglancerView

    d = stores
    layers = plan_layers(d / "raw.zarr", pred=d / "aff.zarr", seg=d / "seg.zarr")
    with NeuroglancerView(layers) as shown:
        status, headers, page = _get(shown.url)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        client = Path(neuroglancer.__file__).parent / "static" / "client"
        assert page == (client / "index.html").read_bytes()
        assert not re.search(rb"(src|href)=\"?(https?:)?//", page)  # nothing from the internet
        script = re.search(rb'src="?([^" >]+\.js)', page).group(1).decode()
        status, _, js = _get(shown.url + script)
        assert status == 200 and js == (client / script).read_bytes()
        origin = shown.url.split("/v/")[0]
        for layer in layers:
            base = shown.sources[layer.name]
            status, headers, meta = _get(base + "/zarr.json", origin=origin)
            assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
            assert json.loads(meta)["attributes"]["ome"]["version"] == "0.5"
            key = "0/c/" + "/".join("0" * len(layer.shape))
            status, headers, chunk = _get(f"{base}/{key}", origin=origin)
            assert chunk == (Path(layer.path) / key).read_bytes() and len(chunk) > 0
        state = shown.viewer.state.to_json()
        assert [l["name"] for l in state["layers"]] == ["raw", "affinities 0", "affinities 1",
                                                        "affinities 2", "seg"]
        assert state["layers"][0]["source"] == f"zarr3://{shown.sources['raw']}/"
        with pytest.raises(urllib.error.HTTPError):  # only the store's own files
            _get(shown.sources["raw"] + "/../seg.zarr/zarr.json")
    with pytest.raises(OSError):  # stopped
        _get(shown.url)


def test_cli_prints_the_url_and_serves_until_ctrl_c(stores):
    pytest.importorskip("neuroglancer")
    d = stores
    proc = subprocess.Popen([sys.executable, "-m", "emtile.cli.main", "view", str(d / "raw.zarr"),
                             "--pred", str(d / "pred.zarr"), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v/\w+/", url), url
        assert _get(url)[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "serving until Ctrl-C" in err and err.strip().endswith("stopped")
    assert "pred: " in err and "mask: " in err


def test_napari_gets_lazy_levels_with_the_voxel_size(stores):
    """What napari is given, checked without a display (napari itself is not installed here)."""
    d = stores
    calls = napari_layers(plan_layers(d / "raw.zarr", pred=d / "aff.zarr", seg=d / "seg.zarr"))
    (m0, raw, k0), (m1, aff, k1), (m2, seg, k2) = calls
    assert (m0, m1, m2) == ("add_image", "add_image", "add_labels")
    assert k0["multiscale"] and [a.shape for a in raw] == [SHAPE, (4, 20, 24)]
    assert k0["scale"] == VOXEL and k0["colormap"] == "gray" and k0["contrast_limits"] == (0, 255)
    assert k1["channel_axis"] == 0 and k1["colormap"] == ["red", "green", "blue"]
    assert aff.shape == (3, *SHAPE) and not k1["multiscale"]
    np.testing.assert_array_equal(np.asarray(seg[0, 0]),
                                  (np.arange(SHAPE[2]) // 12 + 1).astype(np.uint32))


def _browser():
    """A headless Chromium: $EMTILE_BROWSER, or one on the PATH; None when there is none."""
    import os
    import shutil

    found = os.environ.get("EMTILE_BROWSER")
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        found = found or shutil.which(name)
    return found


class _Headless:
    """A headless Chromium showing ``url`` while the block runs (software WebGL)."""

    def __init__(self, url):
        self.url = url

    def __enter__(self):
        self.proc = subprocess.Popen(
            [_browser(), "--headless", "--no-sandbox", "--enable-unsafe-swiftshader",
             "--use-angle=swiftshader", "--window-size=800,600", "--remote-debugging-port=0",
             self.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def _shot(viewer):
    """neuroglancer's own screenshot (taken once every visible chunk is drawn), RGB."""
    return viewer.screenshot(size=[400, 300]).screenshot.image_pixels[..., :3].astype(int)


needs_browser = pytest.mark.skipif(_browser() is None,
                                   reason="no headless Chromium here (set EMTILE_BROWSER)")


@needs_browser
@pytest.mark.parametrize("pred", ["aff.zarr", "aff3.zarr"])
def test_a_headless_browser_draws_the_affinities(stores, pred):
    """The affinities' channel 0 (red) above their channel 1 (green), whether the store chunks
    its channels together (one layer) or apart (three), not an empty canvas."""
    pytest.importorskip("neuroglancer")
    from emtile.view import NeuroglancerView

    with NeuroglancerView(plan_layers(pred=stores / pred)) as shown:
        with shown.viewer.txn() as s:
            s.layout = "xy"
            s.show_axis_lines = False  # no cross-hair through the middle
        with _Headless(shown.url):
            img = _shot(shown.viewer)
    cy, cx = img.shape[0] // 2, img.shape[1] // 2
    top, bottom = img[cy - 12, cx], img[cy + 12, cx]
    assert top[0] > 100 and top[1] < 20 and top[2] < 20, (top, bottom)  # red
    assert bottom[1] > 100 and bottom[0] < 20 and bottom[2] < 20, (top, bottom)  # green


@needs_browser
def test_a_headless_browser_draws_raw_in_grey_and_segments_and_heat_in_colour(stores):
    pytest.importorskip("neuroglancer")
    from emtile.view import NeuroglancerView

    d = stores
    with NeuroglancerView(plan_layers(d / "raw.zarr", pred=d / "pred.zarr",
                                      seg=d / "seg.zarr")) as shown:
        with shown.viewer.txn() as s:
            s.layout = "xy"
            s.show_axis_lines = False  # no cross-hair through the middle
            s.layers["seg"].visible = s.layers["pred"].visible = False
        with _Headless(shown.url):
            raw = _shot(shown.viewer)
            with shown.viewer.txn() as s:
                s.layers["seg"].visible = True
            both = _shot(shown.viewer)
            with shown.viewer.txn() as s:
                s.layers["seg"].visible, s.layers["pred"].visible = False, True
            heat = _shot(shown.viewer)
    cy, cx = raw.shape[0] // 2, raw.shape[1] // 2
    crop = (slice(cy - 10, cy + 10), slice(cx - 10, cx + 10))
    grey = raw[crop]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert grey[..., 0].std() > 20  # the raw volume's noise, not a flat canvas
    coloured = both[crop]
    assert (coloured[..., 0] != coloured[..., 1]).mean() > 0.5  # segment colours over it
    hot = heat[crop]
    assert (hot[..., 0] != hot[..., 2]).mean() > 0.5  # the heat map's colours over it
