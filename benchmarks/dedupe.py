"""Speed of dedupe.near_pairs beside brute force and imagededup's search, measured in the same run.

    .venv/bin/python benchmarks/dedupe.py [--n 100000] [--big 1000000] [--distances 3 8 10]
                                          [--imagededup-n 1000] [--planted 0.01] [--seed 0]

Hashes are uniform random 64-bit values (seeded), --planted of them replaced by copies of others
with 0-12 random bits flipped so that there are pairs to find (--imagededup-n uses 10x that
share). Random hashes are the case an index finds hardest to prune: real ones cluster, and equal
ones are collapsed first. The anchor is brute force in numpy: every pair compared with a
vectorised popcount, a band of rows at a time, on as many threads as near_pairs uses. At --n both
run and their pairs are compared; at --big only near_pairs runs, beside the anchor extrapolated
from its --n time as n^2. imagededup (its BK-tree, and the Cython brute force its find_duplicates
uses by default on Linux, each with its own distance function) runs at --imagededup-n, where its
pure-Python search is still bearable. Times are wall seconds of one run each on a machine that
may be shared: rerun a figure that looks off.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def random_hashes(n: int, seed: int, planted: float) -> np.ndarray:
    """Uniform random hashes, a share of them replaced by copies of others with 0-12 bits flipped
    (so every distance finds some pairs, exact copies included)."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    copies = rng.choice(n, size=int(n * planted), replace=False)
    h[copies] = h[rng.integers(0, n, size=len(copies))]
    for _ in range(12):
        flip = copies[rng.random(len(copies)) < 0.5]
        h[flip] ^= np.uint64(1) << rng.integers(0, 64, size=len(flip)).astype(np.uint64)
    return h


def brute_force(h: np.ndarray, d: int, workers: int) -> np.ndarray:
    """Every pair (i, j), i < j, within d: rows in bands of ~256k cells, bands spread over threads."""
    n = len(h)
    rows = max(1, (1 << 18) // max(n, 1))

    def band(r0: int) -> np.ndarray:
        """Pairs whose first item is in rows r0.. of this band."""
        r1 = min(n - 1, r0 + rows)
        hit = np.flatnonzero(np.bitwise_count(h[r0:r1, None] ^ h[None, r0 + 1:]) <= d)
        a, c = np.divmod(hit, n - r0 - 1)
        keep = c >= a  # row a is item r0 + a, column c is item r0 + 1 + c
        return np.stack([a[keep] + r0, c[keep] + r0 + 1], axis=1)

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(band, range(0, n - 1, rows)))
    pairs = np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].astype(np.int64)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, result) of one call."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def imagededup_search(h: np.ndarray, d: int, method: str) -> tuple[float, set[tuple[int, int]]]:
    """Time one of imagededup's searches over every hash as a query, as find_duplicates runs it."""
    from imagededup.handlers.search.bktree import BKTree
    from imagededup.handlers.search.brute_force_cython import BruteForceCython
    from imagededup.methods.hashing import Hashing

    hash_dict = {str(i): format(int(x), "016x") for i, x in enumerate(h)}
    t = time.perf_counter()
    searcher = (BKTree if method == "bktree" else BruteForceCython)(hash_dict, Hashing.hamming_distance)
    found = {name: searcher.search(value, tol=d) for name, value in hash_dict.items()}
    seconds = time.perf_counter() - t
    pairs = {(int(q), int(r)) for q, hits in found.items() for r, _ in hits if int(q) < int(r)}
    return seconds, pairs


def imagededup_missing() -> str | None:
    """Why imagededup cannot run here, or None."""
    if importlib.util.find_spec("imagededup") is None:
        return "skipped: imagededup is not installed (pip install imagededup)"
    return None


def main() -> None:
    """Measure, then print one table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="size measured against brute force")
    ap.add_argument("--big", type=int, default=1_000_000, help="size where brute force is extrapolated")
    ap.add_argument("--distances", type=int, nargs="+", default=[3, 8, 10])
    ap.add_argument("--imagededup-n", type=int, default=1000, help="0 skips imagededup")
    ap.add_argument("--planted", type=float, default=0.01, help="share of hashes that are near copies")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from dinobatch.dedupe import groups as dedupe
    from dinobatch.dedupe import hamming

    workers = hamming._workers()
    print(f"machine: {len(os.sched_getaffinity(0))} cpus ({workers} threads used), numpy {np.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; random uint64 hashes, {args.planted:.0%} near copies, "
          f"seed {args.seed}")
    rows = []  # (n, d, what, seconds, pairs, note)
    small = random_hashes(args.n, args.seed, args.planted)
    big = random_hashes(args.big, args.seed + 1, args.planted)
    for d in args.distances:
        brute_s, expected = timed(lambda: brute_force(small, d, workers))
        ours_s, got = timed(lambda: dedupe.near_pairs(small, d))
        same = "equal to brute force" if np.array_equal(got, expected) else "DIFFERS FROM BRUTE FORCE"
        rows.append((args.n, d, "numpy brute force (anchor)", brute_s, len(expected), "measured"))
        rows.append((args.n, d, "dinobatch near_pairs", ours_s, len(got),
                     f"{brute_s / ours_s:.1f}x faster; {same}"))
        if args.big:
            big_s, big_pairs = timed(lambda: dedupe.near_pairs(big, d))
            brute_big = brute_s * (args.big / args.n) ** 2
            rows.append((args.big, d, "numpy brute force", brute_big, None, f"extrapolated from n={args.n} as n^2"))
            rows.append((args.big, d, "dinobatch near_pairs", big_s, len(big_pairs),
                         f"{brute_big / big_s:.1f}x faster than extrapolated"))
    rows += imagededup_rows(args)
    print(f"\n{'n':>9} {'d':>3} {'method':<32} {'seconds':>9} {'pairs':>7}  note")
    for n, d, what, seconds, pairs, note in rows:
        print(f"{n:>9} {d:>3} {what:<32} {seconds:>9.3f} {'-' if pairs is None else pairs:>7}  {note}")


def imagededup_rows(args: argparse.Namespace) -> list[tuple]:
    """imagededup's BK-tree and default search beside near_pairs, on the same small input."""
    from dinobatch.dedupe import groups as dedupe

    reason = imagededup_missing() if args.imagededup_n else "skipped (--imagededup-n 0)"
    if reason:
        print(f"imagededup: {reason}")
        return []
    h = random_hashes(args.imagededup_n, args.seed + 2, args.planted * 10)
    rows = []
    for d in args.distances:
        ours_s, ours = timed(lambda: dedupe.near_pairs(h, d))
        ours_set = set(map(tuple, ours.tolist()))
        rows.append((len(h), d, "dinobatch near_pairs", ours_s, len(ours), "measured"))
        for method, label in (("bktree", "imagededup BKTree"), ("cython", "imagededup brute_force_cython")):
            seconds, pairs = imagededup_search(h, d, method)
            same = "same pairs" if pairs == ours_set else "DIFFERENT PAIRS"
            rows.append((len(h), d, label, seconds, len(pairs), f"{seconds / ours_s:.1f}x slower; {same}"))
    return rows


if __name__ == "__main__":
    main()
