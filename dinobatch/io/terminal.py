"""Text for people: the one escaping of control characters before anything reaches a terminal, and
the one neutralising of formula cells before anything reaches a spreadsheet.

File names, labels and notes are arbitrary text: a newline in a name splits a line of output, a tab
shifts a column, and ESC sequences clear the screen, recolour it or retitle the window. Every
human-facing output passes its text through `printable`; machine outputs (Parquet, --json, JSON
log lines) keep the exact text. A CSV is opened in a spreadsheet, which runs a cell starting with
`=`, `+`, `-` or `@` as a formula (`=cmd|' /C calc'!A0`): every CSV dinobatch writes passes its text
cells through `spreadsheet_safe` (or `spreadsheet_safe_column`), which puts a `'` before them.
"""

from __future__ import annotations

import re

__all__ = ["printable", "FORMULA_START", "spreadsheet_safe", "spreadsheet_safe_column"]

# A spreadsheet runs a cell starting with one of these as a formula: OWASP's list (CSV injection)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    """Python's spelling of one non-printable character (\\n, \\x1b, \\u202e); a byte that was not
    UTF-8 (a surrogate escape) as \\xNN, the spelling scan.display_path gives it in tables."""
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """str(text) with every character Python does not count as printable (controls, ESC, line and
    paragraph separators, bidi overrides, lone surrogates) written as its escape, so one value stays
    one line and nothing in it acts on the terminal. keep_newlines: for text laid out in lines on
    purpose (a table, a traceback): each line escaped, the line breaks kept. Backslashes are left
    as they are: names from dinobatch's tables already show a literal backslash as two."""
    text = str(text)
    if keep_newlines:
        return "\n".join(printable(line) for line in text.split("\n"))
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def spreadsheet_safe(value: str) -> str:
    """A CSV cell a spreadsheet shows as text: a leading formula character gets a ' before it
    (spreadsheets hide that ' and save the cell without it)."""
    return "'" + value if value.startswith(FORMULA_START) else value


def spreadsheet_safe_column(column):
    """spreadsheet_safe over an Arrow string column, vectorised (results -o FILE.csv)."""
    import pyarrow.compute as pc

    starts = "".join(re.escape(c) for c in FORMULA_START)
    return pc.replace_substring_regex(column, pattern=f"^([{starts}])", replacement=r"'\1")
