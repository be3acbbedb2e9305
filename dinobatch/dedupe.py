"""Exact and near-duplicate grouping: pure functions over stored hashes, no image access.

Near pairs come from hamming.near_pairs (re-exported here), identical to comparing all pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .hamming import near_pairs, popcount64
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
