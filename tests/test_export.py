"""emtile.export / emtile.package: bioimage.io model packages, written and read back.

Real files throughout: tiny U-Nets saved with emtile.save_model, an ISBI crop in a Zarr store,
real zips. Writing needs the bioimageio extra (installed in CI by .ci/setup); reading does not.
"""

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

import emtile
from emtile import EmtileError
from emtile.cli.main import main
from emtile.geometry import ShapeMap
from emtile.package import input_description, output_description, preprocessing
from emtile.model import load_model
from emtile.normalize import dtype_scaled
from emtile.unet import UNet, save_model

REPO = Path(__file__).resolve().parents[1]
spec = pytest.importorskip("bioimageio.spec")  # the writer needs it; CI installs the extra


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def make_model(folder, volume, *, depth=2, base=4, batch_norm=False, seed=0):
    """A U-Net folder whose output varies over an EM image (a random PyTorch-initialised one is
    nearly constant): He-initialised convolutions, a steep head."""
    torch.manual_seed(seed)
    net = UNet(base=base, depth=depth, batch_norm=batch_norm).eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    net.head.weight.data *= 10
    if batch_norm:  # non-trivial running statistics, as a trained model has
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    meta = {"emtile": {"kind": "best", "raw": str(volume), "train_slices": [0, 1],
                       "val_slices": [2], "iteration": 10, "iterations": 10,
                       "metrics": {"val_vrand": 0.5, "val_pixel_error": 0.25}}}
    return save_model(net, folder, metadata=meta)


@pytest.fixture(scope="module")
def volume(tmp_path_factory, isbi_raw):
    """Three ISBI slices, 120 x 130 pixels, in a Zarr store (uint8)."""
    path = tmp_path_factory.mktemp("vol") / "vol.zarr"
    arr = zarr.create_array(path, shape=(3, 120, 130), chunks=(1, 64, 64), dtype="uint8",
                            zarr_format=3)
    arr[:] = isbi_raw[25:28, 100:220, 200:330]
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, volume):
    """A batch-norm U-Net folder and its package (with TorchScript weights)."""
    d = tmp_path_factory.mktemp("exported")
    folder = make_model(d / "model", volume, batch_norm=True)
    result = emtile.export_model(folder, d / "model.zip", torchscript=True)
    return folder, d / "model.zip", result


def read_rdf(package):
    with zipfile.ZipFile(package) as z:
        return yaml.safe_load(z.read("rdf.yaml"))


def rewrite(src, dst, *, edit=None, drop=(), replace=None):
    """Copy the package ``src`` to ``dst`` with rdf.yaml edited by ``edit(rdf)``, files dropped
    or replaced; a replaced weights file gets its sha256 recorded (so the check after it runs)."""
    replace = dict(replace or {})
    with zipfile.ZipFile(src) as z:
        files = {n: z.read(n) for n in z.namelist() if n not in drop}
    rdf = yaml.safe_load(files["rdf.yaml"])
    files.update(replace)
    if "weights.pt" in replace:
        rdf["weights"]["pytorch_state_dict"]["sha256"] = hashlib.sha256(
            replace["weights.pt"]).hexdigest()
    if edit is not None:
        edit(rdf)
    if "rdf.yaml" not in replace:
        files["rdf.yaml"] = yaml.safe_dump(rdf, sort_keys=False).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return dst


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------------------ geometry


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_valid_sizes_are_exactly_min_plus_k_step(depth):
    """What the package declares (min + n * step, output = input - 2 * halo) is ShapeMap's
    whole set of valid sizes, nothing more and nothing less."""
    sm = ShapeMap(depth)
    hi = sm.min_size + 40 * sm.align
    assert sm.valid_sizes(1, hi) == list(range(sm.min_size, hi + 1, sm.align))
    for n in sm.valid_sizes(1, hi):
        assert sm.output_size(n) == n - 2 * sm.halo


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_rdf_geometry_is_the_shape_map(tmp_path, volume, depth):
    folder = make_model(tmp_path / "m", volume, depth=depth, base=1)
    emtile.export_model(folder, tmp_path / "m.zip")
    rdf, sm = read_rdf(tmp_path / "m.zip"), ShapeMap(depth)
    inp, out = rdf["inputs"][0], rdf["outputs"][0]
    assert [a["type"] for a in inp["axes"]] == ["batch", "channel", "space", "space"]
    assert [a["type"] for a in out["axes"]] == ["batch", "channel", "space", "space"]
    for i, axis in ((2, "y"), (3, "x")):
        assert inp["axes"][i]["id"] == out["axes"][i]["id"] == axis
        assert inp["axes"][i]["size"] == {"min": sm.min_size, "step": 2**depth}
        assert out["axes"][i]["size"] == {"tensor_id": inp["id"], "axis_id": axis,
                                          "offset": -2 * sm.halo}
        assert "halo" not in out["axes"][i]  # the model crops it itself: an offset, not a halo
    assert rdf["config"]["emtile"]["geometry"] == {"min_size": sm.min_size, "step": sm.align,
                                                   "halo": sm.halo, "depth": depth}
    # the test tensors have a valid size and the model's output size
    with zipfile.ZipFile(tmp_path / "m.zip") as z:
        x = np.load(io.BytesIO(z.read("test_input.npy")))
        y = np.load(io.BytesIO(z.read("test_output.npy")))
    assert sm.is_valid(x.shape[-1]) and y.shape[-2:] == tuple(s - 2 * sm.halo for s in x.shape[-2:])


