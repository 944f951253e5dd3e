"""emtile._allocator: a blockwise stage sets the process's allocator once (NumPy's huge-page
requests off, glibc keeping freed memory), and ``EMTILE_ALLOCATOR=default`` leaves it alone.
Each case runs in a fresh interpreter: the settings are process-wide."""

import os
import subprocess
import sys

import pytest

_PROBE = """
import numpy as np
core = getattr(np, "_core", None) or np.core
setter = core.multiarray._set_madvise_hugepage
{before}
print("hugepages", setter(True))  # returns the setting it replaces
"""


def _probe(before, **env):
    code = _PROBE.format(before=before)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and NumPy's madvise")
def test_a_stage_turns_numpy_hugepages_off_once_and_the_switch_leaves_them(tmp_path):
    import numpy as np

    from emtile.store import create_image, mark_complete

    group = create_image(str(tmp_path / "p.zarr"), (1, 40, 40), np.uint8, kind="probabilities")
    group["0"][0, 5:35, 5:35] = 255
    mark_complete(group)
    seg = f"""
import emtile
emtile.segment(r"{tmp_path / 'p.zarr'}", r"{tmp_path / 's.zarr'}", progress=False,
               overwrite=True)
"""
    assert _probe("")[-1] == "True"  # NumPy's own default on Linux
    assert _probe(seg)[-1] == "False"  # run_stage set it
    assert _probe(seg, EMTILE_ALLOCATOR="default")[-1] == "True"
    direct = ("from emtile._allocator import keep_freed_memory as k; "
              "print(k(), k())")
    out = _probe(direct)
    assert out[:2] == ["True", "False"] and out[-1] == "False"  # changed once, then nothing
