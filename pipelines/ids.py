"""What a scan id may be. An id names files volscan writes (`pipelines.run_layout`: maps,
figures; the preprocessing store's records), so it is checked once, in the validation pass,
whether it comes from a file name or from an API caller's `Subject`:

- not empty, not starting with "." (hidden names are volscan's temporaries; "." and ".."
  would step out of a folder);
- no "/" or "\\" (a path separator would place files outside the run or the cache);
- no control characters, line separators or undecodable bytes (`pipelines.safe_text`);
- the longest file name volscan derives from it (`RunLayout.id_file_names`, e.g.
  `rank001_<id>.png`) within `NAME_MAX` bytes, so no write fails after the compute.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.run_layout import RunLayout
from pipelines.safe_text import printable, unsafe_characters
from volumetric.errors import InputFileError

# Linux and macOS file systems limit one file name to 255 bytes.
NAME_MAX = 255


def check_id(sid: str, source: Path, n_subjects: int) -> None:
    """Refuse id `sid` of the input `source` (see the module docstring) with one line naming
    the file; `n_subjects` sets the widest rank in a figure name."""
    if not isinstance(sid, str) or not sid:
        raise InputFileError(source, f"subject id {sid!r} is empty or not text")
    shown = printable(sid)
    separators = sorted({ch for ch in sid if ch in "/\\"})
    if separators:
        raise InputFileError(source, f"subject id '{shown}' holds the path separator '{separators[0]}'")
    if sid.startswith("."):
        raise InputFileError(source, f"subject id '{shown}' starts with '.' (hidden or parent-folder name)")
    unsafe = unsafe_characters(sid)
    if unsafe:
        raise InputFileError(source, f"subject id '{shown}' holds the control character or undecodable byte "
                                     f"'{printable(unsafe[0])}'; rename the file")
    names = RunLayout(Path()).id_file_names(sid, n_subjects)
    longest = max(names, key=lambda name: len(name.encode()))
    excess = len(longest.encode()) - NAME_MAX
    if excess > 0:
        raise InputFileError(source, f"subject id of {len(sid.encode())} bytes is too long: volscan writes "
                                     f"'{longest[:20]}...' ({len(longest.encode())} bytes, over the {NAME_MAX}-byte "
                                     f"file-name limit); shorten the name by {excess} bytes")
