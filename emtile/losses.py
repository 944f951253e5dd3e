"""Training losses: the U-Net paper's border-weighted cross-entropy, soft Dice, and their sum;
for affinities, masked losses with MALA's class balancing or torch-em's Dice.

The weight map is computed in NumPy/SciPy, once per label patch, in the DataLoader workers
(:func:`weight_map`); the losses themselves are torch functions of the logits, the binary target
and that map (:func:`get_loss`).

The paper (Ronneberger et al. 2015, eq. 2) weights each pixel by

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

where ``w_c`` balances the class frequencies and ``d1``, ``d2`` are the distances to the nearest
and second-nearest cell, so that the thin membranes separating touching cells weigh most.
Cells are the 4-connected components of the label ``1`` pixels; the border term is applied to the
background (label ``0``, membrane) pixels, the ones the term is about.

Affinity outputs (several channels, one per offset, 1 = same object) have a mask instead of a
weight map: :func:`affinity_loss` leaves out the pairs that :func:`emtile.affinities.affinities`
masks, and balances the classes itself (see :mod:`emtile.affinities` for the choice of loss).
"""

import numpy as np

from emtile._errors import EmtileError

LOSSES = ("bce", "dice", "bce+dice")


def balanced_class_weights(foreground_fraction, *, power=1.0, max_weight=10.0):
    """Class weights ``(w_background, w_foreground)`` that equalise the two classes' total weight.

    Parameters
    ----------
    foreground_fraction : float
        Fraction of pixels labelled ``1``.
    power : float
        Exponent applied to both weights: 1 balances fully (the paper), 0 gives ``(1, 1)``, values
        in between balance partially (less bias of the probabilities towards the rare class).
    max_weight : float
        Upper bound for either weight (a class that is almost absent would otherwise dominate).

    Returns
    -------
    tuple of float
        ``(0.5 / (1 - f), 0.5 / f) ** power`` clipped to ``max_weight``; with ``power=1`` the
        pixel mean of ``w_c`` is 1.

    Examples
    --------
    >>> balanced_class_weights(0.75)
    (2.0, 0.6666666666666666)
    """
    f = float(foreground_fraction)
    if not 0.0 <= f <= 1.0:
        raise EmtileError(f"foreground_fraction={f} must lie in [0, 1]")
    w_bg = 0.5 / (1.0 - f) if f < 1.0 else max_weight
    w_fg = 0.5 / f if f > 0.0 else max_weight
    return min(w_bg, max_weight) ** power, min(w_fg, max_weight) ** power


