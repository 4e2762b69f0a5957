"""Text from file names written where a reader or a program interprets it.

Scan ids and paths come from file names, which may hold anything but "/" and NUL. Each place
they are shown has its own escaping, applied where they are written:

- terminal (`printable`): control characters (ESC sequences, CR, LF, ...) and line/paragraph
  separators shown as Python escapes, so a name can neither recolour the terminal nor forge a
  line of output;
- CSV (`csv_cell` / `csv_value`): a cell that begins with `= + - @`, TAB or CR is read as a
  formula by spreadsheets (OWASP, "CSV injection"); it is written with a leading `'`, which
  spreadsheets show as text, and read back without it. A cell that already begins with `'` gets
  a second one, so the mapping is one-to-one;
- HTML links (`href`): the run-relative path percent-encoded (an id `e%41f`, `a#b` or `a?b`
  links to its own file, not another's), then HTML-escaped;
- figures: ids are drawn with matplotlib's mathtext and TeX off (`pipelines.figures`), so a
  `$` is a dollar sign.
"""

from __future__ import annotations

import html
import unicodedata
from urllib.parse import quote

# Unicode categories that break a line or drive a terminal: C0/C1 controls (Cc), line and
# paragraph separators (Zl, Zp) and lone surrogates (Cs: bytes that were not UTF-8).
UNSAFE_CATEGORIES = ("Cc", "Zl", "Zp", "Cs")
# What a spreadsheet reads as the start of a formula (OWASP CSV injection), plus the quote
# that marks a neutralised cell.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_QUOTE = "'"


def unsafe_characters(text: str) -> list[str]:
    """The characters of `text` that `printable` escapes, in order."""
    return [ch for ch in text if unicodedata.category(ch) in UNSAFE_CATEGORIES]


def printable(text: str) -> str:
    """`text` with every control character, line separator and lone surrogate written as its
    Python escape (`\\n`, `\\x1b`, `\\u2028`, `\\udcff`): one line, inert on a terminal."""
    return "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in UNSAFE_CATEGORIES else ch for ch in text)


def csv_cell(text: str) -> str:
    """A text cell for a CSV file: prefixed with `'` when a spreadsheet would run it as a
    formula (or when it already begins with `'`); `csv_value` undoes it."""
    return _QUOTE + text if text.startswith(FORMULA_STARTS + (_QUOTE,)) else text


def csv_value(cell: str) -> str:
    """Inverse of `csv_cell`."""
    return cell[1:] if cell.startswith(_QUOTE) and cell[1:].startswith(FORMULA_STARTS + (_QUOTE,)) else cell


def href(relative: str) -> str:
    """A run-relative path (forward slashes) as an HTML attribute value: percent-encoded, then
    escaped."""
    return html.escape(quote(relative, safe="/"))
