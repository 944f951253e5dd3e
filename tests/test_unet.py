"""emtile.unet: the valid-convolution U-Net, its shape map, and safe model folders."""

import json
import pickle

import numpy as np
import pytest
import torch

import emtile
from emtile import EmtileError
from emtile.unet import UNet, load_folder, load_metadata, save_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ architecture and shape map


def test_paper_sizes_at_depth_4():
    net = UNet(base=2)
    assert net.output_size(572) == 388
    assert net.input_size(388) == 572
    assert net.halo == 92 and net.align == 16 and net.ndim == 2
    assert net.output_size((572, 556)) == (388, 372)
    assert net.valid_sizes(550, 590) == [556, 572, 588]
    assert net.is_valid(572) and not net.is_valid(570)


@pytest.mark.parametrize("depth, halo", [(1, 8), (2, 20), (3, 44), (4, 92)])
def test_forward_matches_shape_map(depth, halo):
    net = UNet(base=2, depth=depth).eval()
    assert net.halo == halo
    for n in net.valid_sizes(net.min_size, net.min_size + 3 * net.align)[:3]:
        with torch.no_grad():
            y = net(torch.zeros(2, 1, n, n + net.align))
        assert tuple(y.shape) == (2, 1, net.output_size(n), net.output_size(n + net.align))
        assert n - net.output_size(n) == 2 * halo


def test_paper_architecture_channels():
    net = UNet()  # the paper's: base 64, depth 4
    assert net.config == dict(in_channels=1, out_channels=1, base=64, depth=4, batch_norm=False,
                              dropout=0.0)
    assert net.inc[0].out_channels == 64
    assert [d[1][0].out_channels for d in net.downs] == [128, 256, 512, 1024]
    assert [u.up.out_channels for u in net.ups] == [512, 256, 128, 64]
    assert net.head.out_channels == 1
    n_params = sum(p.numel() for p in net.parameters())
    assert 31_000_000 < n_params < 31_100_000  # the paper's U-Net has ~31.0 M parameters


def test_options_build_and_run():
    net = UNet(in_channels=2, out_channels=3, base=2, depth=2, batch_norm=True, dropout=0.5).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.Dropout) for m in net.modules())
    with torch.no_grad():
        assert net(torch.zeros(1, 2, 64, 64)).shape == (1, 3, 24, 24)


def test_forward_checks_its_input():
    net = UNet(base=2, depth=4)
    with pytest.raises(EmtileError, match=r"input of size 570x570 is not valid for depth 4: "
                                          r"nearest valid sizes are 556 and 572"):
        net(torch.zeros(1, 1, 570, 570))
    with pytest.raises(EmtileError, match=r"shape \(1, 572, 572\); expected \(N, 1, H, W\)"):
        net(torch.zeros(1, 572, 572))
    with pytest.raises(EmtileError, match=r"expected \(N, 1, H, W\)"):
        net(torch.zeros(1, 3, 572, 572))


def test_invalid_tile_message_names_nearest_sizes():
    net = UNet(base=2, depth=4)
    with pytest.raises(EmtileError, match="tile=570 is not valid for depth 4: nearest valid sizes "
                                          "are 556 and 572"):
        net.check(570)
    with pytest.raises(EmtileError, match="tile=100 is not valid for depth 4: the smallest valid "
                                          "size is 188"):
        net.check(100)


