"""All pairs of 64-bit hashes within a Hamming distance, exactly, fast (multi-index hashing).

near_pairs finds every pair of 64-bit hashes within a Hamming distance d, exactly as comparing
all pairs would. Equal hashes are collapsed first (their pairs are written out at the end), then
the distinct ones are searched with multi-index hashing: the hash is cut into m blocks given
radii r_i with sum(r_i + 1) = d + 1, so by the pigeonhole principle a pair within d differs by
at most r_i bits on some block i. Each block has a dense table over its 2^width values (width
about log2 n, so a bucket holds about one item); every item probes, for each flip mask of up to
r_i bits, the bucket of its own block value XOR the mask, and the first item there is tested
inline with a vectorised popcount. A pair is probed from one side only and kept only by the
first block that finds it, so nothing needs deduplicating. A cost model picks the layout, or
plain all-pairs comparison where that is cheaper (few hashes, or large d).
"""
from __future__ import annotations

import functools
import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["near_pairs", "popcount64"]

_CHUNK = 1 << 16  # candidate pairs verified per step: its temporaries stay ~3 MB a thread (as fast as 1M)
_MAX_BLOCK_BITS = 22  # a block's dense tables: 2**22 slots * 17 bytes = 70 MB
_PARALLEL_MIN = 20_000  # distinct hashes below which threads cost more than they save
_BRUTE_CELLS = 1 << 18  # pairs compared per brute-force step: its buffers stay in cache
_MAX_WORKERS = 8
_PROBE_CHUNK = 1 << 16  # probers per vectorised step: its buffers stay in a core's cache
# cost model (ns, numpy 2.4 on one core of an AMD EPYC): picks the block layout or brute force
_NS_PER_PAIR = 1.5  # brute force, per pair compared
_NS_PER_PROBE = 3.0  # one prober's lookup under one mask
_NS_PER_CANDIDATE = 4.0  # one item found in a probed bucket (most are checked inline)
_NS_PER_STEP = 60_000.0  # Python and numpy call overhead of one probe step
_NS_PER_JOB = 300_000.0  # the same, per job (block, highest mask bit)
_NS_PER_SLOT = 5.0  # building one slot of a block's dense tables
_NS_PER_SORT = 100.0  # sorting one item by a block, and its share of the tables


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BYTE_POPCOUNT[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)


def near_pairs(hashes: np.ndarray, max_distance: int, *, method: str = "auto") -> np.ndarray:
    """Every pair (i, j), i < j, with Hamming distance <= max_distance, as a (K, 2) int64 array
    sorted by (i, j). method: "auto" (cost model), "index" or "brute"; all give the same pairs."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, not {method!r}")
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2 or max_distance < 0:
        return _no_pairs()
    d = min(int(max_distance), 64)
    if d == 64:
        return np.stack(np.triu_indices(n, 1), axis=1).astype(np.int64)
    groups = _EqualGroups.of(h)
    values = groups.values
    distinct = _no_pairs()
    if d > 0 and len(values) > 1:
        layout = None if method == "brute" else _choose_layout(len(values), d, method == "index")
        distinct = _brute_pairs(values, d) if layout is None else _indexed_pairs(values, d, layout)
    return groups.expand(distinct)


_METHODS = {"auto", "index", "brute"}


def _no_pairs() -> np.ndarray:
    """An empty (0, 2) pair array."""
    return np.empty((0, 2), dtype=np.int64)


@dataclass(frozen=True)
class _EqualGroups:
    """Items grouped by equal hash: the index works on distinct values only, so a thousand equal
    hashes cost one entry, and their pairs are written out once at the end."""

    values: np.ndarray  # distinct hashes
    members: np.ndarray  # item indices, grouped by value
    starts: np.ndarray  # members[starts[v]:starts[v + 1]] hold values[v]

    @classmethod
    def of(cls, h: np.ndarray) -> _EqualGroups:
        """Group the items of h by value."""
        if not np.any((ascending := np.sort(h))[1:] == ascending[:-1]):
            # all distinct, the usual case: keep item order and skip the slower argsort
            index = np.arange(len(h) + 1, dtype=np.intp)
            return cls(h, index[:-1], index)
        order = np.argsort(h)
        ordered = h[order]
        new = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
        starts = np.concatenate([[0], new, [len(h)]]).astype(np.intp)
        return cls(ordered[starts[:-1]], order.astype(np.intp), starts)

    def expand(self, distinct: np.ndarray) -> np.ndarray:
        """Item pairs, sorted, from near pairs of distinct values plus pairs of equal items."""
        n = len(self.members)
        sizes = np.diff(self.starts)
        if len(self.values) == n:  # all distinct: the common case needs no expansion
            i, j = self.members[distinct[:, 0]], self.members[distinct[:, 1]]
        else:
            # pairs within a group: each member with the members after it
            pos = np.arange(n, dtype=np.intp)
            ends = np.repeat(self.starts[1:], sizes)
            src, dst = _ranges(pos, pos + 1, ends)
            # pairs across near groups: every member of one with every member of the other
            a, b = distinct[:, 0], distinct[:, 1]
            pair, pa = _ranges(np.arange(len(a)), self.starts[a], self.starts[a + 1])
            pair, pb = _ranges(pa, self.starts[b[pair]], self.starts[b[pair] + 1])
            i = self.members[np.concatenate([src, pair])]
            j = self.members[np.concatenate([dst, pb])]
        flat = np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j)
        flat.sort()
        return np.stack([flat // n, flat % n], axis=1)


def _ranges(owner: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ranges [lo[k], hi[k]): (owner[k] repeated per element, the elements)."""
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.intp)
    shift = np.repeat(lo - (np.cumsum(counts) - counts), counts)
    return np.repeat(owner, counts), shift + np.arange(total, dtype=np.intp)


