"""emtile.store's NGFF metadata helpers (one home for reading multiscales, voxel sizes and
writing translations) and remove_store. The store's safety rules are tested in test_store.py."""

import pytest
import zarr

from emtile import EmtileError, open_volume
from emtile.store import (create_image, multiscales, remove_store, set_translation, spatial_scale,
                          voxel_size)
from emtile.describe import info


def test_multiscales_of_ngff_05_and_04():
    entry = {"axes": [{"name": "c"}, {"name": "z"}, {"name": "y"}, {"name": "x"}],
             "datasets": [{"path": "s0", "coordinateTransformations": [
                 {"type": "scale", "scale": [1.0, 50.0, 4.0, 4.0]}]}]}
    assert multiscales({"ome": {"version": "0.5", "multiscales": [entry]}}) is entry
    assert multiscales({"multiscales": [entry]}) is entry  # 0.4 keeps it at the top level
    assert multiscales({"emtile": {}}) is None
    assert spatial_scale(entry) == {"z": 50.0, "y": 4.0, "x": 4.0}


def test_voxel_size_of_stores_and_of_other_things(tmp_path):
    create_image(tmp_path / "a.zarr", (2, 8, 8), "uint8", voxel_size=(50, 4, 4))
    assert voxel_size(tmp_path / "a.zarr", 3) == (50.0, 4.0, 4.0)
    assert voxel_size(tmp_path / "a.zarr", 2) == (4.0, 4.0)
    assert voxel_size(tmp_path / "a.zarr", 4) is None
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(2, 2), dtype="uint8")
    assert voxel_size(tmp_path / "plain.zarr", 2) is None  # no multiscales
    assert voxel_size(tmp_path / "missing.zarr", 2) is None and voxel_size(None, 2) is None
    assert info(tmp_path / "a.zarr")["voxel_size"] == {"z": 50.0, "y": 4.0, "x": 4.0}


def test_set_translation_places_a_region_in_physical_units(tmp_path):
    group = create_image(tmp_path / "r.zarr", (2, 8, 8), "uint8", voxel_size=(50, 4, 4))
    set_translation(group, (0, 0, 0))
    assert len(group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]) == 1
    set_translation(group, (1, 10, 20))
    transforms = zarr.open_group(str(tmp_path / "r.zarr")).attrs["ome"]["multiscales"][0][
        "datasets"][0]["coordinateTransformations"]
    assert transforms == [{"type": "scale", "scale": [50.0, 4.0, 4.0]},
                          {"type": "translation", "translation": [50.0, 40.0, 80.0]}]
    assert open_volume(tmp_path / "r.zarr").shape == (2, 8, 8)


def test_remove_store_deletes_stores_only(tmp_path):
    create_image(tmp_path / "s.zarr", (2, 2), "uint8")
    remove_store(tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(AssertionError):
        remove_store(tmp_path / "mine")
    assert (tmp_path / "mine").exists()
    with pytest.raises(EmtileError):
        open_volume(tmp_path / "s.zarr")