# ------------------------------------------------------------------ what the package holds


def test_package_contents(exported, volume, isbi_raw):
    folder, package, result = exported
    rdf = read_rdf(package)
    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
        x = np.load(io.BytesIO(z.read("test_input.npy")))
        y = np.load(io.BytesIO(z.read("test_output.npy")))
        readme = z.read("README.md").decode()
        meta = json.loads(z.read("metadata.json"))
    assert {"rdf.yaml", "weights.pt", "weights.torchscript.pt", "test_input.npy",
            "test_output.npy", "README.md", "metadata.json", "cover.png"} <= names
    assert rdf["format_version"].startswith("0.5.") and rdf["type"] == "model"
    arch = rdf["weights"]["pytorch_state_dict"]["architecture"]
    assert (arch["import_from"], arch["callable"]) == ("emtile.unet", "UNet")
    assert arch["kwargs"] == load_model(folder).config
    assert [c["doi"] for c in rdf["cite"]] == ["10.1007/978-3-319-24574-4_28",
                                               "10.3389/fnana.2015.00142",
                                               "10.1371/journal.pbio.1000333"]
    assert rdf["authors"] == [{"name": "emtile contributors"}] and rdf["license"] == "MIT"
    assert meta == emtile.unet.load_metadata(folder) == rdf["config"]["emtile"]["metadata"]
    assert "## Validation" in readme and "val_vrand: 0.5" in readme
    # the test input is the centred crop of the first validation slice (2), 104 px at depth 2
    assert x.dtype == np.uint8 and x.shape == (1, 1, 104, 104)
    assert np.array_equal(x[0, 0], isbi_raw[27, 100 + 8:100 + 112, 200 + 13:200 + 117])
    net = load_model(folder)
    with torch.no_grad():
        want = torch.sigmoid(net(torch.from_numpy(dtype_scaled(x)))).numpy()
    assert y.dtype == np.float32 and np.array_equal(y, want)
    assert result.test_input == (104, 104) and result.test_output == (64, 64)


def test_padding_is_declared_reflect_and_survives_a_reload(exported):
    """bioimageio.spec drops a default-valued padding mode when it serialises (it would reload
    as constant padding); emtile writes the mode explicitly."""
    _, package, _ = exported
    assert read_rdf(package)["inputs"][0]["pad"] == {"mode": "reflect"}
    descr = spec.load_description(package, perform_io_checks=False)
    assert descr.inputs[0].pad.mode == "reflect"


def test_bioimageio_core_validates_the_package(exported):
    core = pytest.importorskip("bioimageio.core")
    _, package, _ = exported
    summary = core.test_model(package)
    errors = [(d.name, e.msg) for d in summary.details for e in d.errors]
    assert summary.status == "passed" and not errors, errors
    names = [d.name for d in summary.details if d.status == "passed"]
    for fmt in ("pytorch_state_dict", "torchscript"):  # test tensors reproduced by each format
        assert f"Reproduce test outputs from test inputs ({fmt})" in names


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_core_preprocessing_is_emtile_arithmetic(tmp_path, dtype):
    """bioimageio.core's pre-processing of the package input gives the float32 numbers emtile's
    dtype_scaled gives, bit for bit, for every value of the dtype's range that is tested."""
    core = pytest.importorskip("bioimageio.core")
    from bioimageio.core import Sample, Tensor, create_prediction_pipeline

    info = np.iinfo(dtype)
    vol = zarr.create_array(tmp_path / "v.zarr", shape=(1, 104, 104), dtype=dtype, zarr_format=3)
    values = np.linspace(0, info.max, 104 * 104).round().astype(dtype)
    vol[:] = values.reshape(1, 104, 104)
    folder = make_model(tmp_path / "m", tmp_path / "v.zarr")
    emtile.export_model(folder, tmp_path / "m.zip", sample_slice=0)
    descr = core.load_description(tmp_path / "m.zip")
    assert descr.inputs[0].data.type == dtype
    x = np.asarray(vol[0])[None, None]
    sample = Sample(members={descr.inputs[0].id: Tensor.from_numpy(
        x, dims=("batch", "channel", "y", "x"))}, stat={}, id="s")
    with create_prediction_pipeline(descr, devices=["cpu"]) as pp:
        pp.apply_preprocessing(sample)
    got = sample.members[descr.inputs[0].id].data.values
    assert got.dtype == np.float32 and np.array_equal(got, dtype_scaled(x))


