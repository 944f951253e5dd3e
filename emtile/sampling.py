"""Random training patches from lazily read volumes, as a worker-safe PyTorch dataset.

A training sample is an input patch of the model's input size and the label patch of its output
size that sits exactly at the centre of the input's receptive field. Only the crop a patch needs
is read (array slicing on a Zarr/OME-Zarr volume reads the chunks it touches); context beyond the
volume border is mirrored, as the predictor mirrors it.

Reproducibility does not depend on the number of DataLoader workers: sample ``i`` is drawn and
augmented with its own generator ``numpy.random.default_rng([seed, i])``, batch ``b`` holds samples
``b * batch_size ... b * batch_size + batch_size - 1``, and worker ``w`` of ``W`` builds batches
``start + w, start + w + W, ...``, which the DataLoader returns in order. The stream of batches is
therefore a pure function of ``seed`` and the batch index, so a resumed run only needs ``start``.
"""

import math

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from emtile._errors import EmtileError
from emtile.geometry import center_crop, read_window
from emtile.normalize import Scaling, apply as normalize_pixels
from emtile.stacks import resolve_slices

_BLOCK = 64  # block size of the foreground index


def read_mirrored(array, z, box):
    """``array[z, y0:y1, x0:x1]`` for a box that may extend past the volume, mirrored there.

    The predictor's own reader (:func:`emtile.geometry.read_window`, NumPy ``"reflect"``), so
    training patches see the same border context as prediction tiles.

    Parameters
    ----------
    array : array-like, shape (Z, Y, X)
        Lazy volume (basic slicing returns NumPy).
    z : int
        Slice index.
    box : sequence of (start, stop)
        Per spatial axis; may be negative or exceed the volume.

    Returns
    -------
    ndarray, shape (y1 - y0, x1 - x0), the array's dtype
    """
    start = (int(z),) + tuple(int(a) for a, _ in box)
    stop = (int(z) + 1,) + tuple(int(b) for _, b in box)
    return read_window(array, start, stop)[0]


def check_patch_geometry(shape, input_size, output_size):
    """Validate input/output patch sizes against a volume's spatial ``shape``; return tuples."""
    ins = _pair(input_size)
    outs = _pair(output_size)
    for i, o in zip(ins, outs):
        if o <= 0 or i < o or (i - o) % 2:
            raise EmtileError(
                f"input size {ins} and output size {outs} do not form a centred valid patch"
            )
    if any(o > s for o, s in zip(outs, shape)):
        raise EmtileError(
            f"the volume's slices ({shape[0]}×{shape[1]} px) are smaller than the tile's output "
            f"({outs[0]}×{outs[1]} px for input {ins[0]}×{ins[1]}): choose a smaller --tile"
        )
    return ins, outs


def _pair(v):
    if isinstance(v, (int, np.integer)):
        return (int(v), int(v))
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise EmtileError(f"patch size {v} must be one int or a (Y, X) pair")
    return v


