"""Every kind of store emtile writes is valid OME-Zarr 0.5, by an independent validator
(ome-zarr-models, a test extra): converted images and labels, predictions with their mask, and
pyramids."""

import numpy as np
import pytest
import tifffile
import torch
import zarr

from emtile.predictor import predict
from emtile.unet import UNet
from emtile.converter import convert

models = pytest.importorskip("ome_zarr_models")
from ome_zarr_models import open_ome_zarr  # noqa: E402
from ome_zarr_models.v05.image import Image  # noqa: E402
from ome_zarr_models.v05.image_label import ImageLabel  # noqa: E402
from ome_zarr_models.v05.labels import Labels  # noqa: E402


def validate(path, kind):
    node = open_ome_zarr(zarr.open_group(path, mode="r"))
    assert isinstance(node, kind), f"{path} is a {type(node).__name__}, expected {kind.__name__}"
    return node


@pytest.fixture
def stack(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (3, 70, 60), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", data, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", (data > 100).astype(np.uint8) * 255,
                     photometric="minisblack")
    return tmp_path


@pytest.mark.parametrize("levels", [1, 3])
def test_converted_images_and_labels(stack, levels):
    convert(stack / "raw.tif", stack / "raw.zarr", levels=levels, voxel_size=(50, 4, 4),
            progress=False)
    image = validate(stack / "raw.zarr", Image)
    assert len(image.attributes.ome.multiscales[0].datasets) == levels
    assert all(zarr.open_array(stack / "raw.zarr" / str(k)).shards for k in range(levels))  # sharded
    convert(stack / "labels.tif", stack / "labels.zarr", labels=True, levels=levels,
            progress=False)
    validate(stack / "labels.zarr", Image)


@pytest.mark.parametrize("levels", [1, 3])
def test_converted_instance_ids_are_a_label_image(stack, levels):
    """convert(..., labels=True, ids=True): an NGFF image-label group (no source image)."""
    ids = np.random.default_rng(1).integers(0, 500, (3, 70, 60)).astype(np.uint16)
    tifffile.imwrite(stack / "ids.tif", ids, photometric="minisblack")
    convert(stack / "ids.tif", stack / "ids.zarr", labels=True, ids=True, levels=levels,
            voxel_size=(10, 10, 10), progress=False)
    label = validate(stack / "ids.zarr", ImageLabel)
    assert len(label.attributes.ome.multiscales[0].datasets) == levels
    assert all(zarr.open_array(stack / "ids.zarr" / str(k)).shards for k in range(levels))  # sharded


@pytest.mark.parametrize("levels, roi", [(1, None), (2, (slice(1, 3), slice(16, 70), slice(None)))])
def test_predictions_with_their_mask(stack, levels, roi):
    convert(stack / "raw.tif", stack / "raw.zarr", voxel_size=(50, 4, 4), progress=False)
    torch.manual_seed(0)
    out = stack / "pred.zarr"
    predict(UNet(base=2, depth=2), stack / "raw.zarr", out, tile=64, threshold=0.5,
            levels=levels, roi=roi, progress=False)
    image = validate(out, Image)
    assert len(image.attributes.ome.multiscales[0].datasets) == levels
    validate(out / "labels", Labels)
    validate(out / "labels" / "mask", ImageLabel)


@pytest.mark.parametrize("levels", [1, 3])
def test_segmentations(tmp_path, levels):
    """``emtile segment`` output, with and without a pyramid: an NGFF image-label group."""
    from scipy import ndimage

    from emtile.segmenter import segment
    from emtile.store import create_image, mark_complete

    field = ndimage.gaussian_filter(np.random.default_rng(0).random((2, 64, 80)), (0, 3, 3))
    p = np.round(255 * (field - field.min()) / np.ptp(field)).astype(np.uint8)
    pred = create_image(tmp_path / "pred.zarr", p.shape, np.uint8, kind="probabilities",
                        voxel_size=(50, 4, 4))
    pred["0"][...] = p
    mark_complete(pred)
    out = tmp_path / "seg.zarr"
    r = segment(tmp_path / "pred.zarr", out, threshold=0.5, block_size=(1, 32, 40),
                levels=levels, progress=False)
    assert r.objects > 3
    label = validate(out, ImageLabel)
    assert len(label.attributes.ome.multiscales[0].datasets) == levels
