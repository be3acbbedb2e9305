"""Exact and near-duplicate grouping: pure functions over stored hashes, no image access.

Near pairs use multi-index hashing: split the 64-bit hash into m blocks; by the pigeonhole
principle two hashes within Hamming distance d agree to within floor(d/m) bits on at least
one block, so only items whose block lies within that radius are ever compared. The result
is identical to comparing all pairs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .schema import DUPLICATE_EXACT, DUPLICATE_NEAR

__all__ = [
    "DEFAULT_PHASH_MAX",
    "DEFAULT_DHASH_MAX",
    "DedupeItem",
    "Assignment",
    "popcount64",
    "near_pairs",
    "group_duplicates",
    "linked_components",
]

# Chosen on ../shared/data (README, "Duplicates"): both distances must be within these. dHash is
# the one that separates the look-alike corythosaurus/parasaurolophus renders (dHash 4-5 apart).
DEFAULT_PHASH_MAX = 8
DEFAULT_DHASH_MAX = 3

_CHUNK_CANDIDATES = 4_000_000  # candidate pairs verified per step: bounds memory at ~100 MB
_DENSE_TABLE_BITS = 22


@dataclass(frozen=True)
class DedupeItem:
    """What grouping needs to know about one readable file."""

    path: str
    sha256: str
    phash: int
    dhash: int
    pixels: int  # width * height: the largest copy is the one kept


@dataclass(frozen=True)
class Assignment:
    """A file's place in a duplicate group (files in no group get none)."""

    path: str
    group: int
    duplicate_of: str | None  # None for the kept file
    kind: str | None  # "exact" (same bytes as the kept file) or "near"


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BYTE_POPCOUNT[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)


def _block_layout(n: int, d: int) -> tuple[int, int]:
    """Pick (blocks, radius per block) that minimises lookups plus expected candidates."""
    best = None
    for m in range(1, min(d + 1, 16) + 1):
        bits = 64 // m
        r = d // m
        masks = sum(_comb(bits, k) for k in range(r + 1))
        cost = m * masks * n * (1 + n / 2.0 ** bits)
        if best is None or cost < best[0]:
            best = (cost, m, r)
    return best[1], best[2]


