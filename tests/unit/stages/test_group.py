"""Stage group as a pure function: files' duplicate groups from their contents' hashes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dinobatch.schema import Col
from dinobatch.stages.group import duplicates, parse_hex64


def test_hex_hashes_parse_as_the_unsigned_64_bit_numbers_they_spell():
    parsed = parse_hex64(pa.chunked_array([["0000000000000001", "ffffffffffffffff"], ["8000000000000000"]]))
    assert parsed.dtype == np.uint64 and parsed.tolist() == [1, 2**64 - 1, 2**63]


def test_copies_and_near_copies_group_around_the_largest_and_errors_stay_out():
    content = pa.table({Col.SHA256: ["big", "small", "far"], Col.WIDTH: [200, 100, 100], Col.HEIGHT: [200, 100, 100],
                        Col.PHASH: ["00000000000000f0", "00000000000000f3", "ffffffffffff0000"],
                        Col.DHASH: ["0000000000000000", "0000000000000001", "00000000ffffffff"]})
    # files, in walk order: c.png (small), b.png (big), a.png (big), d.png (in error), e.png (far)
    own = np.array([1, 0, 0, -1, 2])
    order = np.array([2, 1, 0, 3, 4])  # a, b, c, d, e
    groups = duplicates(content, own, order, phash_max=8, dhash_max=3)
    assert groups.group.tolist() == [0, 0, 0, -1, -1]
    assert groups.keeper.tolist() == [2, 2, -1, -1, -1]  # a.png: the largest, first by path
    assert groups.exact.tolist()[:2] == [False, True]  # c.png near a.png, b.png the same bytes
    tight = duplicates(content, own, order, phash_max=1, dhash_max=3)  # pHash 2 apart: not near any more
    assert tight.keeper.tolist() == [-1, 2, -1, -1, -1]
