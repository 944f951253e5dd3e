"""The acceptance test of the object-store wiring plan (issue 24): ``emtile.predict`` from an
``s3://`` input to an ``s3://`` output gives the bytes of the same run on local disk.

``store.py`` is being rewritten elsewhere, so until its URL dispatch is merged, ``_wire``
applies that dispatch here (each line is one line of the plan: a URL goes to
``emtile.objoutput`` / ``emtile.objlock`` / ``emtile.objremove``). When the plan is applied,
delete ``_wire`` and its call: the test must still pass unchanged.
"""

import numpy as np
import pytest

import emtile
from emtile import objlock, objoutput, objremove, store
from emtile.locations import Location, is_url

from s3server import s3, s3_server  # noqa: F401  (pytest fixtures)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _register_label(path):
    """``create_label_image(register=True)`` for a URL: list the label in ``labels/``."""
    loc = Location(path)
    doc = loc.parent.read_json("zarr.json") or {"zarr_format": 3, "node_type": "group",
                                                 "attributes": {}}
    ome = doc["attributes"].setdefault("ome", {"version": store.NGFF_VERSION, "labels": []})
    ome["labels"] = [*ome.get("labels", []), loc.name]
    loc.parent.write_json(doc, "zarr.json")


def _wire(monkeypatch):
    def url_to(name, fn):
        local = getattr(store, name)
        monkeypatch.setattr(store, name, lambda p, *a, **k: fn(p, *a, **k) if is_url(str(p))
                            else local(p, *a, **k))

    url_to("check_output", lambda out, inputs=(), **_: objoutput.check_output(out, inputs=inputs))
    url_to("prepare_output", objoutput.prepare_output)
    url_to("emtile_attrs", objoutput.emtile_attrs)
    url_to("is_zarr_store", objoutput.is_zarr_store)
    url_to("output_lock", lambda out: objlock.object_lock(out))
    url_to("remove_store", objremove.remove_store)
    label = store.create_label_image

    def create_label_image(path, *a, register=False, **k):
        if register and is_url(str(path)):
            _register_label(path)
            register = False
        return label(path, *a, register=register, **k)

    monkeypatch.setattr(store, "create_label_image", create_label_image)


def test_predict_from_and_to_s3_gives_the_local_bytes(s3, tmp_path, monkeypatch):
    from emtile.unet import UNet

    _wire(monkeypatch)
    torch.manual_seed(0)
    net = UNet(base=4, depth=2, out_channels=1).eval()
    vol = np.random.default_rng(1).integers(0, 255, size=(2, 131, 97), dtype=np.uint8)
    for where in (str(tmp_path / "in.zarr"), s3 / "in.zarr"):
        group = store.create_image(where, vol.shape, np.uint8, chunks=(1, 64, 64))
        group["0"][:] = vol
        store.mark_complete(group)
    options = dict(tile=68, threshold=0.5, progress=False, chunk_size=56, max_block_px=4000)
    emtile.predict(net, str(tmp_path / "in.zarr"), str(tmp_path / "pred.zarr"), **options)
    result = emtile.predict(net, s3 / "in.zarr", s3 / "pred.zarr", **options)
    assert result.blocks > 3
    local_probs = emtile.open_volume(str(tmp_path / "pred.zarr"))[:]
    for inner in ("", "/labels/mask"):
        local = emtile.open_volume(str(tmp_path / "pred.zarr") + inner)[:]
        np.testing.assert_array_equal(emtile.open_volume(s3 / "pred.zarr" + inner)[:], local)
    assert objoutput.is_complete(s3 / "pred.zarr")
    assert Location(s3 / "pred.zarr/labels").read_json("zarr.json")["attributes"]["ome"][
        "labels"] == ["mask"]
    assert not objlock.lock_location(s3 / "pred.zarr").exists()

    # a run killed after its first 2 blocks: the re-run computes only the missing ones
    import zarr

    group = zarr.open_group(Location(s3 / "pred.zarr").zarr_store("r+"), mode="r+")
    group.attrs["emtile"] = {**group.attrs["emtile"], "complete": False}
    group["emtile_blocks"][2:] = 0
    group["0"][:] = 0  # the missing blocks' chunks too (and the done ones', to see they stay)
    resumed = emtile.predict(net, s3 / "in.zarr", s3 / "pred.zarr", **options)
    assert resumed.blocks_resumed == 2 and objoutput.is_complete(s3 / "pred.zarr")
    again = emtile.open_volume(s3 / "pred.zarr")[:]
    kept = np.flatnonzero(again.reshape(-1) != local_probs.reshape(-1))
    assert kept.size > 0  # the 2 kept blocks were not recomputed (zeroed above) ...
    assert (again.reshape(-1)[kept] == 0).all()  # ... and everything else is the local run
    with pytest.raises(emtile.EmtileError, match=r"already exists; pass overwrite=True"):
        emtile.predict(net, s3 / "in.zarr", s3 / "pred.zarr", **options)
