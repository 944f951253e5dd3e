import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _isbi_dir():
    return Path(os.environ.get("EMTILE_ISBI_DIR", REPO.parent / "shared" / "data" / "isbi2012"))


@pytest.fixture(scope="session")
def isbi_dir():
    """The ISBI 2012 data folder; in CI a missing folder is a failure, locally a skip."""
    d = _isbi_dir()
    if not (d / "train-volume.tif").exists():
        if os.environ.get("CI"):
            pytest.fail(f"ISBI data not found at {d} (set EMTILE_ISBI_DIR)")
        pytest.skip(f"ISBI data not found at {d} (set EMTILE_ISBI_DIR)")
    return d


@pytest.fixture(scope="session")
def isbi_raw(isbi_dir):
    import tifffile

    return tifffile.imread(isbi_dir / "train-volume.tif")


@pytest.fixture(scope="session")
def isbi_labels(isbi_dir):
    import tifffile

    return tifffile.imread(isbi_dir / "train-labels.tif")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def synthetic_em(shape=(6, 96, 96), *, cells=24, membrane=2.0, seed=0):
    """A small EM-like stack made here: ``(raw uint8, labels uint8 {0, 1})``, shape ``shape``.

    Each slice is a Voronoi tessellation of ``cells`` random seeds: pixels closer than
    ``membrane`` px to the bisector of their two nearest seeds are membrane (label 0, dark),
    the others cell interior (label 1, bright), with smooth shading and noise on the raw image.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z, ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    raw = np.empty(shape, np.uint8)
    labels = np.empty(shape, np.uint8)
    for k in range(z):
        seeds = rng.uniform(0, (ny, nx), (cells, 2)).astype(np.float32)
        d = np.sqrt((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2)
        d.sort(axis=-1)
        cell = (d[..., 1] - d[..., 0]) > membrane
        shade = ndimage.gaussian_filter(rng.normal(0, 1, (ny, nx)), 8)
        image = np.where(cell, 0.7, 0.25) + 0.1 * shade / max(np.abs(shade).max(), 1e-6)
        image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 0.04, (ny, nx))
        raw[k] = np.clip(image * 255, 0, 255).astype(np.uint8)
        labels[k] = cell
    return raw, labels


@pytest.fixture(scope="session")
def synthetic_small():
    """Six 96×96 synthetic EM slices and their labels (see :func:`synthetic_em`)."""
    return synthetic_em()