@pytest.mark.parametrize("kwargs, match", [
    (dict(base=0), "base=0 must be an integer from 1 to 1024"),
    (dict(depth=-1), "depth=-1 must be an integer from 1 to 8"),
    (dict(depth=0), "depth=0 must be an integer from 1 to 8"),
    (dict(depth=9), "depth=9 must be an integer from 1 to 8"),
    (dict(depth=4.0), "depth=4.0 must be an integer"),
    (dict(depth=True), "depth=True must be an integer"),
    (dict(out_channels=10**6), "out_channels=1000000 must be an integer from 1 to 1024"),
    (dict(dropout=1.5), r"dropout=1.5 must be a number in \[0, 1\)"),
    (dict(dropout="0.5"), r"dropout='0.5' must be a number in \[0, 1\)"),
    (dict(batch_norm="yes"), "batch_norm='yes' must be true or false"),
    (dict(base=64, depth=8), "base=64, depth=8 would give .* parameters, more than emtile builds"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(EmtileError, match=match):
        UNet(**kwargs)


@pytest.mark.parametrize("config, match", [
    ({"depth": 10**12}, "depth=1000000000000 must be an integer from 1 to 8"),
    ({"base": 10**9}, "base=1000000000 must be an integer from 1 to 1024"),
    ({"base": 1024, "depth": 8}, "would give .* parameters"),
    ({"depth": "4"}, "depth='4' must be an integer"),
    ({"base": None}, "base=None must be an integer"),
    ({"dropout": [0.5]}, r"dropout=\[0.5\] must be a number"),
    ({"dropout": float("nan")}, "dropout=nan must be a number"),
    ({"batch_norm": {"a": 1}}, "batch_norm=.* must be true or false"),
    ({"kernel": 5}, "has unknown arguments"),
])
def test_crafted_config_gives_a_clear_error_and_builds_nothing(tmp_path, config, match):
    save_model(UNet(base=2, depth=2), tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    doc["config"].update(config)
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(EmtileError, match=match):
        load_folder(tmp_path / "m")


@pytest.mark.parametrize("text", ['[1, 2]', '{"format": "emtile-unet", "config": [4]}', "{not json",
                                  "[" * 100000 + "]" * 100000])
def test_config_json_of_the_wrong_shape_is_refused(tmp_path, text):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(text)
    with pytest.raises(EmtileError, match="is not an emtile model config"):
        load_folder(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(EmtileError, match="is not an emtile model config"):
        load_folder(tmp_path / "m")


def test_public_names_are_lazy_exports():
    import emtile.model

    assert emtile.UNet is UNet and emtile.save_model is save_model
    assert emtile.load_model is emtile.model.load_model  # any source: folder, run or package


# ------------------------------------------------------------------ model folders


def test_save_and_load_round_trip(tmp_path):
    net = UNet(base=3, depth=3, out_channels=2, batch_norm=True).eval()
    for m in net.modules():  # make the batch-norm buffers non-trivial
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    save_model(net, tmp_path / "m", metadata={"epochs": 3, "loss": [0.5, 0.25]})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "metadata.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["config"] == net.config
    loaded = load_folder(tmp_path / "m")
    assert loaded.config == net.config and not loaded.training
    x = torch.rand(2, 1, 100, 100)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert load_metadata(tmp_path / "m") == {"epochs": 3, "loss": [0.5, 0.25]}


def test_a_pickled_state_dict_is_never_read(tmp_path, monkeypatch):
    """Even a harmless torch.save'd state dict: emtile reads model.safetensors only."""
    net = UNet(base=2, depth=2)
    save_model(net, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(net.state_dict(), tmp_path / "m" / "model.pt")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(EmtileError, match="has model.pt but no model.safetensors: emtile reads "
                                          "weights only from model.safetensors and never "
                                          "unpickles a file"):
        load_folder(tmp_path / "m")


class _Exploit:
    """Unpickling this would create a file (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("filename", ["model.safetensors", "model.pt"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, filename):
    save_model(UNet(base=2, depth=2), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    victim = tmp_path / "pwned"
    payload = {"inc.0.weight": _Exploit(victim)}
    if filename == "model.pt":
        torch.save(payload, tmp_path / "m" / filename)  # a zip checkpoint holding the pickle
    else:
        (tmp_path / "m" / filename).write_bytes(pickle.dumps(payload))
    with pytest.raises(EmtileError, match="not a valid safetensors file|never unpickles"):
        load_folder(tmp_path / "m")
    assert not victim.exists()


def test_missing_folder_config_or_weights(tmp_path):
    with pytest.raises(EmtileError, match="model folder '.*nope' does not exist"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmtileError, match="has no config.json"):
        load_folder(tmp_path / "empty")
    save_model(UNet(base=2, depth=2), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(EmtileError, match="has no weights: expected model.safetensors"):
        load_folder(tmp_path / "m")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    save_model(UNet(base=2, depth=2), tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    doc["config"]["base"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(EmtileError, match="do not match its config.json"):
        load_folder(tmp_path / "m")


def test_config_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"hidden_size": 3}')
    with pytest.raises(EmtileError, match="is not an emtile model config"):
        load_folder(tmp_path / "m")


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(EmtileError, match="metadata is not JSON-serialisable"):
        save_model(UNet(base=2, depth=2), tmp_path / "m", metadata={"x": np.float32})


def test_invalid_metadata_file_is_a_clear_error(tmp_path):
    save_model(UNet(base=2, depth=2), tmp_path / "m", metadata={"epochs": 1})
    (tmp_path / "m" / "metadata.json").write_text('{"epochs": 1,')
    with pytest.raises(EmtileError, match="metadata.json' is not valid JSON"):
        load_metadata(tmp_path / "m")
    (tmp_path / "m" / "metadata.json").write_text("[1]")
    with pytest.raises(EmtileError, match="holds a JSON list, not an object"):
        load_metadata(tmp_path / "m")


def test_saving_again_replaces_config_atomically_and_drops_stale_metadata(tmp_path, monkeypatch):
    import os

    import emtile.unet as unet

    save_model(UNet(base=2, depth=2), tmp_path / "m", metadata={"epochs": 7})
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append(os.path.basename(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(unet.os, "replace", spy)
    save_model(UNet(base=3, depth=2), tmp_path / "m")  # another model, no metadata
    assert "config.json" in replaced  # written next to it, then renamed over it
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    assert load_metadata(tmp_path / "m") == {}  # not the previous model's epochs
    assert load_folder(tmp_path / "m").config["base"] == 3
