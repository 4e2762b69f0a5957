"""`--part i/n`: a deterministic share of a cohort for one job of a Slurm array (or similar).

Part i of n (1 <= i <= n) takes every n-th subject id, starting at the i-th, of the ids sorted
as strings. The split depends only on the set of ids, never on the order a file system lists
them or on which machine runs the job, so n jobs started anywhere cover the cohort exactly
once. Striding (rather than contiguous blocks) spreads runs of similar scans, e.g. one site's
large volumes named alike, over all parts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from volumetric.errors import VolscanError

_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """Part `index` (1-based) of `count`; `Part(1, 1)` is the whole cohort."""

    index: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if not (1 <= self.index <= self.count):
            raise VolscanError(f"--part must be i/n with 1 <= i <= n, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> "Part":
        """`"i/n"` -> `Part(i, n)`; anything else is a one-line error."""
        match = _PART.match(text)
        if match is None:
            raise VolscanError(f"--part must look like i/n (e.g. 3/10), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def whole(self) -> bool:
        """True for the whole cohort (1/1)."""
        return self.count == 1

    @property
    def label(self) -> str:
        """File-name friendly name, e.g. `part-03-of-10` ("all" for the whole cohort)."""
        width = len(str(self.count))
        return "all" if self.whole else f"part-{self.index:0{width}d}-of-{self.count}"

    def select(self, ids: Iterable[str]) -> list[str]:
        """This part's ids: sorted ids, every `count`-th from position `index - 1`."""
        return sorted(ids)[self.index - 1 :: self.count]
