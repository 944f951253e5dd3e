"""The Zarr codec pipeline predict's arrays use: zarrs (Rust) where it is installed.

`zarrs <https://github.com/zarrs/zarrs-python>`_ (the ``fast`` extra: ``pip install
emtile[fast]``) encodes and decodes a whole read or write's chunks in Rust threads that do not
hold the GIL; zarr-python's own pipeline runs each chunk's codecs through asyncio and its thread
pool. Both read and write the same array bytes (zarrs uses the same Blosc); the files may differ
by their compressed bytes only. ``EMTILE_ZARRS=0`` keeps zarr-python's pipeline.

zarr-python picks an array's pipeline when the array is opened, from its configuration, so
:func:`pipeline` is a context for the opening only: arrays opened in it keep zarrs.
"""

import contextlib
import importlib.util
import os

ZARRS = "zarrs.ZarrsCodecPipeline"


def available():
    """Whether zarrs is installed and not switched off (``EMTILE_ZARRS=0``)."""
    if os.environ.get("EMTILE_ZARRS", "1") == "0":
        return False
    return importlib.util.find_spec("zarrs") is not None


@contextlib.contextmanager
def pipeline():
    """Arrays opened inside use zarrs' codec pipeline when :func:`available`."""
    if not available():
        yield False
        return
    import zarr

    with zarr.config.set({"codec_pipeline.path": ZARRS}):
        yield True
