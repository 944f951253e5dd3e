"""Random 3-D training patches with affinity or boundary targets, as worker-safe PyTorch datasets.

A sample is a raw input window of the model's input size (Z, Y, X) and the affinities and mask
of its output window, the centre of the input's receptive field. The output window lies inside
the training z range; raw context is read across it (as prediction reads it) and mirrored at the
volume's border, but ids are read only inside the training range: voxels outside it, or outside
the volume, count as unlabelled, so the pairs touching them are masked. Ids are read with the
offsets' reach (:func:`emtile.affinities.offset_context`) around the output window, so the
affinities at its border are those of the whole (training part of the) volume.

:class:`BoundaryPatchDataset` is the same stream for a 3-D network with one output channel
(``target="boundaries"``): binary labels (1 = cell interior) are read as codes 1 (membrane) and
2 (interior), so that 0 keeps meaning "unlabelled" through the crops and the augmentation (outside
the training range, a wrapped band of a shifted section); the target is ``code == 2`` and the
mask ``code != 0``.

Seeding is as :mod:`emtile.sampling`'s: sample ``i`` draws with
``numpy.random.default_rng([seed, i])``, batch ``b`` holds samples ``b * batch_size ...``, and
worker ``w`` of ``W`` builds batches ``start + w, start + w + W, ...``: the stream is a pure
function of the seed and the batch index, so a resumed run only needs ``start``.
"""

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from emtile._errors import EmtileError
from emtile.affinities import affinities, check_offsets, offset_context
from emtile.geometry import center_crop, read_window
from emtile.normalize import Scaling, apply as normalize_pixels

__all__ = ["AffinityPatchDataset", "BoundaryPatchDataset", "read_ids"]


def read_ids(ids, start, stop, z_range, *, codes=False):
    """``ids[start:stop]`` (per axis) with every voxel outside the volume or outside
    ``z_range = (z0, z1)`` set to 0 (unlabelled). ``codes``: binary labels read as 1 (0,
    membrane) and 2 (non-zero, interior), uint8."""
    shape = ids.shape
    lo = [max(a, 0) for a, n in zip(start, shape)]
    hi = [min(b, n) for b, n in zip(stop, shape)]
    lo[0], hi[0] = max(lo[0], z_range[0]), min(hi[0], z_range[1])
    dtype = np.uint8 if codes else np.asarray(ids[:1, :1, :1]).dtype
    out = np.zeros(tuple(b - a for a, b in zip(start, stop)), dtype)
    if all(b > a for a, b in zip(lo, hi)):
        inner = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        crop = np.asarray(ids[tuple(slice(a, b) for a, b in zip(lo, hi))])
        out[inner] = (crop != 0) + np.uint8(1) if codes else crop
    return out


