"""How a failing `volscan` command ends: one line, the right exit code, no partial output.

* `VolscanError`: a problem with the user's input or settings (exit 2).
* `OSError` anywhere (disk full, permission denied, a file vanished): the same one line, naming
  the path the system refused (exit 2); the traceback stays in the debug log (-vv).
* SIGINT (Ctrl-C, exit 130) and SIGTERM (what `timeout`, Slurm and Docker send, exit 143): both
  unwind through every `with` block, so `AtomicOutputDir` removes its hidden temporary folder.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM; a BaseException like KeyboardInterrupt, so the
    `except Exception` blocks of libraries do not swallow it."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` in the main thread (like Ctrl-C raises
    KeyboardInterrupt); the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def shown(items: list[str], limit: int = 10) -> str:
    """The first `limit` of `items` joined for a one-line error, and how many more:
    'a, b, c and 12 more'."""
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def os_error_line(exc: OSError) -> str:
    """'PATH: problem' for an OSError (both paths for a rename), e.g.
    '/data/out/maps/a.nii.gz: No space left on device'."""
    problem = exc.strerror or str(exc) or type(exc).__name__
    paths = [os.fspath(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(map(str, paths))}: {problem}" if paths else f"{problem} ({type(exc).__name__})"