class PatchDataset(IterableDataset):
    """An endless stream of random training batches.

    Parameters
    ----------
    raw : array-like, shape (Z, Y, X)
        The image volume (lazy; only patch crops are read).
    labels : array-like, shape (Z, Y, X)
        Binary labels, non-zero = cell interior, ``0`` = membrane (0/1, 0/255 or bool).
    input_size, output_size : int or (int, int)
        The model's input patch and the output patch it predicts (e.g. 572 and 388).
    slices : sequence of int
        Slice indices to sample from (checked by :func:`emtile.stacks.resolve_slices`).
    batch_size : int
        Samples per yielded batch.
    seed : int
        Base seed; sample ``i`` uses ``numpy.random.default_rng([seed, i])``.
    start : int
        Index of the first batch to yield (a resumed run passes its iteration count).
    augment : callable, optional
        ``augment(image_crop, label_crop, rng, image_shape=..., label_shape=...)`` with a
        ``margin`` attribute, e.g. :class:`emtile.augment.Augmenter`; ``None``: no augmentation.
    weights : callable, optional
        ``weights(label_patch) -> float32 weight map`` (e.g. ``functools.partial`` of
        :func:`emtile.losses.weight_map`), computed here, in the worker.
    paths : tuple of (str or None), optional
        ``(raw_path, labels_path)``: DataLoader workers re-open these with
        :func:`emtile.open_volume` instead of sharing the parent's open files (a TIFF handle
        shared by forked processes is not safe to read from concurrently).
    foreground : float, optional
        Foreground balance: with this probability a patch is placed so that its label patch
        contains a foreground (label ``1``) pixel drawn uniformly from all foreground pixels of
        the training slices; otherwise (and with ``None``) patches are uniform. Finding the
        foreground reads the training label slices once, a band of rows at a time.
    normalize : emtile.normalize.Scaling, optional
        How raw pixels become the model's input (:func:`emtile.normalize.apply`), resolved on
        the raw volume by :func:`emtile.normalize.statistics`; default the ``dtype`` rule.

    Each batch is a dict of float32 tensors ``image`` (B, 1, *input), ``label`` (B, 1, *output)
    and, if ``weights`` is given, ``weight`` (B, 1, *output). Use it with
    ``torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=...)``.
    """

    def __init__(self, raw, labels, *, input_size, output_size, slices, batch_size=1, seed=0,
                 start=0, augment=None, weights=None, foreground=None, paths=None,
                 normalize=None):
        if raw.ndim != 3:
            raise EmtileError(f"raw has shape {tuple(raw.shape)}; expected a (Z, Y, X) stack")
        if tuple(raw.shape) != tuple(labels.shape):
            raise EmtileError(
                f"raw has shape {tuple(raw.shape)} but labels have shape {tuple(labels.shape)}; "
                "they must match"
            )
        self.raw, self.labels = raw, labels
        self.input_size, self.output_size = check_patch_geometry(raw.shape[1:], input_size, output_size)
        self.slices = resolve_slices(slices, raw.shape[0])
        if batch_size < 1:
            raise EmtileError(f"batch_size={batch_size} must be at least 1")
        if foreground is not None and not 0.0 <= foreground <= 1.0:
            raise EmtileError(f"foreground={foreground} must lie in [0, 1] (or be None)")
        self.batch_size, self.seed, self.start = int(batch_size), int(seed), int(start)
        self.augment, self.weights = augment, weights
        self.foreground = foreground
        self.paths = tuple(paths) if paths is not None else (None, None)
        self.normalize = Scaling("dtype") if normalize is None else Scaling(*normalize)
        self._blocks = self._index_foreground() if foreground else None

    def _index_foreground(self):
        """Foreground pixel counts per ``_BLOCK``² block of each training slice (cumulative)."""
        ny, nx = (math.ceil(s / _BLOCK) for s in self.labels.shape[1:])
        counts = np.zeros((len(self.slices), ny, nx), np.int64)
        band = _BLOCK * max(1, 2**22 // (_BLOCK * self.labels.shape[2]))  # rows read at a time
        for k, z in enumerate(self.slices):
            for y0 in range(0, self.labels.shape[1], band):
                rows = np.asarray(self.labels[z, y0:y0 + band]) != 0
                pad = (-rows.shape[0]) % _BLOCK, (-rows.shape[1]) % _BLOCK
                rows = np.pad(rows, ((0, pad[0]), (0, pad[1])))
                by = rows.reshape(rows.shape[0] // _BLOCK, _BLOCK, -1, _BLOCK).sum(axis=(1, 3))
                counts[k, y0 // _BLOCK: y0 // _BLOCK + by.shape[0]] = by
        cumulative = np.cumsum(counts.ravel())
        if cumulative[-1] == 0:
            raise EmtileError("foreground balance asked for, but the training slices hold no "
                              "foreground (label 1) pixel")
        return cumulative

    def _draw_origin(self, rng):
        z = self.slices[int(rng.integers(len(self.slices)))]
        origin = tuple(int(rng.integers(s - o + 1)) for s, o in zip(self.raw.shape[1:], self.output_size))
        return z, origin

    def locate(self, rng):
        """Draw a slice and the output patch origin ``(z, (y, x))`` with the foreground balance."""
        if self._blocks is None or rng.random() >= self.foreground:
            return self._draw_origin(rng)
        # a uniformly drawn foreground pixel: its block (by count), then the pixel in the block
        flat = int(np.searchsorted(self._blocks, rng.integers(self._blocks[-1]), side="right"))
        k, by, bx = np.unravel_index(flat, (len(self.slices),
                                            *(math.ceil(s / _BLOCK) for s in self.labels.shape[1:])))
        z = self.slices[int(k)]
        block = np.asarray(self.labels[z, by * _BLOCK:(by + 1) * _BLOCK, bx * _BLOCK:(bx + 1) * _BLOCK])
        ys, xs = np.nonzero(block)
        j = int(rng.integers(len(ys)))
        pixel = (by * _BLOCK + int(ys[j]), bx * _BLOCK + int(xs[j]))
        origin = tuple(int(np.clip(p - rng.integers(o), 0, s - o))
                       for p, o, s in zip(pixel, self.output_size, self.labels.shape[1:]))
        return z, origin

    def sample(self, index):
        """Sample ``index``: ``(image, label, weight)`` NumPy arrays (``weight`` may be None)."""
        rng = np.random.default_rng([self.seed, int(index)])
        z, origin = self.locate(rng)
        margin = int(getattr(self.augment, "margin", 0)) if self.augment is not None else 0
        box = [(o - (i - n) // 2 - margin, o - (i - n) // 2 + i + margin)
               for o, i, n in zip(origin, self.input_size, self.output_size)]
        image = normalize_pixels(read_mirrored(self.raw, z, box), self.normalize)
        label = read_mirrored(self.labels, z, box)
        if self.augment is not None:
            image, label = self.augment(image, label, rng, image_shape=self.input_size,
                                        label_shape=self.output_size)
        else:
            image, label = center_crop(image, self.input_size), center_crop(label, self.output_size)
        label = (np.asarray(label) != 0).view(np.uint8)  # 0/1 and 0/255 labels alike
        weight = self.weights(label) if self.weights is not None else None
        return np.ascontiguousarray(image, dtype=np.float32), label, weight

    def batch(self, b):
        """Batch ``b`` as a dict of stacked float32 tensors."""

        samples = [self.sample(b * self.batch_size + j) for j in range(self.batch_size)]
        out = {
            "image": torch.from_numpy(np.stack([s[0] for s in samples])[:, None]),
            "label": torch.from_numpy(np.stack([s[1] for s in samples])[:, None].astype(np.float32)),
        }
        if self.weights is not None:
            out["weight"] = torch.from_numpy(np.stack([s[2] for s in samples])[:, None].astype(np.float32))
        return out

    def __iter__(self):

        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None and any(self.paths):
            from emtile.volume import open_volume

            raw_path, labels_path = self.paths
            self.raw = open_volume(raw_path) if raw_path is not None else self.raw
            self.labels = open_volume(labels_path) if labels_path is not None else self.labels
        b = self.start + worker
        while True:
            yield self.batch(b)
            b += workers