class AffinityPatchDataset(IterableDataset):
    """An endless stream of random 3-D batches: raw and its affinity targets with their mask.

    Parameters
    ----------
    raw, ids : array-like, shape (Z, Y, X)
        The image volume and object ids (0 = unlabelled); lazy, only crops are read.
    input_size, output_size : tuple of 3 int
        The model's input window and its output window.
    z_range : (int, int)
        The training sections ``z0:z1``: output windows lie inside, ids outside are unlabelled.
    offsets : sequence of (dz, dy, dx)
        One affinity channel each (:func:`emtile.affinities.affinities`).
    batch_size, seed, start : int
        As :class:`emtile.sampling.PatchDataset`.
    augment : callable, optional
        ``augment(raw, ids, rng) -> (raw, ids)`` with a per-axis ``margin``
        (:class:`emtile.augment3d.Augmenter3D`).
    paths : (str or None, str or None), optional
        Re-opened in each DataLoader worker (see :class:`emtile.sampling.PatchDataset`).
    normalize : emtile.normalize.Scaling, optional
        The model's input rule (default: the ``dtype`` rule).

    Batches are dicts of float32 tensors ``image`` (B, 1, *input), ``label`` (B, K, *output:
    the affinities) and ``weight`` (B, K, *output: the mask, 0 = out of the loss), the keys
    :func:`emtile.training.loop.fit` passes to ``loss_fn(logits, label, weight)``.
    """

    def __init__(self, raw, ids, *, input_size, output_size, z_range, offsets, batch_size=1,
                 seed=0, start=0, augment=None, paths=None, normalize=None):
        if tuple(raw.shape) != tuple(ids.shape) or len(raw.shape) != 3:
            raise EmtileError(f"raw {tuple(raw.shape)} and ids {tuple(ids.shape)} must be (Z, Y, "
                              "X) volumes of one shape")
        self.raw, self.ids = raw, ids
        self.input_size = tuple(int(v) for v in input_size)
        self.output_size = tuple(int(v) for v in output_size)
        self.z_range = (int(z_range[0]), int(z_range[1]))
        span = (self.z_range[1] - self.z_range[0],) + tuple(raw.shape[1:])
        if any(o > n for o, n in zip(self.output_size, span)):
            raise EmtileError(f"the training region {span} (Z, Y, X) is smaller than the tile's "
                              f"output {self.output_size} (input {self.input_size}): choose a "
                              "smaller tile or a longer train_slices range")
        self.offsets = check_offsets(offsets, ndim=3) if offsets else ()
        # labels read around the output window: the offsets' reach (none for boundaries)
        self.context = (tuple(max(c) for c in offset_context(self.offsets)) if self.offsets
                        else (0, 0, 0))
        self.batch_size, self.seed, self.start = int(batch_size), int(seed), int(start)
        self.augment = augment
        self.paths = tuple(paths) if paths is not None else (None, None)
        self.normalize = Scaling("dtype") if normalize is None else Scaling(*normalize)

    def draw_origin(self, rng):
        """The output window's origin (z, y, x), inside the training range."""
        lo = (self.z_range[0], 0, 0)
        hi = (self.z_range[1], *self.raw.shape[1:])
        return tuple(int(a + rng.integers(b - a - o + 1))
                     for a, b, o in zip(lo, hi, self.output_size))

    def crops(self, origin, margin=(0, 0, 0)):
        """The raw and id crops around the output window at ``origin``: both centred on it, each
        axis ``output + 2 * max(halo, context) + 2 * margin`` long."""
        pad = [max((i - o) // 2, c) + m for i, o, c, m in
               zip(self.input_size, self.output_size, self.context, margin)]
        start = tuple(a - p for a, p in zip(origin, pad))
        stop = tuple(a + o + p for a, o, p in zip(origin, self.output_size, pad))
        raw = normalize_pixels(read_window(self.raw, start, stop), self.normalize)
        return raw, read_ids(self.ids, start, stop, self.z_range, codes=self.codes)

    codes = False  # read ids as they are

    def sample(self, index):
        """Sample ``index``: ``(image, aff, mask)`` float32 arrays."""
        rng = np.random.default_rng([self.seed, int(index)])
        origin = self.draw_origin(rng)
        margin = tuple(getattr(self.augment, "margin", (0, 0, 0))) if self.augment else (0, 0, 0)
        raw, ids = self.crops(origin, margin)
        if self.augment is not None:
            raw, ids = self.augment(raw, ids, rng)
        image = center_crop(raw, self.input_size)
        target, mask = self.targets(ids)
        return (np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(target),
                np.ascontiguousarray(mask))

    def targets(self, ids):
        """The output window's ``(aff, mask)``, float32 (K, *output), from the id crop."""
        wide = tuple(o + 2 * c for o, c in zip(self.output_size, self.context))
        aff, mask = affinities(center_crop(ids, wide), self.offsets)
        inner = (slice(None),) + tuple(slice(c, c + o) for c, o in zip(self.context, self.output_size))
        return aff[inner], mask[inner]

    def batch(self, b):
        """Batch ``b`` as a dict of stacked float32 tensors."""
        samples = [self.sample(b * self.batch_size + j) for j in range(self.batch_size)]
        return {"image": torch.from_numpy(np.stack([s[0] for s in samples])[:, None]),
                "label": torch.from_numpy(np.stack([s[1] for s in samples])),
                "weight": torch.from_numpy(np.stack([s[2] for s in samples]))}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None and any(self.paths):
            from emtile.volume import open_volume

            raw_path, ids_path = self.paths
            self.raw = open_volume(raw_path) if raw_path is not None else self.raw
            self.ids = open_volume(ids_path) if ids_path is not None else self.ids
        b = self.start + worker
        while True:
            yield self.batch(b)
            b += workers


class BoundaryPatchDataset(AffinityPatchDataset):
    """:class:`AffinityPatchDataset`'s stream with one target channel: the cell interior.

    ``labels`` are binary (non-zero = interior; :class:`emtile.training.targets.IdBoundaries`
    makes them from ids). Batches: ``label`` (B, 1, *output) 1 = interior, ``weight`` (B, 1,
    *output) 0 where the output window leaves the training range (or a shifted section's
    wrapped band), 1 elsewhere. Parameters as :class:`AffinityPatchDataset`, without offsets.
    """

    codes = True

    def __init__(self, raw, labels, **kwargs):
        super().__init__(raw, labels, offsets=(), **kwargs)

    def targets(self, codes):
        codes = center_crop(codes, self.output_size)[None]
        return (codes == 2).astype(np.float32), (codes != 0).astype(np.float32)