def border_weights(labels, *, w0=10.0, sigma=5.0, tol=1e-6):
    """The border term ``w0 * exp(-(d1 + d2)**2 / (2 sigma**2))`` on background pixels.

    Parameters
    ----------
    labels : ndarray, shape (Y, X) (or any number of dimensions)
        Binary labels, ``1`` = cell interior, ``0`` = membrane/background.
    w0, sigma : float
        The paper's amplitude (10) and width (5 px).
    tol : float
        Distances are computed exactly only where the term exceeds ``tol``; elsewhere it is 0.
        (Each cell's distance transform is evaluated in its bounding box grown by the distance
        ``r`` at which ``w0 * exp(-r**2 / (2 sigma**2)) = tol``, which keeps this cheap.)

    Returns
    -------
    ndarray of float32, same shape as ``labels``; 0 on cell pixels and where fewer than two cells
    lie within reach.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.float32)
    if w0 == 0:
        return out
    cells, n = ndimage.label(labels == 1)  # default structure: 4-connectivity in 2-D
    if n < 2:
        return out
    reach = int(np.ceil(sigma * np.sqrt(2.0 * np.log(max(w0 / tol, 1.0 + 1e-9))))) + 1
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    for index, box in enumerate(ndimage.find_objects(cells), start=1):
        box = tuple(slice(max(s.start - reach, 0), min(s.stop + reach, size))
                    for s, size in zip(box, labels.shape))
        dist = ndimage.distance_transform_edt(cells[box] != index)
        near, second = d1[box], d2[box]  # views: updated in place
        np.minimum(second, np.maximum(near, dist), out=second)
        np.minimum(near, dist, out=near)
    term = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    out[...] = np.where(labels == 0, term, 0.0)
    return out


def weight_map(labels, *, w0=10.0, sigma=5.0, class_weights=None):
    """The paper's pixel weights ``w_c(x) + w0 * exp(-(d1 + d2)**2 / (2 sigma**2))``.

    Parameters
    ----------
    labels : ndarray, shape (Y, X)
        Binary labels (``1`` = cell, ``0`` = membrane).
    w0, sigma : float
        Border term amplitude and width in pixels; ``w0=0`` leaves only the class weights.
    class_weights : tuple of float, optional
        ``(w_background, w_foreground)``. Default: balanced on this patch's own frequencies
        (:func:`balanced_class_weights`). Pass ``(1, 1)`` for no class balancing.

    Returns
    -------
    ndarray of float32, same shape as ``labels``

    Examples
    --------
    Two cells three pixels apart; the membrane pixel next to the left cell has
    ``d1 = 1`` and ``d2 = 3``:

    >>> w = weight_map(np.array([[1, 1, 0, 0, 0, 1, 1]]), class_weights=(1.0, 1.0))
    >>> print(f"{w[0, 2]:.4f} {1 + 10 * np.exp(-16 / 50):.4f}")
    8.2615 8.2615
    """
    labels = np.asarray(labels)
    if class_weights is None:
        class_weights = balanced_class_weights(float(np.mean(labels == 1)))
    w_bg, w_fg = (float(w) for w in class_weights)
    w = np.where(labels == 1, np.float32(w_fg), np.float32(w_bg)).astype(np.float32)
    if w0:
        w += border_weights(labels, w0=w0, sigma=sigma)
    return w


# --- torch losses --------------------------------------------------------------------------------


def _bce(logits, target, weight):
    import torch.nn.functional as F

    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is None:
        return per_pixel.mean()
    return (weight * per_pixel).sum() / weight.sum().clamp_min(1e-12)


def _dice(logits, target, weight=None, eps=1.0):
    # soft Dice averaged over both classes, so it does not matter which one is "foreground"
    p = logits.float().sigmoid()
    t = target.float()
    dims = tuple(range(1, p.ndim))
    dice_fg = (2 * (p * t).sum(dims) + eps) / (p.sum(dims) + t.sum(dims) + eps)
    dice_bg = (2 * ((1 - p) * (1 - t)).sum(dims) + eps) / ((1 - p).sum(dims) + (1 - t).sum(dims) + eps)
    return 1.0 - 0.5 * (dice_fg + dice_bg).mean()


def _bce_dice(logits, target, weight):
    return _bce(logits, target, weight) + _dice(logits, target)


def get_loss(name):
    """The loss ``fn(logits, target, weight) -> scalar tensor`` called ``name``.

    ``"bce"``: binary cross-entropy weighted by ``weight`` (the :func:`weight_map`) and
    normalised by the weights' sum, so its scale does not depend on ``w0``; ``"dice"``: soft Dice
    averaged over both classes (ignores ``weight``); ``"bce+dice"``: their sum.
    """
    table = {"bce": _bce, "dice": _dice, "bce+dice": _bce_dice}
    if name not in table:
        raise EmtileError(f"loss={name!r} is not supported: choose one of {', '.join(LOSSES)}")
    return table[name]


def uses_weights(name):
    """Whether the loss ``name`` reads the weight map (so the workers must compute it)."""
    return name in ("bce", "bce+dice")


# --- affinities ----------------------------------------------------------------------------------

#: The losses of multi-channel affinity outputs (:func:`affinity_loss`); the first is the default.
#: Not in :data:`LOSSES`: those take a weight map, these a mask.
AFFINITY_LOSSES = ("balanced_bce", "dice")


def affinity_loss(logits, target, mask, *, kind="balanced_bce", per_channel=False):
    """The loss of affinity logits over the masked-in pairs only.

    Parameters
    ----------
    logits : torch.Tensor, shape (N, K, Z, Y, X) or (N, K, Y, X)
        The network's output, one channel per offset (emtile's convention: 1 = same object).
    target, mask : torch.Tensor, same shape
        From :func:`emtile.affinities.affinities`; pairs where ``mask`` is 0 (leaving the volume,
        touching an unlabelled voxel) change neither the loss nor any gradient, whatever their
        logits or targets.
    kind : {"balanced_bce", "dice"}
        ``"balanced_bce"`` (the default; the field's, MALA's): binary cross-entropy with logits,
        each pair weighted by MALA's class balancing of its sample (the weights of
        :func:`emtile.affinities.class_weights`, computed here per sample, without gradient),
        summed and divided by the number of masked-in pairs. ``"dice"``: torch-em's affinity
        loss, 1 - soft Dice of the boundary class: ``q = 1 - sigmoid(logits)`` against
        ``1 - target`` (torch-em's targets are ``1 - affinity``), per channel over the batch and
        space, ``(2 sum(q t) + 1) / (sum(q^2) + sum(t^2) + 1)`` (torch-em's squared
        denominators; the 1 instead of its clamp makes a channel without boundaries score 1
        when predicted right), averaged over the channels (torch-em sums ``1 - score`` over
        them: the same direction, a scale that here does not grow with the number of
        offsets). One short comparison on FIB-25 is in :mod:`emtile.affinities`.
    per_channel : bool
        ``"balanced_bce"`` only: balance each channel on its own (default: pool the channels,
        as MALA does).

    Returns
    -------
    torch.Tensor, a scalar (0 where no pair is masked in)
    """
    import torch

    if kind not in AFFINITY_LOSSES:
        raise EmtileError(f"kind={kind!r} is not supported: choose one of "
                          f"{', '.join(AFFINITY_LOSSES)}")
    if logits.ndim < 3:
        raise EmtileError(f"logits of shape {tuple(logits.shape)} must be (N, K, *spatial)")
    for name, value in (("target", target), ("mask", mask)):
        if tuple(value.shape) != tuple(logits.shape):
            raise EmtileError(f"{name} of shape {tuple(value.shape)} must have the logits' shape, "
                              f"{tuple(logits.shape)}")
    mask = (mask != 0).to(logits.device)
    target = target.to(device=logits.device, dtype=torch.float32)
    if kind == "dice":
        return _affinity_dice(logits, target, mask)
    return _balanced_bce(logits, target, mask, per_channel)


def balance_weights(target, mask, *, per_channel=False):
    """MALA's balancing weights of a batch, per sample: :func:`emtile.affinities.class_weights`
    of each sample in torch (``target``, ``mask``: (N, K, *spatial); ``mask`` bool)."""
    import torch

    from emtile.affinities import CLIP

    dims = tuple(range(2 if per_channel else 1, target.ndim))
    positive = (target >= 0.5) & mask
    count = mask.sum(dims, keepdim=True).clamp_min(1)
    frac = (positive.sum(dims, keepdim=True) / count).clamp(*CLIP)
    zero = torch.zeros((), dtype=frac.dtype, device=frac.device)
    return torch.where(positive, 0.5 / frac, torch.where(mask, 0.5 / (1.0 - frac), zero))


def _balanced_bce(logits, target, mask, per_channel):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        weight = balance_weights(target, mask, per_channel=per_channel)
    per_pair = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    zero = torch.zeros((), dtype=per_pair.dtype, device=per_pair.device)
    return torch.where(mask, weight * per_pair, zero).sum() / mask.sum().clamp_min(1)


def _affinity_dice(logits, target, mask, eps=1.0):
    import torch

    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    q = torch.where(mask, (-logits.float()).sigmoid(), zero)  # 1 - p: the boundary class
    t = torch.where(mask, 1.0 - target, zero)
    dims = (0,) + tuple(range(2, q.ndim))
    score = (2 * (q * t).sum(dims) + eps) / ((q * q).sum(dims) + (t * t).sum(dims) + eps)
    return 1.0 - score.mean()
