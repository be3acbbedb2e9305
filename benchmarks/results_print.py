"""`dinobatch results DIR` printing, with names escaped (terminal.printable) beside the old raw print.

    .venv/bin/python benchmarks/results_print.py [--rows 200000]

Builds an in-memory table shaped like classify's current rows (paths like the inbox's, a few with
control characters), then times writing it as TSV to /dev/null both ways, in the same run: the
cost of escaping every field of every line. No files are read or written besides /dev/null.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import redirect_stdout

import click
import pyarrow as pa

from dinobatch.cli.results import print_rows


def _table(rows: int) -> pa.Table:
    """Rows like classify's: nested paths, labels, confidences, one in 50 a duplicate or error."""
    paths = [f"2026/12/{i % 31:02d}/camera trap {i % 7}/IMG_{i:07d}.jpg" for i in range(rows)]
    for i in range(0, rows, 1000):
        paths[i] = f"odd/name\twith\x1b[31mcolour\n{i}.jpg"
    return pa.table({
        "path": paths,
        "status": ["error" if i % 50 == 0 else "ok" for i in range(rows)],
        "label": [None if i % 50 == 0 else f"species_{i % 120}" for i in range(rows)],
        "confidence": [None if i % 50 == 0 else (i % 1000) / 1000 for i in range(rows)],
        "duplicate_of": [None] * rows,
        "error": ["not an image, or a format Pillow cannot identify" if i % 50 == 0 else None for i in range(rows)],
    })


def _raw_rows(table: pa.Table) -> None:
    """The printer before escaping: fields as they are, no header."""
    for r in table.select(["path", "status", "label", "confidence", "duplicate_of", "error"]).to_pylist():
        conf = f"{r['confidence']:.3f}" if r["confidence"] is not None else "-"
        extra = r["duplicate_of"] or r["error"] or ""
        click.echo(f"{r['path']}\t{r['status']}\t{r['label'] or '-'}\t{conf}\t{extra}")


def _seconds(fn, table: pa.Table, repeats: int) -> float:
    """Median wall time of fn(table) printing to /dev/null."""
    times = []
    for _ in range(repeats):
        with open(os.devnull, "w") as sink, redirect_stdout(sink), click.Context(click.Command("bench")):
            t0 = time.perf_counter()
            fn(table)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = _table(args.rows)
    raw = _seconds(_raw_rows, table, args.repeats)
    escaped = _seconds(print_rows, table, args.repeats)
    print(f"{args.rows} rows, median of {args.repeats}:")
    print(f"  raw print (before)  {raw:6.2f} s  {args.rows / raw:9.0f} rows/s")
    print(f"  escaped (now)       {escaped:6.2f} s  {args.rows / escaped:9.0f} rows/s  ({escaped / raw:.2f}x)")


if __name__ == "__main__":
    main()
