"""Boundary maps to labelled cells, block by block, with the same labels whatever the blocks.

``emtile segment`` turns a probability map of cell interior (``p``; the boundary map is ``1 - p``)
into a label image: every cell (neurite profile) its own id, 0 for background.

Methods
-------
``cc``
    The interior ``p >= threshold`` is split into connected components (4-connected per slice in
    ``mode="2d"``, 6-connected in ``"3d"``); the boundary pixels are then given to the cells by
    the bounded flood below (a seeded watershed on ``1 - p``); ``keep_boundaries`` leaves them 0.
``ws``
    Seeds are the maxima of the interior's distance to the boundary (capped, so a wide cell's
    core is one plateau); the flood carries them over the interior (pixels no seed reaches keep
    their interior component as a fragment), then over the boundary. Neighbouring fragments
    are merged while the mean boundary probability on their shared face is at most
    ``merge_threshold``, lowest first, faces re-measured after each merge, on one region graph
    of the whole volume.

Both then let objects smaller than ``min_size`` join the neighbour they share the largest face
with (or drop them when they have none), and number the objects 1..N in the order of their
first pixel.

Why the labels do not depend on the blocks
------------------------------------------
The result is defined on the whole volume; each block computes the part of it in its write
region exactly, from a read region whose halo follows from the operators' own parameters:

1. *Thresholding* is pixelwise.
2. *Connected components* are computed per block on the write region only; two block-local
   components are the same object exactly when a chain of neighbouring interior pixels joins
   them, and every such chain crosses block faces only between face-neighbouring pixels. The
   pairs of labels that touch across every face are joined by a union-find over the whole
   volume (:func:`emtile.segmenter.graph.join_faces`), which is exact.
3. *Seeds* (ws): ``min(EDT, cap)`` at a pixel is decided by the pixels within ``cap`` (if the
   nearest boundary pixel is further, the value is ``cap`` either way), and a maximum over a box
   of ``radius`` needs ``radius`` more, so a halo of ``cap + radius`` gives the same seed
   pixels; seeds are then joined across faces like components.
4. *The flood* (:func:`emtile.segmenter.kernels.flood`) is ``rounds`` synchronous rounds in which
   each pixel looks only at its direct neighbours' previous keys; ties are broken by path
   length and then by the seed pixel's *global* index, never by a block-local number. After
   ``k`` rounds a pixel's key is a function of the pixels within ``k`` steps, so a halo of
   ``rounds + 1`` (the ``+ 1``: the plane past each upper face, whose fragments give the edges
   across that face) reproduces it bit for bit. An unbounded seeded watershed would not be
   local: a label can travel along a low valley of the boundary map arbitrarily far. Bounding it
   (``grow``) is what makes it exact; boundary pixels further than ``grow`` steps from every
   cell stay 0.
5. *The region graph* is summed from per-block records with integers only (altitude sums of
   uint8 levels and pixel counts, sizes, first pixels), so it is the same graph whatever the
   cut; agglomeration and small-object absorption run on it once, breaking ties by first pixel
   (:mod:`emtile.segmenter.graph`). The numbering by first pixel makes the output identical,
   not only equal up to renaming.

Floats: probabilities stored as floats are turned into uint8 altitudes (nearest 1/255) before
anything is compared, so no sum depends on the order of additions.
"""

from emtile.segmenter.driver import DEFAULTS, METHODS, MODES, SegmentResult, segment

__all__ = ["segment", "SegmentResult", "METHODS", "MODES", "DEFAULTS"]
