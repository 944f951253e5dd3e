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