# ---- brute force: every pair, blockwise, for small inputs and distances too large to index


def _brute_pairs(values: np.ndarray, d: int) -> np.ndarray:
    """Near pairs of distinct values by comparing every pair, a cache-sized band of rows at a
    time; bands are dealt out in turn to the threads (the first bands are the longest)."""
    n = len(values)
    rows = max(1, _BRUTE_CELLS // n)
    firsts = range(0, n - 1, rows)
    stripes = min(_workers(), len(firsts)) if n >= _PARALLEL_MIN else 1
    def stripe(k: int) -> np.ndarray:
        return _brute_stripe(values, d, firsts[k::stripes], rows)

    return _concat(_map(stripe, range(stripes), stripes > 1))


def _brute_stripe(values: np.ndarray, d: int, firsts: range, rows: int) -> np.ndarray:
    """Near pairs (i, j), j > i, with i in the bands of rows starting at firsts."""
    n = len(values)
    x, small, ok = (np.empty(rows * n, dtype=dt) for dt in (np.uint64, np.uint8, bool))
    out = []
    for r0 in firsts:
        r1 = min(n - 1, r0 + rows)
        cols = n - r0 - 1
        size = (r1 - r0) * cols
        np.bitwise_xor(values[r0:r1, None], values[None, r0 + 1:], out=x[:size].reshape(r1 - r0, cols))
        hit = np.flatnonzero(np.less_equal(_popcount_into(x[:size], small[:size]), d, out=ok[:size]))
        a, c = np.divmod(hit, cols)
        keep = c >= a  # column c is item r0 + 1 + c, row a is item r0 + a: keep j > i
        out.append(np.stack([a[keep] + r0, c[keep] + r0 + 1], axis=1).astype(np.int64))
    return _concat(out)


# ---- multi-index hashing


@dataclass(frozen=True)
class _Block:
    """A run of bits [start, start + width) searched to within radius bits."""

    start: int
    width: int
    radius: int

    def bits(self, h: np.ndarray) -> np.ndarray:
        """This block of each hash, as an index."""
        return ((h >> np.uint64(self.start)) & np.uint64((1 << self.width) - 1)).astype(np.intp)

    def mask64(self) -> np.uint64:
        """The block's bits within a hash."""
        return np.uint64(((1 << self.width) - 1) << self.start)


def _layout(m: int, d: int, extra_to_narrow: bool) -> tuple[_Block, ...]:
    """Split 64 bits into m blocks and give them radii r with sum(r + 1) = d + 1, so by the
    pigeonhole principle a pair within d differs by at most r bits on at least one block
    (a block with radius -1 is not searched at all)."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]  # the widest first
    units = d + 1
    radii = [units // m - 1 + (1 if i < units % m else 0) for i in range(m)]
    if extra_to_narrow:
        radii.reverse()
    starts = itertools.accumulate([0] + widths[:-1])
    return tuple(_Block(s, w, r) for s, w, r in zip(starts, widths, radii) if r >= 0)


@functools.lru_cache(maxsize=256)
def _choose_layout(n: int, d: int, force: bool) -> tuple[_Block, ...] | None:
    """The cheapest block layout by the cost model, or None where comparing all pairs is cheaper."""
    best_cost, best = (math.inf if force else _NS_PER_PAIR * n * (n - 1) / 2), None
    for m in range(64 // _MAX_BLOCK_BITS + 1, 65):  # at least 3 blocks keeps each table small
        for extra_to_narrow in (False, True):
            layout = _layout(m, d, extra_to_narrow)
            cost = sum(_block_cost(n, b) for b in layout)
            if cost < best_cost:
                best_cost, best = cost, layout
    return best


def _block_cost(n: int, b: _Block) -> float:
    """Estimated ns to search one block (a rough fit of timings, enough to rank layouts): build
    its tables, probe with each mask from half the items, verify the items found."""
    masks = sum(math.comb(b.width, k) for k in range(1, b.radius + 1))
    probes = masks * n / 2
    candidates = (probes + n / 2) * n / 2 ** b.width  # items in the buckets probed, equal ones too
    build = _NS_PER_SORT * n + _NS_PER_SLOT * 2 ** b.width * (2 if masks else 1)
    work = _NS_PER_PROBE * probes + _NS_PER_CANDIDATE * candidates + _NS_PER_STEP * probes / _PROBE_CHUNK
    return build + _NS_PER_JOB * (1 + b.width * (masks > 0)) + work


@dataclass(frozen=True)
class _Table:
    """Hashes sorted by one block, with dense tables over every value the block can take."""

    block: _Block
    ids: np.ndarray  # distinct-value index at each sorted position
    keys: np.ndarray  # block value at each sorted position (ascending)
    values: np.ndarray  # hash at each sorted position
    starts: np.ndarray  # bucket k is positions starts[k]:starts[k + 1]
    first: np.ndarray  # hash of each bucket's first item; for an empty one, one far from the key
    full: np.ndarray  # bucket size capped at 2, as uint8 so it stays in cache

    @classmethod
    def build(cls, values: np.ndarray, block: _Block) -> _Table:
        """Sort every value by the block and fill the tables."""
        # sort (block value, index) packed in one uint64: numpy's SIMD sort beats argsort by 4x
        shift = np.uint64(max(1, (len(values) - 1).bit_length()))
        index = np.arange(len(values), dtype=np.uint64)
        packed = np.sort((block.bits(values).astype(np.uint64) << shift) | index)
        ids = (packed & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.intp)
        return cls.of_sorted(block, ids, (packed >> shift).astype(np.intp), values[ids])

    @classmethod
    def of_sorted(cls, block: _Block, ids: np.ndarray, keys: np.ndarray, values: np.ndarray) -> _Table:
        """Fill the tables for items already sorted by the block."""
        counts = np.bincount(keys, minlength=1 << block.width)
        starts = np.zeros(len(counts) + 1, dtype=np.intp)
        np.cumsum(counts, out=starts[1:])
        # an empty bucket holds its block value complemented: it all but never passes the
        # distance test, so the emptiness check runs only on the few that do
        first = np.arange(len(counts), dtype=np.uint64)
        np.invert(first, out=first)
        first &= np.uint64(len(counts) - 1)
        first <<= np.uint64(block.start)
        filled = np.flatnonzero(counts)
        first[filled] = values[starts[filled]]
        return cls(block, ids, keys, values, starts, first, np.minimum(counts, 2).astype(np.uint8))

    def overflow(self) -> _Table:
        """The items after the first of each bucket (those `first` cannot hold), as a table."""
        pos = np.flatnonzero(self.starts[self.keys] != np.arange(len(self.keys)))
        return _Table.of_sorted(self.block, self.ids[pos], self.keys[pos], self.values[pos])


def _indexed_pairs(values: np.ndarray, d: int, layout: tuple[_Block, ...]) -> np.ndarray:
    """Near pairs of distinct values by multi-index hashing. Each pair is reported once: by the
    first block on which it is within that block's radius, and there by one probe only."""
    parallel = len(values) >= _PARALLEL_MIN
    tables = _map(lambda block: _Table.build(values, block), layout, parallel)
    overflows = _map(lambda t: t.overflow() if t.block.radius else None, tables, parallel)
    jobs = [(k, p) for k, t in enumerate(tables) for p in range(-1, t.block.width if t.block.radius else 0)]
    jobs.sort(key=lambda job: -_job_size(tables[job[0]].block, job[1]))  # big first: threads end together
    found = _map(lambda job: _job_pairs(values, tables, overflows[job[0]], *job, d), jobs, parallel)
    return _concat(found)


def _job_size(block: _Block, p: int) -> int:
    """Passes a job makes: masks whose highest bit is p (p = -1: the equal-block job)."""
    return 2 if p < 0 else sum(math.comb(p, k) for k in range(block.radius))


def _job_pairs(values: np.ndarray, tables: list[_Table], over: _Table | None, k: int, p: int,
               d: int) -> np.ndarray:
    """Pairs found on block k by masks with highest bit p, minus those an earlier block finds."""
    a, b = _same_bucket(tables[k], d) if p < 0 else _flipped(tables[k], over, p, d)
    diff = values[a] ^ values[b]
    keep = np.ones(len(a), dtype=bool)
    for earlier in tables[:k]:
        keep &= popcount64(diff & earlier.block.mask64()) > earlier.block.radius
    a, b = a[keep], b[keep]
    return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64)


