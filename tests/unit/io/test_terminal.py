"""printable: the escaping every human-facing output uses."""

from __future__ import annotations

import os

import pytest

from dinobatch.io.walk import display_path
from dinobatch.io.terminal import printable


@pytest.mark.parametrize("raw, shown", [
    ("plain name.jpg", "plain name.jpg"),
    ("tête de 恐竜 🦕.png", "tête de 恐竜 🦕.png"),  # printable Unicode is left alone
    ("a\nb\tc\rd", "a\\nb\\tc\\rd"),
    ("\x1b[2J\x1b]0;title\x07\x7f\x9b", "\\x1b[2J\\x1b]0;title\\x07\\x7f\\x9b"),
    ("evil\u202etxt.jpg", "evil\\u202etxt.jpg"),  # a bidi override would show the name reversed
    ("line\u2028sep", "line\\u2028sep"),
    ("back\\slash", "back\\slash"),
])
def test_printable_escapes_what_acts_on_a_terminal(raw, shown):
    assert printable(raw) == shown


def test_bytes_that_are_not_utf8_look_as_they_do_in_the_tables():
    raw = os.fsdecode(b"caf\xe9\x1b.jpg")  # a surrogate escape, as os.listdir gives it
    assert printable(raw) == "caf\\xe9\\x1b.jpg"
    assert printable(display_path(raw)) == "caf\\xe9\\x1b.jpg"


def test_keep_newlines_escapes_each_line():
    assert printable("one\x1b\ntwo\tcols", keep_newlines=True) == "one\\x1b\ntwo\\tcols"


def test_the_column_and_the_cell_guard_the_same_formula_cells():
    """results -o FILE.csv (a column at a time) and queue.csv (a cell at a time) follow one rule."""
    import pyarrow as pa

    from dinobatch.io.terminal import FORMULA_START, spreadsheet_safe, spreadsheet_safe_column

    values = [c + "x" for c in FORMULA_START] + ["a=b", "plain", "", "'=already"]
    assert spreadsheet_safe_column(pa.array(values)).to_pylist() == [spreadsheet_safe(v) for v in values]
    assert all(spreadsheet_safe(c).startswith("'") for c in FORMULA_START)
