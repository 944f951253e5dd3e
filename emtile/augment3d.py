"""Augmentation of 3-D training patches (raw and object ids together), run in the workers.

Every transform moves the raw crop and its id crop alike, so the affinities computed from the
transformed ids are those of the transformed raw:

- **flips** along every axis (each with probability 1/2);
- **transposes** only among axes of the same voxel size and the same patch length (a random
  permutation of such a group; :func:`transpose` refuses axes of different voxel sizes);
- **elastic, in-plane**: one smooth displacement field over (Y, X) (the 2-D augmenter's
  :func:`emtile.augment.displacement_field`), applied to every section, raw by linear
  interpolation, ids by nearest neighbour (they stay ids);
- **intensity per section**: contrast and brightness drawn for each z section (raw only);
- for **anisotropic** data only (z coarser than 1.5 times the in-plane size): **missing
  sections** (raw zeroed, ids kept: the network learns to bridge them) and **shifted
  sections** (raw and ids of every section from a random one on shifted in-plane by a few
  voxels, as a misalignment).

Every function takes a ``numpy.random.Generator``: a patch's augmentation is a pure function of
its seed (see :mod:`emtile.sampling3d`).
"""

from dataclasses import dataclass
import math

import numpy as np
from scipy import ndimage

from emtile._errors import EmtileError

__all__ = ["Augmenter3D", "transpose", "transpose_groups", "is_anisotropic"]


def is_anisotropic(voxel_size):
    """Whether ``voxel_size`` (z, y, x) is serial sections: z over 1.5 times the in-plane size."""
    z, y, x = (float(v) for v in voxel_size)
    return z > 1.5 * max(y, x)


def transpose_groups(voxel_size, shape):
    """Groups of axes that may be permuted: the same voxel size and the same length in ``shape``.

    >>> transpose_groups((10, 10, 10), (20, 40, 40))
    [(1, 2)]
    >>> transpose_groups((40, 4, 4), (8, 64, 64))
    [(1, 2)]
    """
    groups = {}
    for axis, (v, n) in enumerate(zip(voxel_size, shape)):
        groups.setdefault((float(v), int(n)), []).append(axis)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def transpose(arrays, axes, voxel_size):
    """``arrays`` (each (Z, Y, X)) with their spatial axes permuted to ``axes``; permuting axes of
    different voxel sizes is refused (it would train on a geometry the data never has)."""
    axes = tuple(int(a) for a in axes)
    if sorted(axes) != [0, 1, 2]:
        raise EmtileError(f"axes={axes!r} must be a permutation of (0, 1, 2)")
    for a, b in enumerate(axes):
        if float(voxel_size[a]) != float(voxel_size[b]):
            raise EmtileError(f"axes={axes!r} swaps axis {a} ({voxel_size[a]} nm) with axis {b} "
                              f"({voxel_size[b]} nm): transposes are allowed only among axes of "
                              "the same voxel size")
    return [np.transpose(a, axes) for a in arrays]


@dataclass(frozen=True)
class Augmenter3D:
    """Augments a raw crop and its id crop of the same (Z, Y, X) shape.

    Parameters
    ----------
    voxel_size : tuple of float
        (z, y, x) in nm: which axes may be transposed, and whether the data is anisotropic.
    flip, transpose, elastic, intensity : bool
    elastic_sigma : float
        Standard deviation of the coarse in-plane displacements, in voxels (clipped at twice
        it; :attr:`margin` is the context this needs).
    missing, shift : float
        Per-section probabilities of a missing (zeroed) section and of a shift starting at a
        section (anisotropic data only).
    max_shift : int
        Largest in-plane shift in voxels.
    """

    voxel_size: tuple = (1.0, 1.0, 1.0)
    flip: bool = True
    transpose: bool = True
    elastic: bool = True
    elastic_sigma: float = 4.0
    intensity: bool = True
    missing: float = 0.05
    shift: float = 0.05
    max_shift: int = 4

    @property
    def margin(self):
        """Extra voxels per side, per axis (z, y, x), that a crop needs for the elastic warp."""
        m = int(math.ceil(2.0 * self.elastic_sigma)) if self.elastic else 0
        return (0, m, m)

    def __call__(self, raw, ids, rng):
        """``(raw, ids)`` augmented, same shape (crop the margin afterwards)."""
        raw, ids = np.asarray(raw, np.float32), np.asarray(ids)
        if raw.shape != ids.shape:
            raise EmtileError(f"raw crop {raw.shape} and id crop {ids.shape} must have one shape")
        if self.elastic:
            raw, ids = _elastic(raw, ids, rng, self.elastic_sigma)
        if is_anisotropic(self.voxel_size):
            raw, ids = _sections(raw, ids, rng, self.missing, self.shift, self.max_shift)
        if self.flip:
            flips = tuple(a for a in range(3) if rng.random() < 0.5)
            raw, ids = np.flip(raw, flips), np.flip(ids, flips)
        if self.transpose:
            axes = list(range(3))
            for group in transpose_groups(self.voxel_size, raw.shape):
                for a, b in zip(group, rng.permutation(group)):
                    axes[a] = int(b)
            raw, ids = transpose([raw, ids], axes, self.voxel_size)
        if self.intensity:
            contrast = rng.uniform(0.9, 1.1, raw.shape[0]).astype(np.float32)
            bright = rng.uniform(-0.1, 0.1, raw.shape[0]).astype(np.float32)
            raw = raw * contrast[:, None, None] + bright[:, None, None]
        return np.ascontiguousarray(raw), np.ascontiguousarray(ids)


def _elastic(raw, ids, rng, sigma):
    """One in-plane displacement field applied to every section."""
    from emtile.augment import displacement_field

    field = displacement_field(raw.shape[1:], rng, sigma=sigma, clip=2.0)
    yy, xx = np.meshgrid(np.arange(raw.shape[1]), np.arange(raw.shape[2]), indexing="ij")
    coords = np.stack([yy + field[0], xx + field[1]])
    out_raw, out_ids = np.empty_like(raw), np.empty_like(ids)
    for z in range(raw.shape[0]):
        out_raw[z] = ndimage.map_coordinates(raw[z], coords, order=1, mode="mirror")
        out_ids[z] = ndimage.map_coordinates(ids[z], coords, order=0, mode="mirror")
    return out_raw, out_ids


def _sections(raw, ids, rng, missing, shift, max_shift):
    """Missing sections (raw zeroed) and shifted sections (raw and ids from a section on)."""
    raw, ids = raw.copy(), ids.copy()
    for z in range(raw.shape[0]):
        if rng.random() < shift and max_shift > 0:
            dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
            raw[z:] = np.roll(raw[z:], (dy, dx), axis=(1, 2))
            ids[z:] = np.roll(ids[z:], (dy, dx), axis=(1, 2))
            _unlabel_wrapped(ids[z:], dy, dx)
        if rng.random() < missing:
            raw[z] = 0.0
    return raw, ids


def _unlabel_wrapped(ids, dy, dx):
    """The band that ``np.roll`` wrapped around becomes unlabelled (its pairs leave the loss)."""
    for axis, step in ((1, dy), (2, dx)):
        band = [slice(None)] * 3
        band[axis] = slice(0, step) if step > 0 else slice(ids.shape[axis] + step, None)
        if step:
            ids[tuple(band)] = 0