def _same_bucket(table: _Table, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Near pairs (as distinct-value indices) that share the block value."""
    pos = np.arange(len(table.keys), dtype=np.intp)
    ends = table.starts[table.keys + 1]
    crowded = np.flatnonzero(ends - pos > 1)
    a, b = _verify(table.values[crowded], table.ids[crowded], table, crowded + 1, ends[crowded], d)
    return a, table.ids[b]


def _flipped(table: _Table, over: _Table, p: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Near pairs whose block values differ by a mask with highest bit p. The member with bit p
    clear probes, so each pair is seen once, except where the member with bit p set is not first
    in its bucket (`first` holds only firsts): then that member probes, from the overflow table."""
    masks = _masks(p, table.block.radius)
    clear, over_clear = (table.keys >> p) & 1 == 0, (over.keys >> p) & 1 == 0
    a1, b1 = _probe(table, _Probers.of((table, clear), (over, ~over_clear)), masks, d, crowded=False)
    a2, b2 = _probe(over, _Probers.of((over, over_clear)), masks, d, crowded=True)
    return np.concatenate([a1, a2]), np.concatenate([b1, b2])


@dataclass(frozen=True)
class _Probers:
    """Items that probe a table: block values, hashes, distinct-value indices."""

    keys: np.ndarray
    values: np.ndarray
    ids: np.ndarray

    @classmethod
    def of(cls, *parts: tuple[_Table, np.ndarray]) -> _Probers:
        """The items of each table where its mask is set."""
        fields = ("keys", "values", "ids")
        return cls(*(np.concatenate([getattr(t, name)[sel] for t, sel in parts]) for name in fields))


def _probe(table: _Table, probers: _Probers, masks: np.ndarray, d: int,
           crowded: bool) -> tuple[np.ndarray, np.ndarray]:
    """Near pairs between probers and the items of table whose block value is the prober's
    flipped by a mask. crowded: also reach the items after the first of each bucket."""
    n = len(probers.keys)
    # a step probes up to _PROBE_CHUNK (mask, prober) pairs, many masks at once where probers are
    # few; its buffers, reused, stay in the core's cache and fault no fresh pages
    per_step = max(1, _PROBE_CHUNK // max(1, n))
    size = min(n, _PROBE_CHUNK) * min(per_step, len(masks))
    buffers = [np.empty(size, dtype=dt) for dt in (np.intp, np.uint64, np.uint8, bool)]
    found = [_probe_step(table, probers, lo, masks[m:m + per_step], d, crowded, buffers)
             for lo in range(0, n, _PROBE_CHUNK) for m in range(0, len(masks), per_step)]
    return _concat1([f[0] for f in found]), _concat1([f[1] for f in found])


def _probe_step(table: _Table, probers: _Probers, lo: int, masks: np.ndarray, d: int, crowded: bool,
                buffers: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Near pairs for probers lo.. under the given masks: the buckets' first items are tested
    inline, the rest of crowded buckets (with crowded) through _verify."""
    keys, values = probers.keys[lo:lo + _PROBE_CHUNK], probers.values[lo:lo + _PROBE_CHUNK]
    rows, size = len(keys), len(masks) * len(keys)
    t, x, small, ok = (b[:size] for b in buffers)
    np.bitwise_xor(keys[None, :], masks[:, None], out=t.reshape(-1, rows))
    np.take(table.first, t, out=x, mode="clip")  # always in range: clip only skips the check
    np.bitwise_xor(x.reshape(-1, rows), values[None, :], out=x.reshape(-1, rows))
    near = np.flatnonzero(np.less_equal(_popcount_into(x, small), d, out=ok))
    if len(near):
        near = near[table.full[t[near]] > 0]
    a, b = probers.ids[lo + near % rows], table.ids[table.starts[t[near]]]
    if not crowded:
        return a, b
    more = np.flatnonzero(np.greater(np.take(table.full, t, out=small, mode="clip"), 1, out=ok))
    more_a, more_t = lo + more % rows, t[more]
    c, pos = _verify(probers.values[more_a], probers.ids[more_a], table,
                     table.starts[more_t] + 1, table.starts[more_t + 1], d)
    return np.concatenate([a, c]), np.concatenate([b, table.ids[pos]])


def _popcount_into(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """popcount64 written into a uint8 buffer."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x, out=out)
    out[:] = popcount64(x)
    return out


def _masks(p: int, radius: int) -> np.ndarray:
    """Every mask of 1..radius bits whose highest set bit is p."""
    below = itertools.chain.from_iterable(itertools.combinations(range(p), k) for k in range(radius))
    return np.array([(1 << p) | sum(1 << b for b in bits) for bits in below], dtype=np.intp)


def _verify(values: np.ndarray, ids: np.ndarray, table: _Table, lo: np.ndarray, hi: np.ndarray,
            d: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (ids[k], each table position in [lo[k], hi[k]) whose item is within distance d),
    a bounded chunk of candidates at a time."""
    out_a, out_b = [], []
    for part in _chunks(hi - lo):
        k, pos = _ranges(np.arange(part.start, part.stop), lo[part], hi[part])
        ok = popcount64(values[k] ^ table.values[pos]) <= d
        out_a.append(ids[k[ok]])
        out_b.append(pos[ok])
    return _concat1(out_a), _concat1(out_b)


def _chunks(counts: np.ndarray) -> list[slice]:
    """Consecutive slices of counts, each summing to about _CHUNK (one big count stays whole)."""
    if len(counts) == 0:
        return []
    cum = np.cumsum(counts)
    cuts = np.searchsorted(cum, np.arange(_CHUNK, int(cum[-1]), _CHUNK), side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(counts)]])).tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Pair arrays stacked, or no pairs."""
    return np.concatenate(parts) if parts else _no_pairs()


def _concat1(parts: list[np.ndarray]) -> np.ndarray:
    """Index arrays joined, or an empty one."""
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.intp)


def _map(fn, items: list, parallel: bool) -> list:
    """fn over items, on a thread per core where it pays: numpy releases the GIL in array work."""
    workers = min(len(items), _workers()) if parallel else 1
    if workers < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _workers() -> int:
    """Threads to use: the cores this process may run on, capped."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cores or 1, _MAX_WORKERS)
