"""emtile: tiled training and inference of valid-convolution U-Nets on large EM volumes.

``import emtile`` is light: torch, numba, dask and matplotlib load only when a function that
needs them is first used.
"""

from importlib import import_module

from emtile._errors import EmtileError

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access, PEP 562)
_LAZY = {
    "open_volume": "emtile.volume",
    "convert": "emtile.converter",
    "info": "emtile.describe",
    "UNet": "emtile.unet",
    "save_model": "emtile.unet",
    "load_model": "emtile.model",
    "predict": "emtile.predictor",
    "train": "emtile.trainer",
    "TrainSettings": "emtile.training.settings",
    "PredictSettings": "emtile.settings",
    "SegmentSettings": "emtile.settings",
    "Runner": "emtile.blockwise",
    "evaluate": "emtile.evaluation",
    "show": "emtile.plot",
    "export_model": "emtile.export",
    "segment": "emtile.segmenter",
    "Location": "emtile.locations",
}

__all__ = ["EmtileError", "__version__", *_LAZY]


def __getattr__(name):
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'emtile' has no attribute {name!r}") from None
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