def test_preprocessing_describes_each_normalization():
    assert preprocessing("uint8") == preprocessing("uint8", "dtype")
    assert preprocessing("float32") == [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    f32 = {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}
    recorded = {"method": "percentile", "low": 1.0, "high": 99.8, "training": {"lo": 29.0}}
    assert preprocessing("uint16", recorded) == [f32, {"id": "scale_range", "kwargs": {
        "axes": ["channel", "y", "x"], "min_percentile": 1.0, "max_percentile": 99.8,
        "eps": 1e-6}}, f32]
    assert preprocessing("float32", "minmax")[1]["kwargs"]["max_percentile"] == 100.0
    with pytest.raises(EmtileError, match=r"normalize='zscore' is not valid"):
        preprocessing("uint8", normalization="zscore")
    with pytest.raises(EmtileError, match=r"input dtype complex64 cannot be described"):
        preprocessing("complex64")


@pytest.mark.parametrize("rule", ["percentile:1,99", "minmax"])
def test_a_normalized_model_exports_validates_and_reads_back(tmp_path, volume, rule):
    """A model that records percentile or minmax normalisation exports as scale_range; the
    package passes bioimageio.core's test (its test output is the model on the crop normalised
    by the crop's own percentiles, as a consumer computes them) and reads back in emtile."""
    from emtile.normalize import record, statistics
    from emtile.unet import load_metadata

    folder = make_model(tmp_path / "m", volume)
    meta = load_metadata(folder)
    meta["emtile"]["normalization"] = record(statistics(zarr.open_array(str(volume)), rule))
    (folder / "metadata.json").write_text(json.dumps(meta))
    emtile.export_model(folder, tmp_path / "m.zip")
    steps = read_rdf(tmp_path / "m.zip")["inputs"][0]["preprocessing"]
    assert [s["id"] for s in steps] == ["ensure_dtype", "scale_range", "ensure_dtype"]
    core = pytest.importorskip("bioimageio.core")
    summary = core.test_model(tmp_path / "m.zip")
    errors = [(d.name, e.msg) for d in summary.details for e in d.errors]
    assert summary.status == "passed" and not errors, errors
    again = load_model(tmp_path / "m.zip")
    for (k, a), b in zip(load_model(folder).state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # emtile predicts with the package as with the folder: the recorded rule travels with it
    from emtile.model import load

    assert load(tmp_path / "m.zip").normalization == meta["emtile"]["normalization"]


# ------------------------------------------------------------------ reading it back


def test_load_model_rebuilds_the_same_model(exported, tmp_path):
    folder, package, _ = exported
    a, b = load_model(folder), load_model(package)
    assert type(b) is UNet and b.config == a.config and not b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    unpacked = tmp_path / "unpacked"  # the same files in a folder are a package too
    zipfile.ZipFile(package).extractall(unpacked)
    c = load_model(unpacked)
    assert all(torch.equal(sa[k], c.state_dict()[k]) for k in sa)
    odd = tmp_path / "model.zip"  # a model folder named like a zip is still a model folder
    save_model(a, odd)
    assert all(torch.equal(sa[k], load_model(odd).state_dict()[k]) for k in sa)


def test_reading_needs_no_bioimageio_package(exported):
    """A fresh interpreter with bioimageio hidden still loads the package."""
    _, package, _ = exported
    code = ("import sys; sys.modules['bioimageio'] = None\n"
            "import emtile; net = emtile.load_model(sys.argv[1]); print(net.config['depth'])")
    out = subprocess.run([sys.executable, "-c", code, str(package)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr


def test_predict_from_the_package_gives_the_folders_bytes(exported, volume, tmp_path):
    folder, _, _ = exported
    package = tmp_path / "cli.zip"
    result = run_cli("export", folder, package, "--name", "tiny ISBI model", "--author", "A B",
                     "--author", "C D")
    assert result.exit_code == 0, result.output
    assert "input 44 + n*4 per axis, output = input - 40" in result.output
    assert read_rdf(package)["authors"] == [{"name": "A B"}, {"name": "C D"}]
    outs = {}
    for key, model in (("folder", folder), ("zip", package)):
        out = tmp_path / f"{key}.zarr"
        r = run_cli("predict", "--model", model, "--tile", "64", "--threshold", "0.5",
                    "--workers", "0", "--no-progress", volume, out)
        assert r.exit_code == 0, r.output
        outs[key] = (np.asarray(emtile.open_volume(out)[:]),
                     np.asarray(emtile.open_volume(out / "labels" / "mask")[:]))
    assert outs["folder"][0].shape == (3, 120, 130) and len(np.unique(outs["folder"][0])) > 50
    for a, b in zip(outs["folder"], outs["zip"]):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_weights_are_never_unpickled_beyond_weights_only(exported, tmp_path):
    """A weights.pt whose pickle would run code is refused by torch.load(weights_only=True):
    the code never runs (its marker file is not written)."""
    _, package, _ = exported
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = rewrite(package, tmp_path / "bad.zip",
                  replace={"weights.pt": pickle.dumps({"inc.0.weight": Payload()}, protocol=2)})
    with pytest.raises(EmtileError, match=r"'weights.pt' is not a plain state dict: "
                                          r"torch.load\(weights_only=True\) refused it"):
        load_model(bad)
    assert not marker.exists()


# ------------------------------------------------------------------ bad packages: one line each


def _set(path, value):
    def edit(rdf):
        node = rdf
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return edit


ARCH = "weights.pytorch_state_dict.architecture"


@pytest.mark.parametrize("edit, message", [
    (_set(f"{ARCH}.import_from", "torchvision.models"),
     r"the architecture is torchvision.models.UNet, not emtile.unet.UNet"),
    (_set(f"{ARCH}.callable", "resnet18"), r"architecture is emtile.unet.resnet18, not emtile"),
    (_set(f"{ARCH}.kwargs", {"base": 2, "depth": 2, "heads": 4}),
     r"architecture kwargs has unknown arguments \(.*'heads'"),
    (_set(f"{ARCH}.kwargs", {"base": 2, "depth": 20}),
     r"architecture kwargs are not valid: depth=20 must be an integer from 1 to 8"),
    (_set(f"{ARCH}.kwargs", {"base": 2, "depth": 2, "ndim": 3}),  # a 3-D net, 2-D tensors
     r"inputs\[0\].axes\[2\] is \('space', 'y', .*; emtile's UNet \(depth 2, 1 in, 1 out "
     r"channels\) needs \('space', 'z', .*\(axes batch, channel, z, y, x\)"),
    (_set("inputs.0.axes.2.size", {"min": 44, "step": 8}),
     r"inputs\[0\].axes\[2\] is \('space', 'y', \{'min': 44, 'step': 8\}, None\); emtile's UNet "
     r"\(depth 2, 1 in, 1 out channels\) needs \('space', 'y', \{'min': 44, 'step': 4\}, None\)"),
    (_set("inputs.0.axes", [{"type": "batch"}, {"type": "space", "id": "y", "size": 64},
                            {"type": "space", "id": "x", "size": 64}]),
     r"inputs\[0\].axes\[1\] is \('space', 'y', 64, None\); .* needs \('channel', 1\)"),
    (_set("outputs.0.axes.3.size", {"tensor_id": "raw", "axis_id": "x", "offset": 0}),
     r"outputs\[0\].axes\[3\] is \('space', 'x', \{.*'offset': 0\}, None\)"),
    (_set("outputs.0.axes.1.channel_names", ["a", "b"]),
     r"outputs\[0\].axes\[1\] is \('channel', 2\); .* needs \('channel', 1\)"),
    (_set("inputs.0.preprocessing", [{"id": "zero_mean_unit_variance", "kwargs": {}}]),
     r"inputs\[0\].preprocessing is \[\('zero_mean_unit_variance'.*emtile runs .*scale_linear"),
    (_set("outputs.0.postprocessing", []), r"outputs\[0\].postprocessing is \[\]; emtile runs "
                                           r"\[\('sigmoid'"),
    (_set("weights", {"torchscript": {"source": "weights.torchscript.pt"}}),
     r"has no pytorch_state_dict weights \(it has torchscript\)"),
    (_set("inputs", []), r"has 0 inputs and 1 outputs; emtile's UNet has one of each"),
    (_set("format_version", "0.4.10"), r"format_version='0.4.10'; emtile reads bioimage.io model "
                                       r"descriptions of format 0.5"),
    (_set("type", "dataset"), r"describes type='dataset', not a model"),
    (_set("weights.pytorch_state_dict.source", "https://example.org/w.pt"),
     r"source='https://example.org/w.pt' is not a file in the package"),
    (_set("weights.pytorch_state_dict.source", "../weights.pt"), r"is not a file in the package"),
])
def test_bad_description_is_refused(exported, tmp_path, edit, message):
    _, package, _ = exported
    bad = rewrite(package, tmp_path / "bad.zip", edit=edit)
    with pytest.raises(EmtileError, match=message):
        load_model(bad)


def test_bad_package_files_are_refused(exported, tmp_path):
    folder, package, _ = exported
    with pytest.raises(EmtileError, match=r"has no file 'weights.pt' \(named by "
                                          r"weights.pytorch_state_dict.source in rdf.yaml\)"):
        load_model(rewrite(package, tmp_path / "a.zip", drop=["weights.pt"]))
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(EmtileError, match=r"has no rdf.yaml \(nor bioimageio.yaml\): it is not a "
                                          r"bioimage.io package"):
        load_model(tmp_path / "b.zip")
    (tmp_path / "c.zip").write_bytes(b"not a zip at all")
    with pytest.raises(EmtileError, match=r"'.*c.zip' is not a zip file"):
        load_model(tmp_path / "c.zip")
    with pytest.raises(EmtileError, match=r"bioimage.io package '.*missing.zip' does not exist"):
        load_model(tmp_path / "missing.zip")
    damaged = rewrite(package, tmp_path / "d.zip",
                      edit=_set("weights.pytorch_state_dict.sha256", "0" * 64))
    with pytest.raises(EmtileError, match=r"'weights.pt' does not match the sha256 in rdf.yaml"):
        load_model(damaged)
    other = {k: torch.zeros(1) for k in load_model(folder).state_dict()}
    with pytest.raises(EmtileError, match=r"the weights do not match the architecture kwargs: "
                                          r"'.*' has shape \(1,\), expected"):
        load_model(rewrite(package, tmp_path / "e.zip", replace={"weights.pt": torch_bytes(other)}))
    with pytest.raises(EmtileError, match=r"holds a list, not a state dict of named tensors"):
        load_model(rewrite(package, tmp_path / "f.zip",
                           replace={"weights.pt": torch_bytes([torch.zeros(1)])}))
    with pytest.raises(EmtileError, match=r"rdf.yaml is not valid YAML"):
        load_model(rewrite(package, tmp_path / "g.zip", replace={"rdf.yaml": b"a: [b"}))


def test_cli_bad_package_is_one_line(exported, tmp_path, volume):
    _, package, _ = exported
    bad = rewrite(package, tmp_path / "bad.zip", drop=["weights.pt"])
    r = run_cli("predict", "--model", bad, "--no-progress", volume, tmp_path / "p.zarr")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [
        f"Error: bioimage.io package {str(bad)!r} has no file 'weights.pt' (named by "
        f"weights.pytorch_state_dict.source in rdf.yaml): the package is incomplete"]
    assert not (tmp_path / "p.zarr").exists()


# ------------------------------------------------------------------ bad export requests


def test_export_refuses_bad_requests(exported, tmp_path, volume):
    folder, package, _ = exported
    cases = [
        (("export", tmp_path, tmp_path / "x.zip"), r"has no config.json"),
        (("export", tmp_path / "nope", tmp_path / "x.zip"),
         r"model folder '.*nope' does not exist"),
        (("export", package, tmp_path / "x.zip"), r"is a bioimage.io package; export takes an "
                                                  r"emtile model folder"),
        (("export", folder, package), r"path='.*model.zip' already exists; pass --overwrite"),
        (("export", folder, tmp_path / "x.tar"), r"path='.*x.tar' must end in .zip"),
        (("export", folder, tmp_path / "no" / "x.zip"), r"its folder '.*no' does not exist"),
        (("export", folder, folder / "x.zip"), r"path='.*x.zip' lies inside the input"),
        (("export", folder, tmp_path / "x.zip", "--slice", "7"),
         r"sample_slice=7 is outside the sample's 3 slices \(0 to 2\)"),
        (("export", folder, tmp_path / "x.zip", "--license", "not a licence"),
         r"the bioimage.io description is not valid: license"),
        (("export", folder, tmp_path / "x.zip", "--name", "a/b"),
         r"the bioimage.io description is not valid: name"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.exit_code == 1 and "Traceback" not in r.output, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
        assert re.search(message, lines[0]), (message, lines[0])
    assert not (tmp_path / "x.zip").exists() and not list(tmp_path.glob("*.tmp"))
    # --overwrite replaces a package, never another file
    (tmp_path / "notes.zip").write_text("mine")
    r = run_cli("export", folder, tmp_path / "notes.zip", "--overwrite")
    assert r.exit_code == 1 and "exists and is not a bioimage.io package" in r.output
    assert (tmp_path / "notes.zip").read_text() == "mine"


def test_export_needs_a_sample_when_the_training_volume_is_gone(tmp_path, volume):
    torch.manual_seed(0)
    folder = save_model(UNet(base=2, depth=2), tmp_path / "m",
                        metadata={"emtile": {"raw": str(tmp_path / "gone.zarr")}})
    with pytest.raises(EmtileError, match=r"no sample image for the test tensors: .*raw="
                                          r"'.*gone.zarr', which is not an existing volume; give "
                                          r"sample="):
        emtile.export_model(folder, tmp_path / "m.zip")
    r = emtile.export_model(folder, tmp_path / "m.zip", sample=volume, sample_slice=1)
    assert "slice 1 of vol.zarr" in r.sample
    with pytest.raises(EmtileError, match=r"in_channels=2; emtile exports single-channel"):
        emtile.export_model(save_model(UNet(in_channels=2, base=2, depth=2), tmp_path / "m2"),
                            tmp_path / "m2.zip", sample=volume)


def test_export_without_the_extra_says_how_to_install(exported, tmp_path, monkeypatch):
    folder, _, _ = exported
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # as if the extra were missing
    with pytest.raises(EmtileError, match=r"emtile export needs bioimageio.spec: pip install "
                                          r"'emtile\[bioimageio\]'"):
        emtile.export_model(folder, tmp_path / "x.zip")


def test_descriptions_are_the_shared_definition():
    sm = ShapeMap(3)
    inp, out = input_description(sm, dtype="uint16"), output_description(sm, channels=2)
    assert inp["axes"][2]["size"] == {"min": sm.min_size, "step": 8}
    assert inp["preprocessing"][1] == {"id": "scale_linear",
                                       "kwargs": {"gain": float(np.float32(1 / 65535))}}
    assert out["axes"][1]["channel_names"] == ["foreground0", "foreground1"]
    assert out["axes"][3]["size"]["offset"] == -2 * sm.halo == -88


@pytest.mark.slow
def test_bioimageio_check_script_runs(exported, volume):
    """examples/bioimageio_check.py on a tiny model: it runs, and its comparisons hold."""
    pytest.importorskip("bioimageio.core")
    folder, _, _ = exported
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "examples" / "bioimageio_check.py"),
                          str(folder), "--tile", "64"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"emtile --model model.zip vs --model {folder}: byte-identical" in out.stdout
    line = next(s for s in out.stdout.splitlines() if s.startswith("bioimageio.core (padding"))
    assert "mode='reflect'" in line and int(line.split("largest difference ")[1]) <= 1
    assert "own tiler (predict_sample_with_blocking):" in out.stdout


def test_info_describes_a_package(exported):
    _, package, _ = exported
    r = run_cli("info", package)
    assert r.exit_code == 0, r.output
    assert "kind          bioimage.io package" in r.output
    assert "U-Net 2-D, depth 2, base 4, batch norm on" in r.output
    assert "normalisation dtype (not recorded" in r.output  # an old-style model: dtype


# ------------------------------------------------------------------ 3-D models

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
FACTORS = ((1, 2, 2), (2, 2, 2))


def make_model_3d(folder, volume, *, out_channels=3, offsets=OFFSETS, seed=0):
    """A tiny 3-D U-Net folder (anisotropic factors: every axis its own geometry) whose output
    varies over EM: He-initialised, a steep head; an affinity model when ``offsets``."""
    torch.manual_seed(seed)
    net = UNet(base=2, depth=2, ndim=3, factors=FACTORS, out_channels=out_channels).eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    net.head.weight.data *= 10
    meta = {"emtile": {"kind": "best", "raw": str(volume), "iteration": 5}}
    if offsets is not None:
        meta["emtile"].update(target="affinities", offsets=offsets)
    return save_model(net, folder, metadata=meta)


@pytest.fixture(scope="module")
def volume3d(tmp_path_factory, isbi_dir):
    """A FIB-25 crop, 40 x 72 x 80 voxels, in a Zarr store (uint8)."""
    import tifffile

    fib = isbi_dir.parent / "fib25" / "raw.tif"
    if not fib.exists():
        pytest.skip("FIB-25 data not found")
    path = tmp_path_factory.mktemp("vol3d") / "fib.zarr"
    arr = zarr.create_array(path, shape=(40, 72, 80), chunks=(8, 64, 64), dtype="uint8",
                            zarr_format=3)
    arr[:] = tifffile.imread(fib)[150:190, 100:172, 90:170]
    return path


@pytest.fixture(scope="module")
def exported3d(tmp_path_factory, volume3d):
    """A 3-D affinity U-Net folder and its package (with TorchScript weights)."""
    d = tmp_path_factory.mktemp("exported3d")
    folder = make_model_3d(d / "model", volume3d)
    result = emtile.export_model(folder, d / "model.zip", torchscript=True)
    return folder, d / "model.zip", result


def test_3d_package_describes_the_geometry_per_axis(exported3d, volume3d):
    folder, package, result = exported3d
    rdf, sm = read_rdf(package), ShapeMap(2, 3, factors=FACTORS)
    assert (sm.min_sizes, sm.aligns, sm.halos) == ((18, 44, 44), (2, 4, 4), (8, 20, 20))
    inp, out = rdf["inputs"][0], rdf["outputs"][0]
    for tensor in (inp, out):
        assert [a["type"] for a in tensor["axes"]] == ["batch", "channel", "space", "space",
                                                       "space"]
        assert [a.get("id") for a in tensor["axes"][2:]] == ["z", "y", "x"]
    for i, axis in enumerate("zyx"):
        assert inp["axes"][2 + i]["size"] == {"min": sm.min_sizes[i], "step": sm.aligns[i]}
        assert out["axes"][2 + i]["size"] == {"tensor_id": "raw", "axis_id": axis,
                                              "offset": -2 * sm.halos[i]}
    # an affinity model's channels are named by their offsets, and the description says so
    assert out["axes"][1]["channel_names"] == ["aff_dz-1_dy0_dx0", "aff_dz0_dy-1_dx0",
                                               "aff_dz0_dy0_dx-1"]
    assert out["description"].startswith("affinities (sigmoid)")
    assert "affinities" in rdf["description"] and "3d" in rdf["tags"]
    assert rdf["config"]["emtile"]["geometry"] == {"axes": ["z", "y", "x"],
                                                   "min_sizes": [18, 44, 44],
                                                   "steps": [2, 4, 4], "halos": [8, 20, 20],
                                                   "depth": 2}
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"] == \
        load_model(folder).config
    with zipfile.ZipFile(package) as z:
        x = np.load(io.BytesIO(z.read("test_input.npy")))
        y = np.load(io.BytesIO(z.read("test_output.npy")))
        readme = z.read("README.md").decode()
    # the test input: the centred block of the smallest valid size with 16 output voxels per axis
    assert x.dtype == np.uint8 and x.shape == (1, 1, 32, 56, 56) and sm.is_valid(x.shape[2:])
    want = np.asarray(zarr.open_array(str(volume3d))[4:36, 8:64, 12:68])
    assert np.array_equal(x[0, 0], want)
    assert y.shape == (1, 3, 16, 16, 16) and y.dtype == np.float32
    with torch.no_grad():
        ref = torch.sigmoid(load_model(folder)(torch.from_numpy(dtype_scaled(x)))).numpy()
    assert np.array_equal(y, ref) and 0.05 < y.std()
    assert "`aff_dz0_dy-1_dx0` (0, -1, 0)" in readme and "z 18 + n * 2, y 44 + n * 4" in readme
    assert (result.min_size, result.step, result.halo) == ((18, 44, 44), (2, 4, 4), (8, 20, 20))
    assert "input z 18 + n*2, y 44 + n*4, x 44 + n*4, output = input - (16, 40, 40)" in str(result)


def test_3d_package_reads_back_to_the_same_model(exported3d):
    """emtile.model.load reads the 3-D package (safe YAML, weights_only, checked against the
    description) into a model whose outputs equal the folder model's, at two valid sizes."""
    from emtile.model import load

    folder, package, _ = exported3d
    a, b = load(folder), load(package)
    assert b.kind == "package" and b.ndim == 3 and b.net.config == a.net.config
    assert b.metadata["emtile"]["offsets"] == OFFSETS
    gen = torch.Generator().manual_seed(1)
    for size in ((18, 44, 44), (20, 48, 52)):
        x = torch.rand(1, 1, *size, generator=gen)
        with torch.no_grad():
            assert torch.equal(a.net(x), b.net(x))
    assert b.weights_sha256 == a.weights_sha256


def test_bioimageio_core_validates_a_3d_package(exported3d):
    core = pytest.importorskip("bioimageio.core")
    _, package, _ = exported3d
    summary = core.test_model(package)
    errors = [(d.name, e.msg) for d in summary.details for e in d.errors]
    assert summary.status == "passed" and not errors, errors
    names = [d.name for d in summary.details if d.status == "passed"]
    for fmt in ("pytorch_state_dict", "torchscript"):
        assert f"Reproduce test outputs from test inputs ({fmt})" in names
        assert f"Run {fmt} inference for inputs with batch_size: 2 and size parameter n: 2" in names


def test_3d_export_of_a_plain_model_and_its_refusals(tmp_path, volume3d, exported3d):
    folder = make_model_3d(tmp_path / "plain", volume3d, out_channels=1, offsets=None)
    r = run_cli("export", folder, tmp_path / "plain.zip")
    assert r.exit_code == 0, r.output
    assert "test tensors 32x56x56 -> 16x16x16 (32x56x56 block at the centre of fib.zarr)" in \
        r.output
    rdf = read_rdf(tmp_path / "plain.zip")
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["foreground"]
    assert rdf["outputs"][0]["description"] == "probability of the foreground class (sigmoid)"
    # a package whose tensors are 2-D while its kwargs are 3-D is refused in one line
    _, package, _ = exported3d
    bad = rewrite(package, tmp_path / "bad.zip",
                  edit=lambda rdf: rdf["inputs"][0]["axes"].pop(2))
    with pytest.raises(EmtileError, match=r"inputs\[0\].axes\[2\] is \('space', 'y', \{'min': 44, "
                                          r"'step': 4\}, None\); emtile's UNet \(depth 2, 1 in, "
                                          r"3 out channels\) needs \('space', 'z', \{'min': 18, "
                                          r"'step': 2\}, None\) \(axes batch, channel, z, y, x\)"):
        load_model(bad)
    sample2d = tmp_path / "img.zarr"
    zarr.create_array(sample2d, shape=(64, 64), dtype="uint8", zarr_format=3)[:] = 7
    wrong = make_model_3d(tmp_path / "wrong", volume3d, offsets=[[-1, 0, 0], [0, -1, 0]])
    cases = [
        (("export", folder, tmp_path / "x.zip", "--slice", "3"),
         r"sample_slice=3 picks a slice for a 2-D model's test input; a 3-D model's is a "
         r"centred block of sample"),  # as the 2-D sample_slice errors are worded
        (("export", folder, tmp_path / "x.zip", "--sample", sample2d),
         r"--sample '.*img.zarr' has shape \(64, 64\) and dtype uint8; a 3-D model needs a "
         r"\(Z, Y, X\) volume of numbers"),
        (("export", wrong, tmp_path / "x.zip"),
         r"metadata.json records target='affinities' with offsets=\[\[-1, 0, 0\], \[0, -1, 0\]\]; "
         r"expected 3 offsets \(one per output channel\) of 3 integers each"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
        assert re.search(message, lines[0]), (message, lines[0])
    assert not (tmp_path / "x.zip").exists()


@pytest.mark.slow
def test_bioimageio_check_script_runs_a_3d_model(exported3d):
    """examples/bioimageio_check.py on a tiny 3-D model: the package predicts in emtile as the
    folder does, and bioimageio.core's prediction of the padded volume is emtile's."""
    pytest.importorskip("bioimageio.core")
    folder, _, _ = exported3d
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "examples" / "bioimageio_check.py"),
                          str(folder)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"emtile --model model.zip vs --model {folder}: byte-identical" in out.stdout
    assert "volume (40, 72, 80) of" in out.stdout and "3 channel(s)" in out.stdout
    line = next(s for s in out.stdout.splitlines() if s.startswith("bioimageio.core (padding"))
    assert float(line.split("largest |difference| ")[1].split(",")[0]) < 1e-5, line


def test_3d_descriptions_are_per_axis():
    """The shared definitions for a 3-D shape map: per-axis sizes and offsets, percentiles over
    (channel, z, y, x), affinity channel names; the 2-D ones keep their one-number form."""
    from emtile.package import affinity_channel_names, affinity_offsets

    sm = ShapeMap(3, 3, factors=((1, 2, 2), (1, 2, 2), (2, 2, 2)))
    inp = input_description(sm, dtype="uint16", normalization="minmax")
    out = output_description(sm, channels=2, channel_names=["aff_dz-1_dy0_dx0", "b"])
    assert [a["size"] for a in inp["axes"][2:]] == [{"min": m, "step": s}
                                                    for m, s in zip(sm.min_sizes, sm.aligns)]
    assert sm.aligns == (2, 8, 8)
    assert [a["size"]["offset"] for a in out["axes"][2:]] == [-2 * h for h in sm.halos]
    assert out["axes"][1]["channel_names"] == ["aff_dz-1_dy0_dx0", "b"]
    assert inp["preprocessing"][1]["kwargs"]["axes"] == ["channel", "z", "y", "x"]
    assert preprocessing("uint8", "minmax")[1]["kwargs"]["axes"] == ["channel", "y", "x"]
    assert affinity_channel_names([[-1, 0, 0], [0, -9, 3]]) == ["aff_dz-1_dy0_dx0",
                                                                "aff_dz0_dy-9_dx3"]
    assert affinity_channel_names([[0, -1]]) == ["aff_dy0_dx-1"]
    meta = {"emtile": {"target": "affinities", "offsets": [[-1, 0, 0]]}}
    assert affinity_offsets(meta, channels=1, ndim=3) == [[-1, 0, 0]]
    assert affinity_offsets({"emtile": {"target": "boundaries"}}, channels=1, ndim=3) is None
    with pytest.raises(EmtileError, match=r"offsets=\[\[-1, 0\]\]; expected 1 offset \(one per "
                                          r"output channel\) of 3 integers each"):
        affinity_offsets({"target": "affinities", "offsets": [[-1, 0]]}, channels=1, ndim=3)
