"""Boundary maps to labelled cells, block by block, with the same labels whatever the blocks.

``emtile segment`` turns a probability map of cell interior (``p``; the boundary map is ``1 - p``)
into a label image: every cell (neurite profile) its own id, 0 for background.

Methods
-------
``cc``
    The interior ``p > threshold`` is split into connected components (4-connected per slice in
    ``mode="2d"``, 6-connected in ``"3d"``); the boundary pixels are then given to the cells by
    the bounded flood below (a seeded watershed on ``1 - p``); ``keep_boundaries`` leaves them 0.
``ws``
    Seeds (``seeds``) are flooded into fragments, which are then merged across their faces, on
    one region graph of the whole volume: neighbouring fragments are merged while the boundary
    probability on their shared face is at most ``merge_threshold``, lowest first, faces
    re-measured after each merge. A face is measured by the ``merge_quantile`` of its pixels'
    boundary probabilities (quantile linkage; the median by default), or by their mean
    (``merge_quantile=None``). ``seeds="components"`` (default): the seeds are the interior's
    connected components, as in cc, so the fragments are cc's objects and the merging joins a
    cell that the threshold split. ``seeds="distance"``: the maxima of the interior's distance
    to the boundary (capped, so a wide cell's core is one plateau), flooded over the interior
    first (pixels no seed reaches keep their interior component as a fragment), then over the
    boundary.

Both then let objects with fewer than ``min_size`` interior pixels join the neighbour they share
the largest face with (or drop them when they have none), and number the objects 1..N in the
order of their first pixel.

The faces that measure a boundary: a pair of neighbouring pixels of two fragments counts as
evidence when both are interior, or both are boundary pixels whose labels came from opposite
sides (the vectors to their seeds point away from each other); boundary pixels that two
fragments of one cell split side by side only count as contact. So two cells joined through a
gap stay apart (their long shared membrane is evidence), while one cell's fragments merge.

Affinities
----------
A ``(C, Z, Y, X)`` affinity map (an emtile affinity store, recognised by its attributes, or a
foreign array with ``offsets``) goes through the same passes in 3d mode
(:mod:`emtile.segmenter.affinity` says how): the seeds are the connected components of the
nearest-neighbour pairs linked by an affinity above ``threshold``, the bounded flood climbs the
mean affinity of each voxel's six pairs (``seeds="distance"``: the seeds are the maxima of the
distance to the voxels with an unlinked pair, and each flood step costs the affinity of the pair
it crosses), and a face is scored by the affinities of the voxel
pairs that cross it (``1 - affinity``: its ``merge_quantile``, from a histogram over the whole
range, or its mean) up to ``merge_threshold``. The output keeps the fragments and the region
graph (:mod:`emtile.segmenter.fragment_graph`), from which ``recut`` relabels at another
threshold (:mod:`emtile.segmenter.recut`). The defaults are the probability map's: any
``threshold`` and ``merge_threshold`` below 1 give perfect affinities' pieces back exactly
(links never cross objects, faces between objects score 1), so they are left to be tuned on
predicted affinities (FIB-25).

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
3. *Seeds* (ws, distance): ``min(EDT, cap)`` at a pixel is decided by the pixels within
   ``cap`` (if the nearest boundary pixel is further, the value is ``cap`` either way), and a
   maximum over a box of ``radius`` needs ``radius`` more, so a halo of ``cap + radius`` gives
   the same seed pixels; seeds are then joined across faces like components. (Component seeds
   are the components of 2.)
4. *The flood* (:func:`emtile.segmenter.kernels.flood`, a seeded watershed on topographic
   distance: each step into a pixel costs ``1 + 255 (1 - p)``, so fronts meet on the ridges of the
   boundary map) is ``rounds`` synchronous rounds in which each pixel looks only at its direct
   neighbours' previous keys; ties go to the seed pixel with the smaller *global* index, never to
   a block-local number; costs are integers. After ``k`` rounds a pixel's key is a function of
   the pixels within ``k`` steps. A key is then kept only if a chain of final keys carries it back
   to its seed (so every label is connected to its seed even where the flood stops at its limit);
   that chain is at most ``rounds`` long, so the kept keys are a function of the pixels within
   ``2 * rounds`` steps, and a halo of ``2 * rounds + 1`` (the ``+ 1``: the plane past each
   upper face, whose fragments give the edges across that face) reproduces them bit for bit. (In
   ws with distance seeds the interior flood and the boundary flood run one after the other:
   their rounds add up.)
   An unbounded watershed would not be local: a label can travel along a low valley of the
   boundary map arbitrarily far. Bounding it (``grow``) is what makes it exact; boundary pixels
   further than ``grow`` steps from every cell stay 0.
5. *The region graph* is summed from per-block records with integers only (altitude sums of
   uint8 levels and pixel counts, sizes, first pixels, and for quantile linkage each face's
   histogram: its evidence pixels counted in :data:`~emtile.segmenter.kernels.FACE_BINS` bins of
   altitude up to ``merge_threshold``, higher ones only in the total), so it is the same graph
   whatever the cut. A quantile is read off the summed histogram (the first bin whose
   cumulative count reaches ``merge_quantile`` times the face's pixels), so it is exact too,
   where a quantile of per-block quantiles would not be; the histogram needs no halo (it counts
   the pixel pairs a block owns, like the sums); agglomeration and small-object absorption run
   on it once, breaking ties by first pixel (:mod:`emtile.segmenter.graph`). The numbering by
   first pixel makes the output identical, not only equal up to renaming.

The halos are sufficient, not tight: the seeds' needs one pixel less (distances are compared
with an integer cap), and random searches never found a flood that needed more than
``rounds + 1``; ``2 * rounds + 1`` is what the argument above proves. Nothing in the result is
approximate: the tests compare every block size with the single-block run bit for bit.

Known limits: in ws with distance seeds, interior pixels that no seed reaches within
``interior_rounds`` steps keep their whole interior component as one fragment, which can be in
two pieces when the reached fragments between them are not merged (none on ISBI with 40 rounds;
16 of 3,503 objects with 24 rounds). The global step (one task per row of blocks, in the workers)
holds one row of blocks' graph per task in 2d mode, the whole volume's in 3d mode (about 2.8 kB per fragment at its peak for a 3-D
graph, records included, with mean linkage: :mod:`emtile.segmenter.graph` says how it was
measured; quantile linkage adds 8 histogram counts, 64 B, per face and block to the records and
the graph), and agglomerates a row in one thread (compiled, :mod:`emtile.segmenter.agglomerate`:
seconds for 350,000 fragments).

Defaults (:class:`emtile.settings.SegmentSettings`): ws, component seeds, levels adapted to the map
(``calibrate``, below), threshold 0.88, median linkage (``merge_quantile`` 0.5) at
``merge_threshold`` 0.2, ``grow`` 32. Before issue 22 they were 0.85 and 0.25 on the map's own
levels, chosen on the three models of
``examples/train_isbi.py --seeds 0,1,2`` (the calibrated CPU recipe; ``examples/bench_segment.py
quality --grid``, ISBI slices 25-29): V-Rand 0.9708, 0.9691, 0.9768 against 0.9679, 0.9687,
0.9740 for the best threshold of the thresholded map itself (0.8, 0.8, 0.9), so +0.0029,
+0.0005, +0.0027. The previous defaults (distance seeds, threshold 0.7, mean linkage at 0.3,
``grow`` 16) gave 0.966, 0.958, 0.972. Why: at a high threshold the models' faint membranes
(p 0.8-0.9) still part the cells, but mottled cell interiors split cells into several
components; the faces of those splits run through interior (low boundary probability with a
few dark specks), the faint membranes' faces are faint all along, and their means overlap
while their lower quantiles separate them better. A face mean above 0.3 merged faint
membranes. ``grow`` 16 left interior pixels far from every component 0 (singletons in V-Rand);
32 reaches them all on ISBI (64 gave the same labels). The scores move by 0.003-0.04 with one
merge of two large cells, so the threshold and the merge threshold stay model dependent: the
bench's grid shows them; on the same models' test-time-augmented maps these defaults lose to the
best threshold on two of three (0.9718, 0.9684, 0.9789 against 0.9731, 0.9704, 0.9778).
Smoothing the map (Gaussian, sigma 1-2) before thresholding and the flood did not help on these
maps. The limit is the map's (``bench_segment.py quality --oracle``): the default fragments
merged by the truth would score 0.983-0.987 on all three, but the faces that should merge and
those that should not overlap in boundary probability (membranes the model missed look like
interior), so no merge threshold separates them on every model.

Those figures are the maps' own levels. Since issue 22 the levels are read on the scale of the
maps the defaults were tuned on (``calibrate="map"``, the default while the thresholds are the
defaults: :mod:`emtile.segmenter.levels`): every level becomes the reference level of the same
rank in the whole map, so a threshold cuts every map at the share of pixels it cuts on the tuning
maps, and a map more or less sure of itself (``p -> p ** gamma``, another model, another stack)
gets the same labels. The threshold and merge threshold were chosen again on that scale (0.88 and
0.2: of 12 pairs, the smallest worst loss against each map's best threshold over the recipe's
three maps, their test-time-augmented maps and the demo's map). The table is global (one histogram of the map, counted in
integers), so the labels still do not depend on the blocks. Given thresholds mean the map's own
levels (``calibrate="none"``). ``examples/bench_segment.py robust`` measures it (README,
"Segmenting maps the defaults were not tuned on"). :mod:`emtile.segmenter.report` says how sure a
result is (fragments merged, close calls, where the threshold cut the map).

Floats: probabilities stored as floats are turned into uint8 altitudes (nearest 1/255) before
anything is compared, so no sum depends on the order of additions.
"""

from emtile.segmenter.driver import METHODS, MODES, SegmentResult, segment, segment_stage

__all__ = ["segment", "segment_stage", "SegmentResult", "METHODS", "MODES"]
