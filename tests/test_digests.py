"""The bytes of predict and segment outputs, pinned.

The digests below were recorded at commit 522342d, before predict and segment moved onto the
one stage runner (``emtile.blockwise``), with fixed small models, inputs and settings: a
reshaping of the drivers must leave every one of them unchanged. Each digest is the SHA-256 of
an array's shape, dtype and C-order bytes (never of metadata, which names paths and times).

Digests depend on the machine's CPU kernels and torch version (predict runs with one torch
thread); CI runs on this project's one kind of machine. When a deliberate change moves them,
``EMTILE_PRINT_DIGESTS=1 pytest tests/test_digests.py -s`` prints the new values.
"""

import hashlib
import os

import numpy as np
import pytest
import torch
import zarr

import emtile
from emtile.store import create_image, mark_complete
from emtile.unet import UNet, save_model
from conftest import synthetic_em

PREDICT = {
    "uint8": {
        "0": "92f159cf7b416c0d9c6873bc181d67b37a652bf75eb4df0e8d7128e6f470eda1",
        "1": "5a3bf1747923e31a6440abb4a9f9600d8f77e6e68b3a5bfcab095e69a8bac02d",
        "labels/mask/0": "b9ecce698200bf52d1a26ae8d7f5bbf98765cefc38e171bd22d7763522ff3c07",
        "labels/mask/1": "65dd0f267706aa224d75c1eab9b552baab787f483049c6f6b660db62e6258454",
    },
    "float32": {
        "0": "cdc046a9ce33a57b69dff9c9556e52a80a36a5f6dd8f76d3303ea773cee224ec",
    },
}

SEGMENT = {
    ("cc", "2d"): "09252fdb64090607f132803437f1fa26980cfc9f0ce70d3d51d0bd6c5dabeb1d",
    ("cc", "3d"): "c09f56b982ba64a40a1ec9cafe8381f1a3e4f381339e103abfc03b4435992919",
    ("ws", "2d"): "bdfc943d12765f8fae3408e032d0c8c42fe9ac207eb26a96e02917faa9c4771c",
    ("ws", "3d"): "2f66d918e431042ac27aed5d1861946b760c7660b54064de3768e69d50e29573",
}


def digest(array):
    a = np.ascontiguousarray(np.asarray(array))
    h = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _check(name, got, want):
    if os.environ.get("EMTILE_PRINT_DIGESTS"):
        print(f"{name}: {got!r}")
        return
    assert got == want, f"{name}: the bytes changed"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A depth-2 model whose output varies (He init keeps the ReLUs alive)."""
    torch.manual_seed(0)
    net = UNet(base=4, depth=2, out_channels=1).eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    path = tmp_path_factory.mktemp("digest") / "model"
    save_model(net, path)
    return path


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory):
    raw, _ = synthetic_em((3, 150, 170), cells=12, seed=3)
    path = tmp_path_factory.mktemp("digest") / "raw.zarr"
    g = create_image(path, raw.shape, np.uint8, chunks=(1, 64, 64), voxel_size=(50, 4, 4))
    g["0"][:] = raw
    mark_complete(g)
    return path


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_predict_bytes_unchanged(tmp_path, model_dir, raw_store, dtype):
    out = tmp_path / "pred.zarr"
    kw = dict(threshold=0.5, levels=2) if dtype == "uint8" else {}
    emtile.predict(str(model_dir), str(raw_store), str(out), tile=68, threads=1, dtype=dtype,
                   progress=False, max_block_px=6000, chunk_size=56, **kw)
    group = zarr.open_group(str(out), mode="r")
    for key, want in PREDICT[dtype].items():
        values = group[key][...]
        assert values.min() < values.max()  # a real map, not a constant
        _check(f"predict {dtype} {key}", digest(values), want)


def _probabilities(path):
    """A smooth, noisy interior map of a synthetic stack, as uint8 ``round(255 p)``."""
    from scipy import ndimage

    _, labels = synthetic_em((4, 120, 130), cells=14, seed=5)
    p = ndimage.gaussian_filter(labels.astype(np.float32), (0, 1.5, 1.5))
    p += np.random.default_rng(7).normal(0, 0.08, p.shape).astype(np.float32)
    p = np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8)
    g = create_image(path, p.shape, np.uint8, kind="probabilities", voxel_size=(10, 10, 10))
    g["0"][...] = p
    mark_complete(g)
    return str(path)


@pytest.mark.parametrize("method,mode", sorted(SEGMENT))
def test_segment_bytes_unchanged(tmp_path, method, mode):
    pred = _probabilities(tmp_path / "pred.zarr")
    out = tmp_path / "seg.zarr"
    # the settings the digests were recorded with (the defaults until issue 22), pinned: the
    # digests guard the driver's code, not the choice of defaults
    emtile.segment(pred, str(out), method=method, mode=mode, block_size=(2, 64, 64),
                   threshold=0.85, merge_threshold=0.25, calibrate="none", progress=False)
    labels = zarr.open_group(str(out), mode="r")["0"][...]
    assert len(np.unique(labels)) > 10  # a real segmentation, not an empty one
    _check(f"segment {method} {mode}", digest(labels), SEGMENT[(method, mode)])
