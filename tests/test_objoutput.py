"""The output rules on an object store (``emtile.objoutput``), and done-markers kept there,
against moto's S3 server on 127.0.0.1 (``tests/s3server.py``)."""

import numpy as np
import pytest
import zarr

from emtile import EmtileError
from emtile.locations import Location
from emtile.markers import BlockMarkers
from emtile.objoutput import check_output, emtile_attrs, is_complete, prepare_output

from s3server import s3, s3_server  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _store(loc, complete, **extra):
    group = zarr.open_group(loc.zarr_store("w"), mode="w-", zarr_format=3,
                            attributes={"emtile": {"format": 1, "complete": complete, **extra}})
    group.create_array("0", shape=(4, 8), chunks=(2, 8), dtype="uint8")[:] = 5
    return group


@pytest.mark.parametrize("out, inp, how", [
    ("v.zarr", "v.zarr/", "is"),
    ("v.zarr", "v.zarr/0", "holds"),
    ("v.zarr/labels/x", "v.zarr", "lies inside"),
    ("v.zarr/labels/x", "v.zarr/labels/mask", "lies inside"),  # the store that holds the input
])
def test_an_output_touching_an_input_is_refused(s3, out, inp, how):
    _store(Location(s3 / "v.zarr"), True)
    _store(Location(s3 / "v.zarr/labels/mask"), True)
    with pytest.raises(EmtileError, match=rf"^output '{s3 / out}' {how} the input "
                                          rf"'{s3 / inp}'.*: writing it could destroy the input"):
        check_output(s3 / out, inputs=[s3 / inp, None, np.zeros(3)])


def test_outputs_that_cannot_be_written_are_refused_before_any_work(s3):
    check_output(s3 / "new.zarr", inputs=[s3 / "v.zarr", "/tmp/local.tif"])
    assert Location(s3.url).keys() == []  # the probe is gone
    with pytest.raises(EmtileError, match=r"^output 's3://no-such-bucket-x/v.zarr' cannot be "
                                          r"written: "):
        check_output("s3://no-such-bucket-x/v.zarr")
    with pytest.raises(EmtileError, match=r"^output 'https://h/v.zarr' is read only"):
        check_output("https://h/v.zarr")


def test_prepare_output_keeps_promises(s3):
    new = Location(s3 / "new.zarr")
    assert prepare_output(new) == "new"
    _store(new, False, fingerprints={"predict": {"a": 1}})
    assert prepare_output(new, resume=True) == "resume" and new.exists("0/c/0/0")
    assert prepare_output(new) == "replaced" and new.keys() == []
    _store(new, True)
    assert is_complete(new) and emtile_attrs(new)["complete"] is True
    with pytest.raises(EmtileError, match=r"already exists; pass overwrite=True to replace it"):
        prepare_output(new, resume=True)
    assert prepare_output(new, overwrite=True) == "replaced" and new.keys() == []
    other = Location(s3 / "notes")
    other.write_bytes(b"mine", "a.txt")
    with pytest.raises(EmtileError, match=r"holds objects but no Zarr v3 store; choose another"):
        prepare_output(other, overwrite=True)
    assert other.read_bytes("a.txt") == b"mine"


def test_a_half_done_removal_is_finished_not_resumed(s3):
    out = Location(s3 / "v.zarr")
    _store(out, False, removing=True)
    assert not is_complete(out)
    assert prepare_output(out, resume=True) == "replaced" and out.keys() == []


def test_done_markers_live_on_s3(s3):
    out = Location(s3 / "v.zarr")
    group = _store(out, False)
    markers = BlockMarkers.create(group, 40, chunk=16)
    markers.record([0, 3, 17, 39])
    again = BlockMarkers.open(zarr.open_group(out.zarr_store("r+"), mode="r+"), 40)
    assert again.count() == 4 and list(again.todo())[:4] == [1, 2, 4, 5]
    assert "emtile_blocks/c/2" in out.keys()
    assert BlockMarkers.open(group, 41) is None
