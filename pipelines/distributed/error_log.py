"""The per-scan error log of `volscan extract`: one JSON line per scan that failed.

Each run of one part writes its own file (no two jobs of a Slurm array append to the same file,
which shared file systems do not make atomic). The file is started empty at the beginning of a
run, and a line is appended and flushed as soon as a scan fails, so a job killed halfway still
leaves the failures seen so far. A rerun retries the failed scans and rewrites the log.

Line fields: `id`, `input` (path), `phase` ("spatial" or "tokens"), `error` (one line),
`type` (the exception class), `time` (UTC, ISO 8601).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any


class ErrorLog:
    """Append-only JSON-lines file at `path` (created empty by `start`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.count = 0

    def start(self) -> None:
        """Create (or empty) the log of this run."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")
        self.count = 0

    def add(self, sid: str, source: str, phase: str, error: str, kind: str) -> None:
        """Append one failure as a JSON line and flush it to disk."""
        entry: dict[str, Any] = {
            "id": sid,
            "input": source,
            "phase": phase,
            "error": " ".join(str(error).split()),
            "type": kind,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.count += 1


def read_error_logs(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{scan id: its latest logged failure} over every `*.jsonl` log in `folder` (missing = {})."""
    failures: dict[str, dict[str, Any]] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return failures
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a killed job; the scan is retried by the next run anyway
            if isinstance(entry, dict) and "id" in entry:
                failures[str(entry["id"])] = entry
    return failures
