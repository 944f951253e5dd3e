"""Voxel sizes read from the input's own metadata (issue 14, item 1): OME-XML, ImageJ, TIFF
resolution tags and OME-Zarr scales, each from a file written here; ``--voxel-size`` overrides;
the source is recorded and shown by ``emtile info``; what cannot be a voxel size is one warning;
predict and segment carry the size through to their NGFF scales."""

import warnings

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from emtile.cli.main import main
from emtile.store import voxel_size_nm
from emtile.converter import convert
from emtile.describe import info
from emtile.voxels import MetadataWarning, read_voxel_size

ZYX = {"z": 50.0, "y": 4.0, "x": 4.0}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def stack(shape=(4, 24, 20)):
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def ngff(path):
    """``(scale of level 0, axis units)`` as the store's NGFF metadata writes them."""
    ms = zarr.open_group(str(path), mode="r").attrs["ome"]["multiscales"][0]
    scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    return scale, [a.get("unit") for a in ms["axes"]]


def converted(src, out, **kw):
    """Convert with no warning allowed; return (NGFF scale, units, info dict)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetadataWarning)
        convert(src, out, progress=False, **kw)
    return (*ngff(out), info(out))


def imagej(path, unit="um", size=0.004, spacing=0.05, **metadata):
    tifffile.imwrite(path, stack(), imagej=True, resolution=(1 / size, 1 / size),
                     metadata={"axes": "ZYX", "unit": unit, "spacing": spacing, **metadata})
    return path


def ome(path, data=None, **sizes):
    tifffile.imwrite(path, stack() if data is None else data, ome=True,
                     metadata={"axes": "ZYX" if (data is None or data.ndim == 3) else "YX",
                               **sizes})
    return path


# --------------------------------------------------------------------------- each kind


@pytest.mark.parametrize("unit, size, spacing", [
    ("um", 0.004, 0.05), ("micron", 0.004, 0.05), ("\\u00B5m", 0.004, 0.05),  # ImageJ's µ
    ("nm", 4, 50)])
def test_imagej_unit_spacing_and_resolution(tmp_path, unit, size, spacing):
    src = imagej(tmp_path / "ij.tif", unit, size, spacing)
    assert read_voxel_size(src) == (pytest.approx(ZYX), "ImageJ")
    scale, units, d = converted(src, tmp_path / "v.zarr")
    assert scale == pytest.approx([50, 4, 4]) and units == ["nanometer"] * 3
    assert d["voxel_size_source"] == "ImageJ" and "voxel_size_note" not in d
    assert voxel_size_nm(tmp_path / "v.zarr") == pytest.approx([50, 4, 4])


def test_ome_xml_physical_sizes_and_units(tmp_path):
    src = ome(tmp_path / "a.ome.tif", PhysicalSizeX=4, PhysicalSizeXUnit="nm", PhysicalSizeY=5,
              PhysicalSizeYUnit="nm", PhysicalSizeZ=0.05, PhysicalSizeZUnit="µm")
    assert read_voxel_size(src) == (pytest.approx({"z": 50, "y": 5, "x": 4}), "OME-XML")
    scale, units, d = converted(src, tmp_path / "v.zarr")
    assert scale == pytest.approx([50, 5, 4]) and d["voxel_size_source"] == "OME-XML"


def test_ome_xml_default_unit_is_micrometre(tmp_path):
    src = ome(tmp_path / "b.ome.tif", PhysicalSizeX=0.004, PhysicalSizeY=0.004, PhysicalSizeZ=0.05)
    assert read_voxel_size(src) == (pytest.approx(ZYX), "OME-XML")


def test_plain_tiff_resolution_in_centimetres_of_one_image(tmp_path):
    src = tmp_path / "one.tif"
    tifffile.imwrite(src, stack()[0], resolution=(2.5e6, 2e6), resolutionunit="CENTIMETER")
    assert read_voxel_size(src) == (pytest.approx({"y": 5, "x": 4}), "TIFF resolution tags")
    scale, units, d = converted(src, tmp_path / "v.zarr")
    assert scale == pytest.approx([1, 5, 4]) and d["voxel_size_source"] == "TIFF resolution tags"
    assert voxel_size_nm(tmp_path / "v.zarr") == pytest.approx([1, 5, 4])


def test_plain_tiff_resolution_in_inches_and_micrometres(tmp_path):
    tifffile.imwrite(tmp_path / "in.tif", stack()[0], resolution=(254e4, 254e4),
                     resolutionunit="INCH")  # 2.54e6 pixels per inch: 10 nm
    tifffile.imwrite(tmp_path / "um.tif", stack()[0], resolution=(250, 250),
                     resolutionunit="MICROMETER")  # tifffile's RESUNIT 5: 4 nm
    assert read_voxel_size(tmp_path / "in.tif")[0] == pytest.approx({"y": 10, "x": 10})
    assert read_voxel_size(tmp_path / "um.tif")[0] == pytest.approx({"y": 4, "x": 4})


def test_a_stack_with_in_plane_sizes_only_says_so(tmp_path):
    """Resolution tags have no slice spacing: z recorded as x for viewers, but not counted as
    known (no model or warning relies on it), and one line says how to give it."""
    src = tmp_path / "cm.tif"
    tifffile.imwrite(src, stack(), resolution=(2.5e6, 2.5e6), resolutionunit="CENTIMETER",
                     photometric="minisblack")
    with pytest.warns(MetadataWarning, match=r"'.*cm\.tif': the pixel size 4 x 4 nm \(from the "
                      r"input's TIFF resolution tags\) comes with no slice spacing: z is recorded "
                      r"as 4 nm \(as x\) .*; pass voxel_size=Z,4,4 to set it"):
        convert(src, tmp_path / "v.zarr", progress=False)
    assert ngff(tmp_path / "v.zarr")[0] == pytest.approx([4, 4, 4])
    assert voxel_size_nm(tmp_path / "v.zarr") is None
    d = info(tmp_path / "v.zarr")
    assert d["voxel_size_note"] == ("y, x from the input's TIFF resolution tags; no slice spacing "
                                    "there, z recorded as x")


def test_a_folder_of_slices_takes_the_first_files_in_plane_size(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for k, img in enumerate(stack()):
        tifffile.imwrite(folder / f"s{k}.tif", img, resolution=(2.5e6, 2.5e6),
                         resolutionunit="CENTIMETER")
    assert read_voxel_size(folder) == (pytest.approx({"y": 4, "x": 4}), "TIFF resolution tags")
    assert read_voxel_size(str(folder / "s*.tif"))[0] == pytest.approx({"y": 4, "x": 4})
    with pytest.warns(MetadataWarning, match="no slice spacing"):
        convert(folder, tmp_path / "v.zarr", progress=False)


# --------------------------------------------------------------------------- precedence


def test_precedence_voxel_size_then_ome_then_imagej_then_tags(tmp_path):
    both = tmp_path / "both.ome.tif"
    tifffile.imwrite(both, stack(), ome=True, resolution=(1e6, 1e6), resolutionunit="CENTIMETER",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 4, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 4, "PhysicalSizeYUnit": "nm",
                               "PhysicalSizeZ": 50, "PhysicalSizeZUnit": "nm"})
    assert read_voxel_size(both) == (pytest.approx(ZYX), "OME-XML")  # not the tags' 10 nm
    ij = imagej(tmp_path / "ij.tif", "nm", 4, 50)  # ImageJ's unit over the tags' NONE
    assert read_voxel_size(ij)[1] == "ImageJ"
    scale, _, d = converted(both, tmp_path / "given.zarr", voxel_size=(0.03, 0.006, 0.006),
                            unit="um")
    assert scale == pytest.approx([30, 6, 6]) and d["voxel_size_source"] == "--voxel-size"


def test_isbi_like_tiff_has_no_voxel_size(tmp_path):
    """The ISBI files: resolution 1/1 with unit NONE, which is no voxel size, silently."""
    src = tmp_path / "isbi.tif"
    tifffile.imwrite(src, stack(), resolution=(1, 1), resolutionunit="NONE",
                     photometric="minisblack")
    with tifffile.TiffFile(src) as tf:
        assert tf.pages[0].resolutionunit == 1
    assert read_voxel_size(src) == ({}, "not given")
    scale, _, d = converted(src, tmp_path / "v.zarr")
    assert scale == [1.0, 1.0, 1.0] and voxel_size_nm(tmp_path / "v.zarr") is None
    assert d["voxel_size_source"] == "not given"
    assert d["voxel_size_note"] == "not given at conversion; recorded as 1 nm"


def test_the_isbi_files_record_none(isbi_dir):
    for name in ("train-volume.tif", "train-labels.tif", "test-volume.tif"):
        assert read_voxel_size(isbi_dir / name) == ({}, "not given")


# --------------------------------------------------------------------------- implausible


@pytest.mark.parametrize("sizes, what", [
    ({"PhysicalSizeX": 0, "PhysicalSizeY": 4, "PhysicalSizeYUnit": "nm"},
     "PhysicalSizeX 0 µm is not a voxel size"),
    ({"PhysicalSizeX": -4, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 4, "PhysicalSizeYUnit": "nm"},
     "PhysicalSizeX -4 nm is not a voxel size"),
    ({"PhysicalSizeX": float("inf"), "PhysicalSizeY": 4},
     "PhysicalSizeX inf µm is not a voxel size"),
    ({"PhysicalSizeX": 4, "PhysicalSizeXUnit": "furlong", "PhysicalSizeY": 4,
      "PhysicalSizeYUnit": "furlong"},
     "PhysicalSizeY 4 furlong: 'furlong' is not a length unit emtile knows; PhysicalSizeX 4 "
     "furlong: 'furlong' is not a length unit emtile knows")])
def test_implausible_ome_sizes_are_one_warning_and_ignored(tmp_path, sizes, what):
    src = ome(tmp_path / "bad.ome.tif", **sizes)
    with pytest.warns(MetadataWarning) as record:
        assert read_voxel_size(src) == ({}, "not given")
    lines = [str(w.message) for w in record]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"{str(src)!r}: OME-XML: {what}")
    assert lines[0].endswith("; ignored (pass voxel_size= to give one)")


def test_an_implausible_ome_size_falls_back_to_the_tags(tmp_path):
    src = tmp_path / "bad.ome.tif"
    tifffile.imwrite(src, stack(), ome=True, resolution=(2.5e6, 2.5e6), resolutionunit="CENTIMETER",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0, "PhysicalSizeY": 0})
    with pytest.warns(MetadataWarning, match="PhysicalSizeX 0"):
        assert read_voxel_size(src) == (pytest.approx({"y": 4, "x": 4}), "TIFF resolution tags")


def test_implausible_imagej_spacing_drops_z_only(tmp_path):
    src = imagej(tmp_path / "ij.tif", "nm", 4, -50)
    with pytest.warns(MetadataWarning, match=r"ImageJ: spacing -50 nm is not a voxel size"):
        assert read_voxel_size(src) == (pytest.approx({"y": 4, "x": 4}), "ImageJ")


def test_print_resolution_is_not_a_pixel_size(tmp_path):
    src = tmp_path / "dpi.tif"
    tifffile.imwrite(src, stack()[0], resolution=(72, 72), resolutionunit="INCH")
    with pytest.warns(MetadataWarning, match=r"TIFF resolution tags: 72 x 72 dpi is a print or "
                                             r"screen setting, not a pixel size; ignored"):
        assert read_voxel_size(src) == ({}, "not given")


def test_uncalibrated_imagej_is_silent(tmp_path):
    src = imagej(tmp_path / "px.tif", "pixel", 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_voxel_size(src) == ({}, "not given")


# --------------------------------------------------------------------------- OME-Zarr inputs


def foreign_ngff(path, scale, unit="micrometer"):
    """An OME-Zarr 0.5 image written with zarr alone (not by emtile), in ``unit``."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", data=stack(), chunks=(1, 24, 20))
    axes = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in "zyx"]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]}
    return path


