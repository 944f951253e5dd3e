"""The acceptance test of the object-store wiring plan (issue 24): ``emtile.predict`` from an
``s3://`` input to an ``s3://`` output gives the bytes of the same run on local disk.

``emtile.store`` hands every URL to ``emtile.objoutput`` / ``emtile.objlock`` /
``emtile.objremove`` (the output rules, the lock, removal without rename); nothing is patched
here.
"""

import numpy as np
import pytest

import emtile
from emtile import objlock, objoutput, store
from emtile.locations import Location

from s3server import s3, s3_server  # noqa: F401  (pytest fixtures)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_predict_from_and_to_s3_gives_the_local_bytes(s3, tmp_path):
    from emtile.unet import UNet

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
