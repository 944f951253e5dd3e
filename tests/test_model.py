"""emtile.model: a model loaded once, into one frozen object, from any source emtile reads.

Packages are written here by hand (rdf.yaml from emtile.package's own tensor descriptions, the
weights with torch.save), so these tests need no bioimageio extra; tests/test_export.py reads
packages that bioimageio.spec wrote.
"""

import dataclasses
import hashlib
import io
import json
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

import emtile
from emtile import EmtileError, package
from emtile.model import KINDS, Model, load, load_model, read_metadata, weights_hash
from emtile.normalize import InputWarning, Scaling, for_prediction, model_record
from emtile.unet import UNet, load_folder, save_model

NORM = {"method": "percentile", "low": 1.0, "high": 99.8,
        "training": {"dtype": "uint8", "lo": 20.0, "hi": 230.0, "p01": 0.0, "p99": 1.0}}
META = {"emtile": {"normalization": NORM, "voxel_size": [50.0, 4.0, 4.0], "kind": "best"},
        "epochs": 3}


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return UNet(base=2, depth=2, batch_norm=True).eval()


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_package(path, net, meta, *, weights=None, sha256=None):
    """A bioimage.io package as emtile export writes it, as far as emtile's reader checks."""
    data = torch_bytes(dict(net.state_dict())) if weights is None else weights
    rdf = {"type": "model", "format_version": "0.5.4", "name": "tiny",
           "weights": {"pytorch_state_dict": {
               "source": "weights.pt", "sha256": sha256 or hashlib.sha256(data).hexdigest(),
               "architecture": {"import_from": "emtile.unet", "callable": "UNet",
                                "kwargs": dict(net.config)}}},
           "inputs": [package.input_description(
               net.shape_map, normalization=meta.get("emtile", {}).get("normalization"))],
           "outputs": [package.output_description(net.shape_map)],
           "config": {"emtile": {"metadata": meta}}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("rdf.yaml", yaml.safe_dump(rdf, sort_keys=False))
        z.writestr("weights.pt", data)
    return path


@pytest.fixture
def sources(tmp_path):
    """The same network as a folder, a run folder, a zip, an unpacked package and in memory."""
    net = tiny_net()
    folder = save_model(net, tmp_path / "m", metadata=META)
    run = tmp_path / "run"
    save_model(net, run / "best", metadata=META)
    save_model(tiny_net(seed=1), run / "last", metadata=META)  # not the one a run gives
    (run / "run.json").write_text(json.dumps({"settings": {}}))
    zipped = write_package(tmp_path / "m.zip", net, META)
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(zipped).extractall(unpacked)
    return net, {"folder": folder, "run": run, "package": zipped, "unpacked": unpacked}


# ------------------------------------------------------------------ one object from every source


def test_every_source_gives_the_same_model(sources):
    net, paths = sources
    want = weights_hash(net)
    for name, path in paths.items():
        m = load(path)
        assert m.kind == ("package" if name == "unpacked" else name) and m.source == str(path)
        assert m.weights_sha256 == want, name
        assert m.metadata == META and m.normalization == NORM, name
        assert m.voxel_size == (50.0, 4.0, 4.0), name
        assert type(m.net) is UNet and not m.net.training and m.net.config == net.config
        assert all(torch.equal(a, b) for a, b in zip(m.net.state_dict().values(),
                                                      net.state_dict().values()))
        # what the predictor used to compute itself, step by step
        assert model_record(m) == {"normalization": NORM, "voxel_size": (50.0, 4.0, 4.0)}
        assert read_metadata(path) == META
    memory = load(net)
    assert (memory.kind, memory.source, memory.metadata) == ("memory", "", {})
    assert memory.normalization is None and memory.voxel_size is None
    assert memory.weights_sha256 == want and memory.net is net
    assert set(KINDS) == {"folder", "run", "package", "memory"}


def test_the_public_names_and_the_predictors_hash_are_these():
    import emtile.predictor

    assert emtile.load_model is load_model
    assert emtile.predictor.weights_hash is weights_hash


def test_load_model_is_the_network_of_load(sources):
    net, paths = sources
    for path in paths.values():
        got = load_model(path)
        assert type(got) is UNet and weights_hash(got) == weights_hash(net)


def test_the_model_exposes_the_networks_geometry(sources):
    net, paths = sources
    m = load(paths["folder"])
    assert (m.ndim, m.depth, m.halo) == (2, 2, 20)
    assert (m.in_channels, m.out_channels, m.config) == (1, 1, net.config)
    assert m.shape_map is m.net.shape_map  # valid sizes, alignment: the shape map's
    assert m.shape_map.output_size(96) == 56 and m.shape_map.input_size(56) == 96
    assert "kind='folder'" in repr(m) and "UNet(" not in repr(m)  # short: not the whole net


def test_the_model_is_frozen(sources):
    _, paths = sources
    m = load(paths["folder"])
    for name, value in (("net", tiny_net()), ("weights_sha256", "0" * 64), ("normalization", None)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(m, name, value)


def test_a_model_or_a_network_in_memory(sources):
    net, paths = sources
    m = load(paths["folder"])
    assert load(m) is m and load(m, device="cpu") is m
    training = tiny_net().train()
    assert not load(training, device="cpu").net.training  # eval mode, as every source
    with pytest.raises(EmtileError, match=r"^model must be an emtile UNet, a Model, or the path "
                                          r"of .*; got int$"):
        load(42)


def test_read_metadata_reads_no_weights(sources):
    net, paths = sources
    (paths["folder"] / "model.safetensors").unlink()
    assert read_metadata(paths["folder"]) == META
    assert read_metadata(net) == {} and read_metadata(load(paths["run"])) == META


# ------------------------------------------------------------------ run folders


def test_a_run_folder_without_best_says_what_to_use(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(EmtileError) as e:
        load(run)
    assert str(e.value) == (f"model={str(run)!r} is a training run folder with no best/ model: "
                            f"it holds no model yet (no best/ or last/)")
    save_model(tiny_net(), run / "last")
    with pytest.raises(EmtileError, match=r"with no best/ model: use '.*last' \(the latest "
                                          r"model\)"):
        load(run)
    assert load(run / "last").kind == "folder"


# ------------------------------------------------------------------ refused, in one line


class _Exploit:
    """Unpickling this would create a file (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


def test_a_pickle_in_a_model_folder_is_refused_not_read(sources, tmp_path, monkeypatch):
    net, paths = sources
    for where in (paths["folder"], paths["run"] / "best"):
        (where / "model.safetensors").unlink()
        torch.save(net.state_dict(), where / "model.pt")
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    for path in (paths["folder"], paths["run"]):
        with pytest.raises(EmtileError) as e:
            load(path)
        assert "has model.pt but no model.safetensors" in _one_line(e)
    monkeypatch.setattr(torch, "load", real_load)
    victim = tmp_path / "pwned"
    (paths["folder"] / "model.safetensors").write_bytes(pickle.dumps({"w": _Exploit(victim)}))
    with pytest.raises(EmtileError) as e:
        load(paths["folder"])
    assert "is not a valid safetensors file" in _one_line(e) and not victim.exists()


def test_a_tampered_or_pickle_bearing_package_is_refused(sources, tmp_path):
    net, _ = sources
    good = torch_bytes(dict(net.state_dict()))
    tampered = write_package(tmp_path / "t.zip", net, META, weights=good,
                             sha256=hashlib.sha256(good + b"x").hexdigest())
    with pytest.raises(EmtileError) as e:
        load(tampered)
    assert "'weights.pt' does not match the sha256 in rdf.yaml" in _one_line(e)
    victim = tmp_path / "pwned"
    evil = pickle.dumps({"inc.0.weight": _Exploit(victim)}, protocol=2)
    bad = write_package(tmp_path / "p.zip", net, META, weights=evil)  # its sha256 is right
    with pytest.raises(EmtileError) as e:
        load(bad)
    assert "torch.load(weights_only=True) refused it" in _one_line(e) and not victim.exists()
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(bad).extractall(unpacked)
    with pytest.raises(EmtileError) as e:
        load(unpacked)
    assert "refused it" in _one_line(e) and not victim.exists()


# ------------------------------------------------------------------ normalisation asks the Model


def test_normalize_takes_the_record_not_a_path(sources, tmp_path):
    net, paths = sources
    m = load(paths["folder"])
    assert model_record(m) == model_record(META) == model_record(m.metadata)
    assert model_record(net) == model_record(None) == model_record({}) == {}
    with pytest.raises(EmtileError, match=r"^model='.*m' is a path: give the loaded model "
                                          r"\(emtile.model.load\)"):
        model_record(paths["folder"])
    with pytest.raises(EmtileError, match=r"recorded voxel_size='ab' is not a list of numbers"):
        model_record({"emtile": {"voxel_size": "ab"}})
    raw = np.tile(np.arange(20, 231, dtype=np.uint8), (4, 211, 1))
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    emtile.convert(tmp_path / "raw.tif", tmp_path / "coarse.zarr", voxel_size=(50, 8, 8),
                   progress=False)
    scaling, notes = for_prediction(m, raw, path=str(tmp_path / "coarse.zarr"))
    assert scaling == Scaling("percentile", *np.percentile(raw, [1.0, 99.8]))
    assert notes == ["input's voxel size (8 x 8 nm) is far from the model's training data's "
                     "(4 x 4 nm): the model sees structures at another scale; resample the "
                     "input to the training voxel size"]
    assert for_prediction(load(net), raw, path=str(tmp_path / "coarse.zarr"))[0] == \
        Scaling("dtype")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert for_prediction(m, raw, rule=Scaling("dtype")) == (Scaling("dtype"), [])


def test_importing_the_module_loads_no_torch():
    code = "import sys, emtile.model; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