def test_an_ome_zarr_inputs_scale_is_read_in_its_units(tmp_path):
    src = foreign_ngff(tmp_path / "um.zarr", [0.05, 0.004, 0.004])
    assert read_voxel_size(src) == (pytest.approx(ZYX), "OME-Zarr")
    assert read_voxel_size(src / "0") == (pytest.approx(ZYX), "OME-Zarr")  # the array in it
    scale, units, d = converted(src, tmp_path / "v.zarr")
    assert scale == pytest.approx([50, 4, 4]) and units == ["nanometer"] * 3
    assert d["voxel_size_source"] == "OME-Zarr"
    assert info(src)["voxel_unit"] == "micrometer"
    assert "voxel size    0.05 x 0.004 x 0.004 micrometer (z,y,x)" in cli("info", src).output


def test_an_emtile_store_given_no_voxel_size_passes_none_on(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", stack(), photometric="minisblack")
    convert(tmp_path / "a.tif", tmp_path / "a.zarr", progress=False)
    assert read_voxel_size(tmp_path / "a.zarr") == ({}, "not given")  # its 1 nm is a placeholder
    given = imagej(tmp_path / "ij.tif", "nm", 4, 50)
    convert(given, tmp_path / "b.zarr", progress=False)
    assert read_voxel_size(tmp_path / "b.zarr") == (pytest.approx(ZYX), "OME-Zarr")


def test_an_ome_zarr_scale_without_unit(tmp_path):
    assert read_voxel_size(foreign_ngff(tmp_path / "ones.zarr", [1, 1, 1], unit=None)) == \
        ({}, "not given")  # a writer's default: silently none
    with pytest.warns(MetadataWarning) as record:
        assert read_voxel_size(foreign_ngff(tmp_path / "nounit.zarr", [50, 4, 4], unit=None)) \
            == ({}, "not given")
    assert [str(w.message).split(": ", 1)[1] for w in record
            if issubclass(w.category, MetadataWarning)] == [
        "OME-Zarr metadata: z scale 50: no unit; y scale 4: no unit; x scale 4: no unit; "
        "ignored (pass voxel_size= to give one)"]


# --------------------------------------------------------------------------- the CLI


def test_cli_convert_and_info_say_where_the_voxel_size_came_from(tmp_path):
    src = imagej(tmp_path / "ij.tif")
    r = cli("convert", src, tmp_path / "v.zarr", "--no-progress")
    assert r.exit_code == 0, r.output
    line = "voxel size    50 x 4 x 4 nm (z,y,x), from the input's ImageJ metadata"
    assert line in r.output.splitlines()
    assert line in cli("info", tmp_path / "v.zarr").output.splitlines()
    r = cli("convert", src, tmp_path / "w.zarr", "--voxel-size", "40,5,5", "--no-progress")
    assert "voxel size    40 x 5 x 5 nm (z,y,x), given at conversion (--voxel-size)" in r.output
    r = cli("info", tmp_path / "v.zarr", "--json")
    assert '"voxel_size_source": "ImageJ"' in r.output


def test_cli_warning_is_one_line(tmp_path):
    src = ome(tmp_path / "bad.ome.tif", PhysicalSizeX=0, PhysicalSizeY=4)
    r = cli("convert", src, tmp_path / "v.zarr", "--no-progress")
    assert r.exit_code == 0, r.output
    warned = [line for line in r.stderr.splitlines() if line.startswith("Warning:")]
    assert warned == [f"Warning: {str(src)!r}: OME-XML: PhysicalSizeX 0 µm is not a voxel size "
                      f"(a voxel is from 1 pm to 1 cm); ignored (pass --voxel-size to give one)"]
    assert "Traceback" not in r.output
    assert "(not given at conversion; recorded as 1 nm)" in r.output


# --------------------------------------------------------------------------- carried through


def test_predict_and_segment_carry_the_voxel_size(tmp_path):
    """ImageJ TIFF -> convert -> predict (with a mask) -> segment: every store's NGFF scale is
    the TIFF's 50 x 4 x 4 nm, and every store is valid OME-Zarr 0.5."""
    import torch

    from emtile.predictor import predict
    from emtile.segmenter import segment
    from emtile.unet import UNet

    src = imagej(tmp_path / "ij.tif", "nm", 4, 50)
    convert(src, tmp_path / "raw.zarr", progress=False)
    torch.manual_seed(0)
    predict(UNet(base=2, depth=2), tmp_path / "raw.zarr", tmp_path / "pred.zarr", tile=64,
            threshold=0.5, progress=False)
    segment(tmp_path / "pred.zarr", tmp_path / "seg.zarr", threshold=0.5, progress=False)
    for store in ("raw.zarr", "pred.zarr", "pred.zarr/labels/mask", "seg.zarr"):
        assert ngff(tmp_path / store) == ([50, 4, 4], ["nanometer"] * 3), store
    assert info(tmp_path / "pred.zarr")["voxel_size_source"] == "input"
    assert "50 x 4 x 4 nm (z,y,x), from the input" in cli("info", tmp_path / "pred.zarr").output
    assert info(tmp_path / "seg.zarr")["voxel_size_source"] == "prediction"

    models = pytest.importorskip("ome_zarr_models")  # noqa: F841
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    for store, kind in (("raw.zarr", Image), ("pred.zarr", Image),
                        ("pred.zarr/labels/mask", ImageLabel), ("seg.zarr", ImageLabel)):
        node = open_ome_zarr(zarr.open_group(tmp_path / store, mode="r"))
        assert isinstance(node, kind), store


def test_predict_gives_nanometres_for_an_input_in_micrometres(tmp_path):
    import torch

    from emtile.predictor import predict
    from emtile.unet import UNet

    src = foreign_ngff(tmp_path / "um.zarr", [0.05, 0.004, 0.004])
    torch.manual_seed(0)
    predict(UNet(base=2, depth=2), src, tmp_path / "pred.zarr", tile=64, progress=False)
    scale, units = ngff(tmp_path / "pred.zarr")
    assert scale == pytest.approx([50, 4, 4]) and units == ["nanometer"] * 3


def test_an_unknown_voxel_size_stays_unknown_downstream(tmp_path):
    """A stack converted with no voxel size: its prediction and segmentation say so too, rather
    than presenting the 1 nm placeholder as the input's size."""
    import torch

    from emtile.predictor import predict
    from emtile.segmenter import segment
    from emtile.unet import UNet

    src = tmp_path / "plain.tif"
    tifffile.imwrite(src, stack(), photometric="minisblack")
    convert(src, tmp_path / "raw.zarr", progress=False)
    torch.manual_seed(0)
    predict(UNet(base=2, depth=2), tmp_path / "raw.zarr", tmp_path / "pred.zarr", tile=64,
            threshold=0.5, progress=False)
    segment(tmp_path / "pred.zarr", tmp_path / "seg.zarr", threshold=0.5, progress=False)
    for store in ("pred.zarr", "seg.zarr"):
        assert voxel_size_nm(tmp_path / store) is None, store
        assert "not given at conversion" in cli("info", tmp_path / store).output, store
