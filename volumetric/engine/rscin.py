"""RsCIN: collection scores re-scored over a similarity graph of the collections (MuSc).

MuSc's *Re-scoring with Constrained Image-level Neighborhood* smooths each image's score with
the scores of the images that look most like it as a whole: a defect that only one image has
keeps its score, while an image whose score is high for a reason its look-alikes share (a
texture variant, a lighting change) is pulled towards theirs. Formulation, for scores
`s` (N,) and global descriptors `d` (N, D):

1. `s` is min-max normalised to [0, 1];
2. `W = d d^T` (N, N) (descriptor dot products; with L2-normalised descriptors the diagonal,
   1, is each row's maximum, so a collection is always among its own neighbours);
3. for each window k: in every row of W only the k largest entries are kept (the rest set to
   0), the row is divided by its sum (`P = D^-1 W_k`) and `s_k = P s`;
4. the result is the mean of `s_k` over the windows (MuSc: k in {1, 2, 3} on MVTec AD, {1, 8, 9}
   on VisA; k = 1 keeps the score itself).

volscan returns the result mapped back to the scores' own units (`min + s' (max - min)`:
same order and spacing, so a flag threshold or a map colour scale still reads in score units).
Two guards MuSc lacks: constant scores (and a single collection) come back unchanged instead of
0 / 0 = NaN, and a window larger than N keeps the whole row. Negative similarities among the
kept neighbours count as 0 (weights stay a convex combination); with MuSc's class tokens they do
not occur and the result is MuSc's. "Mobile" use: `rscin` takes any method's scores and any
descriptors, so it re-scores another tool's output as well (`volumetric.engine.rscin`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from volumetric.errors import VolscanError

MVTEC_WINDOWS = (1, 2, 3)
VISA_WINDOWS = (1, 8, 9)


def check_windows(windows: Sequence[int], name: str = "rscin") -> tuple[int, ...]:
    """The k-windows as a tuple of positive integers (one-line error otherwise)."""
    try:
        values = tuple(windows)
    except TypeError:
        values = ()
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise VolscanError(f"{name}: expected a non-empty list of positive integers (k-windows such as "
                           f"{list(MVTEC_WINDOWS)}), or null for off; got {windows!r}")
    return values


def rscin(scores: Tensor, descriptors: Tensor, windows: Sequence[int] = MVTEC_WINDOWS) -> Tensor:
    """Re-scored collection scores (N,) float32, in the units of `scores`.

    `scores`: (N,) finite; `descriptors`: (N, D) finite global descriptors of the same collections
    (L2-normalised, e.g. class tokens or mean tokens); `windows`: the k-windows."""
    windows = check_windows(windows)
    scores = torch.as_tensor(scores)
    descriptors = torch.as_tensor(descriptors)
    if scores.ndim != 1:
        raise VolscanError(f"rscin: scores must be (N,), got shape {tuple(scores.shape)}")
    n = scores.shape[0]
    if descriptors.ndim != 2 or descriptors.shape[0] != n:
        raise VolscanError(f"rscin: descriptors must be ({n}, D), got shape {tuple(descriptors.shape)}")
    values = scores.double().cpu()
    features = descriptors.double().cpu()
    if not bool(torch.isfinite(values).all()) or not bool(torch.isfinite(features).all()):
        raise VolscanError("rscin: scores and descriptors must be finite")
    low, high = values.min(), values.max()
    if n < 2 or not high > low:
        return scores.float().clone()
    unit = (values - low) / (high - low)
    similarity = features @ features.T
    # Row-wise descending order; stable, so ties keep the lower index (reproducible).
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)
    rescored = torch.zeros(n, dtype=torch.float64)
    for k in windows:
        kept = order[:, : min(k, n)]
        weights = similarity.gather(1, kept).clamp(min=0.0)
        total = weights.sum(1)
        if not bool((total > 0).all()):
            first = int(torch.nonzero(total <= 0)[0])
            raise VolscanError(f"rscin: collection {first} has no positive similarity among its {k} nearest "
                               "descriptors; pass L2-normalised descriptors")
        rescored += (weights * unit[kept]).sum(1) / total
    rescored /= len(windows)
    return (low + rescored * (high - low)).float()
