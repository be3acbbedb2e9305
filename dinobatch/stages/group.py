"""Stage group: the files' duplicate groups (exact copies and near duplicates) from their contents' hashes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dinobatch.dedupe.groups import Groups, group_among, hashes_from_hex
from dinobatch.schema import Col

__all__ = ["parse_hex64", "duplicates"]


def parse_hex64(hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """16-hex-digit hash strings (as the rows and the cache store them) as uint64, a slice at a time
    (dedupe.groups.hashes_from_hex, the one parser, over an Arrow column)."""
    out = np.zeros(len(hashes), np.uint64)
    for lo in range(0, len(hashes), 4096):
        out[lo:lo + 4096] = hashes_from_hex(hashes.slice(lo, 4096).to_pylist())
    return out


def duplicates(content: pa.Table, own: np.ndarray, order: np.ndarray, *, phash_max: int, dhash_max: int) -> Groups:
    """Duplicate groups over the files that have a prediction, as arrays over all files.

    content: one row per content (sha256, width, height, phash, dhash); own: each file's row in
    content, -1 for a file in error (which is in no group); order: the files in path order, so that
    ties go to the first path. keeper holds a file's index."""
    ok = order[own[order] >= 0]  # in path order, as group_arrays wants them
    rows = own[ok]
    pixels = content[Col.WIDTH].to_numpy().astype(np.int64) * content[Col.HEIGHT].to_numpy()
    return group_among(len(own), ok, rows, parse_hex64(content[Col.PHASH])[rows],
                       parse_hex64(content[Col.DHASH])[rows], pixels[rows], phash_max=phash_max,
                       dhash_max=dhash_max)