def _comb(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for k in range(1, radius + 1):
        masks.extend(sum(1 << b for b in combo) for combo in itertools.combinations(range(bits), k))
    return np.array(masks, dtype=np.uint64)


def near_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair (i, j), i < j, with Hamming distance <= max_distance, as a (K, 2) int64 array."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2 or max_distance < 0:
        return np.empty((0, 2), dtype=np.int64)
    max_distance = min(max_distance, 64)
    m, r = _block_layout(n, max_distance)
    found = []
    for start, bits in _blocks(m):
        keys = ((h >> np.uint64(start)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        found.append(_pairs_for_block(h, keys, bits, _flip_masks(bits, r), max_distance))
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    if len(pairs) == 0:
        return pairs
    flat = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([flat // n, flat % n], axis=1)


def _blocks(m: int) -> list[tuple[int, int]]:
    """(start bit, width) of m blocks that tile 64 bits as evenly as possible."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    starts = np.cumsum([0] + widths[:-1])
    return list(zip(starts.tolist(), widths))


def _pairs_for_block(h: np.ndarray, keys: np.ndarray, bits: int, masks: np.ndarray, d: int) -> np.ndarray:
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if bits <= _DENSE_TABLE_BITS:
        counts_all = np.bincount(keys, minlength=1 << bits)
        starts_all = np.concatenate([[0], np.cumsum(counts_all)[:-1]])

        def lookup(q):
            return starts_all[q], counts_all[q]
    else:
        def lookup(q):
            lo = np.searchsorted(sorted_keys, q, side="left")
            return lo, np.searchsorted(sorted_keys, q, side="right") - lo
    out = []
    idx = np.arange(len(h), dtype=np.int64)
    for mask in masks.astype(np.int64):
        starts, counts = lookup(keys ^ mask)
        has = np.nonzero(counts)[0]
        out.extend(_expand(h, order, idx[has], starts[has], counts[has], d))
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)


def _expand(h, order, items, starts, counts, d) -> list[np.ndarray]:
    """Candidate pairs (item, member of its bucket), verified by full Hamming distance, in chunks."""
    out = []
    cum = np.cumsum(counts)
    lo = 0
    while lo < len(items):
        base = cum[lo - 1] if lo else 0
        hi = int(np.searchsorted(cum, base + _CHUNK_CANDIDATES, side="right"))
        hi = max(hi, lo + 1)
        c = counts[lo:hi]
        i = np.repeat(items[lo:hi], c)
        offsets = np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c)
        j = order[np.repeat(starts[lo:hi], c) + offsets]
        keep = j > i
        i, j = i[keep], j[keep]
        keep = popcount64(h[i] ^ h[j]) <= d
        out.append(np.stack([i[keep], j[keep]], axis=1))
        lo = hi
    return out


def _find(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def linked_components(items: Sequence[DedupeItem], phash_max: int, dhash_max: int) -> list[list[DedupeItem]]:
    """Components (of two or more) of items connected by exact copies or near links, chains
    included: what must stay together in one split. Identical hash pairs are collapsed first, so
    a thousand blank pictures cost one index entry, not a million candidate pairs."""
    pairs_of = {}
    for item in items:
        pairs_of.setdefault((item.phash, item.dhash), []).append(item)
    keys = list(pairs_of)
    parent = list(range(len(keys)))
    ph = np.array([k[0] for k in keys], dtype=np.uint64)
    dh = np.array([k[1] for k in keys], dtype=np.uint64)
    # index the hash with the tighter limit (fewer candidates), then check the other
    (a, a_max), (b, b_max) = sorted([(ph, phash_max), (dh, dhash_max)], key=lambda t: t[1])
    links = near_pairs(a, a_max)
    if len(links):
        links = links[popcount64(b[links[:, 0]] ^ b[links[:, 1]]) <= b_max]
    for x, y in links.tolist():
        rx, ry = _find(parent, x), _find(parent, y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    by_sha: dict[str, int] = {}  # exact copies always share a component (their hashes are equal anyway)
    for index, key in enumerate(keys):
        for item in pairs_of[key]:
            first = by_sha.setdefault(item.sha256, index)
            rx, ry = _find(parent, first), _find(parent, index)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    components: dict[int, list[DedupeItem]] = {}
    for index, key in enumerate(keys):
        components.setdefault(_find(parent, index), []).extend(pairs_of[key])
    return [c for c in components.values() if len(c) > 1]


def _stars(members: list[DedupeItem], phash_max: int, dhash_max: int) -> list[list[DedupeItem]]:
    """Split a component into groups whose every member is directly within the limits of the kept
    (largest, then first-path) file: A~B and B~C never make C a duplicate of A on their own."""
    remaining = sorted(members, key=lambda x: (-x.pixels, x.path))
    groups = []
    while len(remaining) > 1:
        keeper, rest = remaining[0], remaining[1:]
        near = [x for x in rest if x.sha256 == keeper.sha256 or (
            _hamming(x.phash, keeper.phash) <= phash_max and _hamming(x.dhash, keeper.dhash) <= dhash_max)]
        if near:
            groups.append([keeper] + near)
        taken = {id(x) for x in near}
        remaining = [x for x in rest if id(x) not in taken]
    return groups


def group_duplicates(items: Sequence[DedupeItem], *, phash_max: int = DEFAULT_PHASH_MAX,
                     dhash_max: int = DEFAULT_DHASH_MAX) -> list[Assignment]:
    """Group exact copies and near duplicates (pHash AND dHash within their limits) around the
    largest file of each group, which is kept; every other member is directly near it."""
    if not items:
        return []
    groups = [g for comp in linked_components(items, phash_max, dhash_max)
              for g in _stars(comp, phash_max, dhash_max)]
    groups.sort(key=lambda g: min(x.path for x in g))
    out = []
    for number, members in enumerate(groups):
        keeper = members[0]
        for x in sorted(members, key=lambda x: x.path):
            if x is keeper:
                out.append(Assignment(x.path, number, None, None))
            else:
                kind = DUPLICATE_EXACT if x.sha256 == keeper.sha256 else DUPLICATE_NEAR
                out.append(Assignment(x.path, number, keeper.path, kind))
    return out
