"""Run the next jobs in the background while the caller works on the current one.

Token extraction keeps a device busy; reading, preprocessing and `VolumeTokenizer.prepare` of
the next scans are host work. `prefetch` overlaps the two, so the device does not wait:

    jobs = [lambda p=p: tok.prepare(*load(p)) for p in paths]
    for prepared in prefetch(jobs, depth=2):
        tokens = tok.extract(prepared)

Threads, not processes: the host work is numpy/torch/ITK code that releases the GIL, and the
results (tensors of ~50 MB) are shared without copying.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

from volumetric.errors import VolscanError

T = TypeVar("T")


def prefetch(jobs: Iterable[Callable[[], T]], depth: int = 2, workers: int = 1) -> Iterator[T]:
    """Yield each job's result in order, running up to `depth` later jobs meanwhile on
    `workers` background threads. A job's exception is raised when its result is due; leaving
    the loop early cancels the jobs not started and waits for the running ones."""
    for name, value in (("depth", depth), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VolscanError(f"prefetch {name} must be a positive integer, got {value!r}")
    pending_jobs = iter(jobs)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="volscan-prefetch")
    try:
        ahead: deque[Future[T]] = deque(pool.submit(job) for job in islice(pending_jobs, depth + 1))
        while ahead:
            current = ahead.popleft()
            following = next(pending_jobs, None)
            if following is not None:
                ahead.append(pool.submit(following))
            yield current.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
