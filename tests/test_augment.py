import numpy as np
import pytest

from emtile.augment import Augmenter, displacement_field, elastic, flip_rotate, jitter_intensity
from emtile.geometry import center_crop


def blocks(rng, shape, size=6):
    """A random binary block pattern (labels) and an image that codes it (0.2 / 0.8)."""
    coarse = rng.integers(0, 2, (shape[0] // size + 1, shape[1] // size + 1), dtype=np.uint8)
    label = np.kron(coarse, np.ones((size, size), np.uint8))[: shape[0], : shape[1]]
    return np.where(label == 1, 0.8, 0.2).astype(np.float32), label


def test_displacement_field_is_smooth_and_has_the_papers_scale():
    rng = np.random.default_rng(1)
    fields = np.stack([displacement_field((64, 80), rng, sigma=10.0) for _ in range(200)])
    assert fields.shape == (200, 2, 64, 80) and fields.dtype == np.float32
    # the grid nodes (corners and centre) carry N(0, 10) displacements
    corners = fields[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert 8.0 < corners.std() < 12.0
    # smooth: neighbouring pixels move almost together
    assert np.abs(np.diff(fields, axis=-1)).max() < 3.0
    assert np.abs(np.diff(fields, axis=-2)).max() < 3.0


def test_elastic_keeps_labels_binary_and_aligned_with_the_image():
    rng = np.random.default_rng(0)
    image, label = blocks(rng, (100, 100))
    out_image, out_label = elastic(image, label, rng, image_shape=(80, 80), label_shape=(40, 40),
                                   sigma=10.0, order=0)
    assert out_image.shape == (80, 80) and out_label.shape == (40, 40)
    assert set(np.unique(out_label)) <= {0, 1} and out_label.dtype == np.uint8
    # nearest-neighbour image: the label patch is exactly the centre of the deformed image
    np.testing.assert_array_equal(center_crop(out_image, (40, 40)) > 0.5, out_label == 1)
    # and it really moved
    assert not np.array_equal(out_label, center_crop(label, (40, 40)))


def test_elastic_with_zero_displacement_is_a_centre_crop():
    rng = np.random.default_rng(0)
    image, label = blocks(rng, (50, 50))
    out_image, out_label = elastic(image, label, rng, image_shape=(30, 30), label_shape=(10, 10), sigma=0.0)
    np.testing.assert_array_equal(out_image, image[10:40, 10:40])
    np.testing.assert_array_equal(out_label, label[20:30, 20:30])


def test_flip_rotate_keeps_centres_aligned():
    rng = np.random.default_rng(0)
    image, label = blocks(rng, (30, 30), size=3)
    seen = set()
    for _ in range(40):
        a, b = flip_rotate(image, center_crop(label, (10, 10)), rng)
        np.testing.assert_array_equal(center_crop(a, (10, 10)) > 0.5, b == 1)
        seen.add(a.tobytes())
    assert len(seen) == 8  # all flips and rotations occur


def test_jitter_intensity_changes_but_keeps_order():
    rng = np.random.default_rng(0)
    image = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    out = jitter_intensity(image, rng)
    assert out.dtype == np.float32 and not np.allclose(out, image)
    assert np.all(np.diff(out.ravel()) > 0)  # monotone transform


@pytest.mark.parametrize("switches", [
    {},
    {"elastic": False},
    {"flip": False, "intensity": False},
    {"noise": 0.05, "blur": 1.0},
])
def test_augmenter_output_shapes_binary_labels_and_alignment(switches):
    aug = Augmenter(**switches)
    rng = np.random.default_rng(3)
    size = 60 + 2 * aug.margin
    image, label = blocks(rng, (size, size), size=8)
    agree = []
    for _ in range(5):
        a, b = aug(image, label, rng, image_shape=(60, 60), label_shape=(20, 20))
        assert a.shape == (60, 60) and a.dtype == np.float32
        assert b.shape == (20, 20) and set(np.unique(b)) <= {0, 1}
        centre = center_crop(a, (20, 20))
        threshold = 0.5 * (centre[b == 1].mean() + centre[b == 0].mean()) if 0 < b.mean() < 1 else 0.5
        agree.append(np.mean((centre > threshold) == (b == 1)))
    # bilinear image vs nearest labels: disagreement only along block edges
    assert np.mean(agree) > (0.9 if switches.get("noise") else 0.97)


def test_augmenter_off_switches():
    aug = Augmenter(elastic=False, flip=False, intensity=False)
    assert aug.margin == 0
    rng = np.random.default_rng(0)
    image, label = blocks(rng, (40, 40))
    a, b = aug(image, label, rng, image_shape=(40, 40), label_shape=(20, 20))
    np.testing.assert_array_equal(a, image)
    np.testing.assert_array_equal(b, label[10:30, 10:30])
    assert Augmenter().margin == 40
