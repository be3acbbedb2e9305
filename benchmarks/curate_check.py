"""curate's check of its input (predictions.check_predictions) beside what curate already spends.

    .venv/bin/python benchmarks/curate_check.py [--rows 100000] [--classes 15] [--embedding 0]

Builds an in-memory table shaped like a classify rows file (one in 50 rows in error, with no
prediction), then times, in the same run: check_predictions over it, and table.to_pylist(), the
first thing curate does with the rows after the check. The check should cost a small share of
that. Nothing is read or written.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch.store.predictions import check_predictions
from dinobatch.schema import row_schema


def _table(rows: int, classes: int, embedding: int) -> tuple[pa.Table, list[str]]:
    """A rows table of classify's schema with softmax probs over `classes` labels."""
    rng = np.random.default_rng(0)
    labels = [f"species_{k}" for k in range(classes)]
    logits = rng.normal(size=(rows, classes)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    failed = np.arange(rows) % 50 == 0
    mask = pa.array(failed)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), classes).cast(pa.list_(pa.float32()))
    columns = {
        "run_id": pa.array(["r"] * rows), "path": pa.array([f"2026/12/IMG_{i:07d}.jpg" for i in range(rows)]),
        "status": pa.array(np.where(failed, "error", "ok")), "width": pa.array(np.full(rows, 640, np.int32)),
        "height": pa.array(np.full(rows, 480, np.int32)), "dhash": pa.array(["f0f0f0f0f0f0f0f0"] * rows),
        "label": pa.array(np.array(labels)[probs.argmax(axis=1)], mask=failed),
        "confidence": pa.array(probs.max(axis=1), mask=failed),
        "probs": pc.if_else(mask, pa.nulls(rows, flat.type), flat),
    }
    if embedding:
        emb = rng.normal(size=(rows, embedding)).astype(np.float32)
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), embedding).cast(
            pa.list_(pa.float32()))
    schema = row_schema()
    table = pa.table({f.name: columns.get(f.name, pa.nulls(rows, f.type)) for f in schema}, schema=schema)
    return table, labels


def _best_of(repeats: int, action) -> tuple[float, float]:
    """Best and median wall seconds of repeats calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        action()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=15)
    parser.add_argument("--embedding", type=int, default=0, help="embedding length (0: none, as by default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table, labels = _table(args.rows, args.classes, args.embedding)
    check_min, check_med = _best_of(args.repeats, lambda: check_predictions(table, labels, "bench"))
    pylist_min, pylist_med = _best_of(args.repeats, table.to_pylist)
    print(f"{args.rows} rows, {args.classes} classes, embedding {args.embedding or 'none'}; "
          f"best / median of {args.repeats}")
    print(f"  check_predictions     {check_min:8.3f} / {check_med:8.3f} s")
    print(f"  table.to_pylist()     {pylist_min:8.3f} / {pylist_med:8.3f} s   (curate's next step: the anchor)")
    print(f"  check / to_pylist     {check_min / pylist_min:8.1%}")


if __name__ == "__main__":
    main()
