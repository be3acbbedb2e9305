"""Exact and near-duplicate grouping: pure functions over stored hashes, no image access.

Near pairs come from hamming.near_pairs (re-exported here), identical to comparing all pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dinobatch.dedupe import DEFAULT_DHASH_MAX, DEFAULT_PHASH_MAX
from dinobatch.dedupe.hamming import near_pairs, popcount64
from dinobatch.schema import DUPLICATE_EXACT, DUPLICATE_NEAR

__all__ = [
    "DEFAULT_PHASH_MAX",
    "DEFAULT_DHASH_MAX",
    "DedupeItem",
    "Assignment",
    "Groups",
    "group_arrays",
    "group_among",
    "popcount64",
    "near_pairs",
    "group_duplicates",
    "linked_components",
    "hashes_from_hex",
]


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


def linked_components(items: Sequence[DedupeItem], phash_max: int, dhash_max: int) -> list[list[DedupeItem]]:
    """Components (of two or more) of items connected by exact copies or near links, chains
    included: what must stay together in one split. Components come in the order of their first
    item, each in items' order (the labels of _component_labels, as DedupeItem lists)."""
    if len(items) < 2:
        return []
    content_ids: dict[str, int] = {}
    content = np.array([content_ids.setdefault(x.sha256, len(content_ids)) for x in items], np.int64)
    labels = _component_labels(content, np.array([x.phash for x in items], np.uint64),
                               np.array([x.dhash for x in items], np.uint64), phash_max, dhash_max)
    components: dict[int, list[DedupeItem]] = {}
    for label, item in zip(labels.tolist(), items):
        components.setdefault(label, []).append(item)
    return [c for c in components.values() if len(c) > 1]


_HEX_VALUE = np.full(256, 255, np.uint8)  # each ASCII code's value as a hex digit; 255: not one
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def hashes_from_hex(texts: Sequence[str]) -> np.ndarray:
    """64-bit hashes written as 16 hex digits (imaging.decode's phash and dhash, as the rows and the
    cache store them) as uint64: the one way back from the text, vectorised (no int() per hash)."""
    raw = np.array(texts, dtype="S17") if len(texts) else np.zeros(0, "S17")  # a 17th byte: too long
    codes = raw.view(np.uint8).reshape(-1, 17)
    digits = _HEX_VALUE[codes[:, :16]]
    if (digits == 255).any() or codes[:, 16].any():
        bad = next(t for t in texts if len(t) != 16 or not all(c in "0123456789abcdefABCDEF" for c in t))
        raise ValueError(f"not a 64-bit hash in hex (16 digits): {bad!r}")
    octets = (digits[:, 0::2] << 4) | digits[:, 1::2]
    return octets.view(">u8").reshape(-1).astype(np.uint64)


@dataclass(frozen=True)
class Groups:
    """Duplicate groups over n items, as arrays aligned with them (what group_arrays returns)."""

    group: np.ndarray  # int64: group number, -1 for an item in no group
    keeper: np.ndarray  # int64: index of the kept item of its group; -1 for a kept item or one in no group
    exact: np.ndarray  # bool: same content as its kept item (False where keeper is -1)


def _component_labels(content: np.ndarray, phash: np.ndarray, dhash: np.ndarray, phash_max: int,
                      dhash_max: int) -> np.ndarray:
    """Per item, a label shared by exactly the items of its component (exact copies or near links,
    chains included). Identical hash pairs are collapsed first, so a thousand blank pictures cost
    one index entry, not a million candidate pairs."""
    keys, key_of = np.unique(np.stack([phash, dhash], axis=1), axis=0, return_inverse=True)
    key_of = key_of.reshape(-1)
    (a, a_max), (b, b_max) = sorted([(keys[:, 0], phash_max), (keys[:, 1], dhash_max)], key=lambda t: t[1])
    links = near_pairs(a, a_max)
    if len(links):
        links = links[popcount64(b[links[:, 0]] ^ b[links[:, 1]]) <= b_max]
    _, first, content_of = np.unique(content, return_index=True, return_inverse=True)
    copies = np.stack([key_of[first[content_of.reshape(-1)]], key_of], axis=1)  # each item to its content's first
    copies = copies[copies[:, 0] != copies[:, 1]]
    edges = np.concatenate([links, copies]) if len(copies) else links
    return _smallest_connected(len(keys), edges[:, 0], edges[:, 1])[key_of]


