"""How sure a segmentation is: what the global step merged, how close the calls were, and how far
the map sits from the maps the defaults were tuned on (``emtile segment --report``).

A user who segments a map unlike the tuning data cannot see from the labels that another
threshold would have scored much better (issue 22: V-Rand 0.89 against 0.97 on a second stack).
Three signs are cheap to collect on the way, exactly and for any block size (the global step's
region graph is the same for every cut):

- *merges*: fragments (after the faces between blocks are joined) against objects: a map whose
  cells break into many fragments leans on the merge rule;
- *close calls*: faces between fragments whose first score (before any merge: the face's
  ``merge_quantile`` of boundary levels, or their mean) lies in the top quarter of the merge
  threshold (e.g. 0.19-0.25 for 0.25). They merged, but a slightly lower threshold would keep
  them apart. With quantile linkage the faces' histograms stop at the merge threshold, so faces
  just above it cannot be told from the rest: only the side that merges is counted;
- *levels*: where the defaults' threshold cuts the map (:mod:`emtile.segmenter.levels`). Far from
  the nominal value, the map is less or more sure of itself than the tuning maps.

Merges and levels past their limits (:data:`WARN`) are warning lines in the summary; ``--report``
prints every sign.
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["SegmentReport", "face_scores", "WARN"]

#: When a sign becomes a warning: the share of fragments merged away, and how far (in
#: probability) the threshold moved on the map's levels. Close calls are reported, not warned
#: about: on the ISBI recipe's maps, where the defaults beat the best threshold, 55-62% of the
#: faces that merge were close calls, as on the demo's weak map (``bench_segment.py robust``).
WARN = {"merged": 0.5, "shift": 0.1}


def face_scores(faces, merge_threshold, merge_quantile, n_bins):
    """First score of each face (boundary probability, upper end of its bin for quantile
    linkage; ``inf`` where the quantile lies above the histogram, i.e. above the threshold).

    ``faces``: rows ``(u, v, altitude_sum, pixels, contact[, histogram...])``.
    """
    faces = np.asarray(faces, np.int64).reshape(-1, max(5, np.shape(faces)[-1]))
    pixels = faces[:, 3]
    if merge_quantile is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(pixels > 0, faces[:, 2] / np.maximum(pixels, 1) / 255, np.inf)
    hist = faces[:, 5:5 + n_bins]
    cum = np.cumsum(hist, axis=1)
    reached = cum >= merge_quantile * pixels[:, None]
    b = np.where(reached.any(axis=1), reached.argmax(axis=1), n_bins)
    limit = int(np.floor(np.float64(merge_threshold) * 255))
    top = (b + 1) * (limit + 1) / n_bins - 1  # highest level of the bin
    return np.where((b < n_bins) & (pixels > 0), top / 255, np.inf)


@dataclass
class SegmentReport:
    """The signs, summed over the global step's groups of blocks."""

    fragments: int = 0
    objects: int = 0
    faces: int = 0  # faces between fragments with evidence
    merge_side: int = 0  # of them, scored at or below the merge threshold
    close: int = 0  # of those, in the top quarter of the threshold
    merge_threshold: float = 0.0
    threshold: float = 0.0
    threshold_on_map: float = None  # where the threshold cuts the map (levels), if known
    calibrated: bool = False

    def add_graph(self, fragments, objects, scores, merge_threshold):
        scores = np.asarray(scores, np.float64)
        finite = scores[np.isfinite(scores)]
        self.fragments += int(fragments)
        self.objects += int(objects)
        self.faces += int(scores.size)
        below = finite <= merge_threshold + 1e-9
        self.merge_side += int(below.sum())
        self.close += int((below & (finite > 0.75 * merge_threshold)).sum())

    def warnings(self):
        """The signs past their limits, one line each."""
        out = []
        if self.fragments and (self.fragments - self.objects) / self.fragments > WARN["merged"]:
            out.append(f"warning: {self.fragments - self.objects} of {self.fragments} fragments "
                       f"were merged away: the labels lean on the merge rule "
                       f"(--merge-threshold)")
        if self.threshold_on_map is not None and \
                abs(self.threshold_on_map - self.threshold) > WARN["shift"]:
            side = "less" if self.threshold_on_map < self.threshold else "more"
            what = ("the levels were adapted (calibrate=map)" if self.calibrated else
                    "its own levels were used as given")
            out.append(f"warning: the map is {side} sure of itself than the maps the defaults "
                       f"were tuned on ({self.threshold:g} on their scale sits at p > "
                       f"{self.threshold_on_map:.2f} in it): {what}; check the result against "
                       f"labelled slices")
        return out

    def lines(self, full=True):
        """The signs (``full=False``: all but the faces), then the warnings: what ``emtile
        segment`` prints under its summary (``full`` with ``--report``)."""
        out = []
        if self.fragments:
            out.append(f"report: {self.fragments} fragments, {self.objects} objects "
                       f"({self.fragments - self.objects} merged away)")
        if self.faces and full:
            out.append(f"report: {self.faces} faces between fragments; {self.merge_side} score at "
                       f"most --merge-threshold {self.merge_threshold:g}, {self.close} of them "
                       f"above {0.75 * self.merge_threshold:.3g} (close calls)")
        if self.threshold_on_map is not None:
            if self.calibrated:
                out.append(f"report: levels adapted (calibrate=map): the threshold "
                           f"{self.threshold:g} cut the map at p > {self.threshold_on_map:.2f}")
            else:
                out.append(f"report: its own levels as given (p > {self.threshold:g}); on the "
                           f"tuning maps' scale {self.threshold:g} would cut it at p > "
                           f"{self.threshold_on_map:.2f}")
        return out + self.warnings()
