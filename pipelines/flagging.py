"""Which scans a run flags: the robust z-score rule over the cohort's collection scores.

A scan is *flagged* when its collection score stands out from the cohort:
`score > median + z * 1.4826 * MAD` of all collection scores (a robust z-score; 1.4826 * MAD
estimates the standard deviation of the normal majority without being pulled by the
anomalies). The same number is the *map threshold*: a map voxel above it scores higher than a
typical scan's hottest token (the collection score is the maximum of the map's tokens), so
the above-threshold region of a flagged scan (`pipelines.hotspots`) is the part that made it
stand out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class FlagRule:
    """Which scans a run flags, and why: score > `threshold` = `median` + `z` x `sd` of the
    cohort's collection scores. `sd` is 1.4826 x MAD (`robust`), or the standard deviation when
    the MAD is 0 (over half the scores equal); 0 when the scores do not vary (nothing flagged)."""

    median: float
    sd: float
    z: float
    robust: bool

    @property
    def threshold(self) -> float:
        """The flag threshold (+inf when the scores do not vary)."""
        return self.median + self.z * self.sd if self.sd > 0.0 else float("inf")

    def describe(self) -> str:
        """The rule in words with its numbers (report and terminal), e.g. 'anomaly score above
        0.412 = cohort median 0.3 + 3 x 0.0373 (robust standard deviation: 1.4826 x MAD); --flag-z 3'."""
        if self.sd == 0.0:
            return "none can be: every scan has the same anomaly score"
        spread = "robust standard deviation: 1.4826 x MAD" if self.robust else "standard deviation (the MAD is 0)"
        return (f"anomaly score above {self.threshold:.4g} = cohort median {self.median:.4g} + {self.z:g} x "
                f"{self.sd:.4g} ({spread}); --flag-z {self.z:g}")


def flag_rule(collection_scores: np.ndarray, z: float) -> FlagRule:
    """The `FlagRule` of the cohort's collection scores (N,) with robust z-score `z`."""
    scores = np.asarray(collection_scores, dtype=np.float64)
    median = float(np.median(scores))
    sd = MAD_TO_SIGMA * float(np.median(np.abs(scores - median)))
    robust = sd > 0.0
    if not robust:
        sd = float(scores.std())
    return FlagRule(median=median, sd=sd, z=float(z), robust=robust)


def rank_percentile(rank: int, n: int) -> float:
    """100 for the most suspicious of `n` scans (rank 1), 0 for the least (rank n)."""
    return 100.0 if n < 2 else 100.0 * (n - rank) / (n - 1)