def _smallest_connected(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each of n nodes, the smallest node connected to it through the edges (a[k], b[k]).

    Union-find done with arrays (hook each edge's larger root under its smaller one, then
    flatten every chain), so that millions of near links cost 16 bytes each, not a Python list."""
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]  # roots: parent is flat here
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]  # joined edges never matter again
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while not np.array_equal(grand := parent[parent], parent):  # every chain to its root
            parent = grand
    return parent


def _star_groups(members: np.ndarray, content: np.ndarray, phash: np.ndarray, dhash: np.ndarray,
                 pixels: np.ndarray, phash_max: int, dhash_max: int) -> list[np.ndarray]:
    """Split a component into groups whose every member is directly within the limits of the kept
    (largest, then first) item, listed first: A~B and B~C never make C a duplicate of A on their own."""
    remaining = members[np.lexsort((members, -pixels[members]))]
    groups = []
    while len(remaining) > 1:
        keeper, rest = remaining[0], remaining[1:]
        near = (content[rest] == content[keeper]) | ((popcount64(phash[rest] ^ phash[keeper]) <= phash_max)
                                                    & (popcount64(dhash[rest] ^ dhash[keeper]) <= dhash_max))
        if near.any():
            groups.append(np.concatenate([[keeper], rest[near]]))
        remaining = rest[~near]
    return groups


def group_arrays(content: np.ndarray, phash: np.ndarray, dhash: np.ndarray, pixels: np.ndarray, *,
                 phash_max: int = DEFAULT_PHASH_MAX, dhash_max: int = DEFAULT_DHASH_MAX) -> Groups:
    """group_duplicates over items given in path order as arrays (content: equal for equal sha256;
    64-bit hashes; width * height), so a folder of any size costs no Python object per file."""
    content, pixels = np.asarray(content), np.asarray(pixels, dtype=np.int64)
    phash, dhash = np.asarray(phash, dtype=np.uint64), np.asarray(dhash, dtype=np.uint64)
    n = len(content)
    result = Groups(np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(n, bool))
    if n < 2:
        return result
    labels = _component_labels(content, phash, dhash, phash_max, dhash_max)
    linked = np.flatnonzero(np.bincount(labels)[labels] > 1)
    linked = linked[np.argsort(labels[linked], kind="stable")]
    groups = [g for comp in np.split(linked, np.flatnonzero(np.diff(labels[linked])) + 1) if len(comp)
              for g in _star_groups(comp, content, phash, dhash, pixels, phash_max, dhash_max)]
    groups.sort(key=lambda g: g.min())  # numbered in the order of their first path
    for number, members in enumerate(groups):
        keeper, others = members[0], members[1:]
        result.group[members] = number
        result.keeper[others] = keeper
        result.exact[others] = content[others] == content[keeper]
    return result


def group_among(n: int, among: np.ndarray, content: np.ndarray, phash: np.ndarray, dhash: np.ndarray,
                pixels: np.ndarray, *, phash_max: int = DEFAULT_PHASH_MAX, dhash_max: int = DEFAULT_DHASH_MAX) -> Groups:
    """group_arrays over the items `among` (indices of n items, in path order; the other arrays
    aligned with `among`), as Groups over all n: items left out are in no group, and keeper holds
    an index of the n items (classify and scan leave out the files in error)."""
    among = np.asarray(among, dtype=np.int64)  # Arrow's sort indices are uint64, where -1 cannot go
    found = group_arrays(content, phash, dhash, pixels, phash_max=phash_max, dhash_max=dhash_max)
    groups = Groups(np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(n, bool))
    groups.group[among], groups.exact[among] = found.group, found.exact
    groups.keeper[among] = np.where(found.keeper >= 0, among[np.maximum(found.keeper, 0)], -1)
    return groups


def group_duplicates(items: Sequence[DedupeItem], *, phash_max: int = DEFAULT_PHASH_MAX,
                     dhash_max: int = DEFAULT_DHASH_MAX) -> list[Assignment]:
    """Group exact copies and near duplicates (pHash AND dHash within their limits) around the
    largest file of each group, which is kept; every other member is directly near it."""
    items = sorted(items, key=lambda x: x.path)
    content_ids: dict[str, int] = {}
    groups = group_arrays(np.array([content_ids.setdefault(x.sha256, len(content_ids)) for x in items], np.int64),
                          np.array([x.phash for x in items], np.uint64), np.array([x.dhash for x in items], np.uint64),
                          np.array([x.pixels for x in items], np.int64), phash_max=phash_max, dhash_max=dhash_max)
    out = []
    for i in np.lexsort((np.arange(len(items)), groups.group)):
        if groups.group[i] >= 0:
            keeper = groups.keeper[i]
            kind = None if keeper < 0 else DUPLICATE_EXACT if groups.exact[i] else DUPLICATE_NEAR
            kept = items[keeper].path if keeper >= 0 else None
            out.append(Assignment(items[i].path, int(groups.group[i]), kept, kind))
    return out
