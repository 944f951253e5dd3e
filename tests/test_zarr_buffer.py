"""emtile._zarr_buffer: the fill-value check zarr runs before each chunk write gives zarr's own
answers, empty chunks are still left unwritten, and a user's own ``ndbuffer`` setting stays."""

import os
import subprocess
import sys

import numpy as np
import pytest
from zarr.core.buffer import cpu

from emtile._zarr_buffer import NDBuffer

FILLS = [0, 7, 0.0, -0.0, 2.5, np.nan, True]
DTYPES = ["uint8", "uint16", "uint32", "uint64", "int8", "int64", "float16", "float32", "float64",
          "bool"]


def _chunks(dtype, fill):
    """Chunks all of ``fill``, and ones that differ first, last, or in the sign of zero / NaN."""
    shape = (3, 4, 5)
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            full = np.full(shape, fill, dtype=dtype)
    except (ValueError, OverflowError):
        full = np.zeros(shape, dtype)
    out = [full]
    for index in [(0, 0, 0), (2, 3, 4), (1, 2, 3)]:
        for value in [1, 0, -0.0, np.nan, 200]:
            a = full.copy()
            with np.errstate(invalid="ignore", over="ignore"):
                try:
                    a[index] = value
                except (ValueError, OverflowError):
                    continue
            out.append(a)
    out.append(full[:, ::2, 1:])  # a view: not contiguous
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_equal_gives_zarrs_answer_for_every_dtype_and_fill(dtype):
    checked = 0
    for fill in FILLS:
        scalar = np.asarray(fill)[()]
        for chunk in _chunks(dtype, fill):
            for equal_nan in (True, False):
                ours = NDBuffer.from_numpy_array(chunk).all_equal(scalar, equal_nan=equal_nan)
                with np.errstate(invalid="ignore"):
                    theirs = cpu.NDBuffer.from_numpy_array(chunk).all_equal(scalar,
                                                                            equal_nan=equal_nan)
                assert ours == theirs, (dtype, fill, chunk.ravel().tolist(), equal_nan)
                checked += 1
    assert checked > 150


def test_a_store_written_by_emtile_leaves_fill_chunks_unwritten_and_keeps_every_value(tmp_path):
    from emtile.store import create_image, mark_complete

    group = create_image(str(tmp_path / "p.zarr"), (2, 64, 64), np.uint8, kind="probabilities",
                         chunks=(1, 32, 32))
    data = np.zeros((2, 64, 64), np.uint8)
    data[0, :32, :32] = 9  # one chunk of data, one that starts with 0 and ends with data
    data[1, 31, 31] = 5
    group["0"][...] = data
    mark_complete(group)
    files = sorted(p.relative_to(tmp_path / "p.zarr" / "0").as_posix()
                   for p in (tmp_path / "p.zarr" / "0").rglob("*") if p.is_file()
                   and p.name != "zarr.json")
    assert files == ["c/0/0/0", "c/1/0/0"]
    np.testing.assert_array_equal(group["0"][...], data)
    import zarr

    assert zarr.config.get("ndbuffer") == "emtile._zarr_buffer.NDBuffer"


def test_a_users_own_ndbuffer_setting_is_left_alone(tmp_path):
    code = f"""
import numpy as np, zarr
zarr.config.set({{"ndbuffer": "zarr.buffer.cpu.NDBuffer", "buffer": "zarr.buffer.cpu.Buffer"}})
from zarr.core.buffer import cpu
class Mine(cpu.NDBuffer):
    pass
zarr.registry.register_ndbuffer(Mine)
zarr.config.set({{"ndbuffer": "__main__.Mine"}})
from emtile.store import create_image
create_image(r"{tmp_path / 'p.zarr'}", (1, 8, 8), np.uint8, kind="probabilities")
print(zarr.config.get("ndbuffer"))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=os.environ, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["__main__.Mine"]
