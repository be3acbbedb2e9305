"""Near pairs equal brute force; groups keep the largest image and never chain through a miss."""

from __future__ import annotations

import numpy as np
import pytest

from dinobatch.dedupe.groups import (
    Assignment,
    DedupeItem,
    group_among,
    group_arrays,
    group_duplicates,
    hashes_from_hex,
    linked_components,
    near_pairs,
    popcount64,
)


def brute_force(h: np.ndarray, d: int) -> np.ndarray:
    """The definition: every pair i < j, in order, compared directly."""
    h = np.asarray(h, dtype=np.uint64)
    out = [np.empty((0, 2), dtype=np.int64)]
    for i in range(len(h) - 1):
        js = np.nonzero(popcount64(h[i] ^ h[i + 1:]) <= d)[0] + i + 1
        out.append(np.stack([np.full(len(js), i), js], axis=1).astype(np.int64))
    return np.concatenate(out)


def clustered(rng, n, spread, centres=None):
    """Copies of a few random centres, each with up to `spread` random bits flipped."""
    centres = rng.integers(0, 2**64 - 1, size=centres or max(1, n // 8), dtype=np.uint64, endpoint=True)
    h = centres[rng.integers(0, len(centres), size=n)]
    for _ in range(spread):
        bit = rng.integers(0, 64, size=n).astype(np.uint64)
        h ^= (np.uint64(1) << bit) * (rng.random(n) < 0.5).astype(np.uint64)
    return h


METHODS = ["auto", "index", "brute"]

INPUTS = {
    "random": lambda rng: rng.integers(0, 2**64 - 1, size=700, dtype=np.uint64, endpoint=True),
    "clustered": lambda rng: clustered(rng, 600, spread=5),
    "few-centres": lambda rng: clustered(rng, 500, spread=3, centres=4),
    "many-equal": lambda rng: rng.choice(rng.integers(0, 2**64 - 1, size=6, dtype=np.uint64), size=400),
    "equal-and-near": lambda rng: np.repeat(clustered(rng, 120, spread=2, centres=10), 3),
    "all-zero": lambda rng: np.zeros(200, dtype=np.uint64),
    "all-ones": lambda rng: np.full(150, 0xFFFFFFFFFFFFFFFF, dtype=np.uint64),
    "top-bit-set": lambda rng: rng.integers(2**63, 2**64 - 1, size=500, dtype=np.uint64, endpoint=True),
    "low-bits-only": lambda rng: rng.integers(0, 2**10, size=600).astype(np.uint64),  # one crowded bucket
    "high-bits-only": lambda rng: rng.integers(0, 2**10, size=600).astype(np.uint64) << np.uint64(54),
    "one-bit-steps": lambda rng: np.array([0, 1, 3, 7, 15, 31, 63, 127, 255, 2**63, 2**64 - 1],
                                          dtype=np.uint64),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", [0, 1, 3, 8, 10, 16])
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_near_pairs_equals_brute_force(kind, d, method):
    h = INPUTS[kind](np.random.default_rng(d))
    assert np.array_equal(near_pairs(h, d, method=method), brute_force(h, d))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 40, 1500])
@pytest.mark.parametrize("d", [0, 2, 5, 12, 40, 63, 64, 65, 200])
def test_near_pairs_equals_brute_force_at_any_size_and_distance(n, d):
    rng = np.random.default_rng(n * 1000 + d)
    h = clustered(rng, n, spread=d % 7) if n else np.empty(0, dtype=np.uint64)
    expected = brute_force(h, min(d, 64))
    for method in METHODS:
        got = near_pairs(h, d, method=method)
        assert got.dtype == np.int64 and got.shape == expected.shape
        assert np.array_equal(got, expected), method


def test_near_pairs_finds_every_pair_in_a_bucket_too_big_for_one_step():
    # 3000 hashes that differ only in their low 12 bits share every other block: 4.5 million
    # candidate pairs in one bucket, more than one verification step holds
    h = np.random.default_rng(5).permutation(2**12)[:3000].astype(np.uint64) | np.uint64(0xABCDEF << 30)
    assert np.array_equal(near_pairs(h, 3, method="index"), brute_force(h, 3))


@pytest.mark.parametrize("d", [3, 8])
def test_near_pairs_finds_planted_pairs_among_many_hashes(d):
    # 150,000 random hashes (more probers than one probe step, and threads) and 300 copies of
    # some of them with up to d bits flipped. At d = 3, random hashes are never this close (the
    # chance is ~1e-5); at d = 8 a few may be, and each reported pair must then be genuine.
    rng = np.random.default_rng(d)
    base = rng.integers(0, 2**64 - 1, size=150_000, dtype=np.uint64, endpoint=True)
    sources = rng.choice(len(base), size=300, replace=False)
    copies = base[sources].copy()
    for k in range(len(copies)):
        for bit in rng.choice(64, size=rng.integers(0, d + 1), replace=False):
            copies[k] ^= np.uint64(1) << np.uint64(bit)
    h = np.concatenate([base, copies])
    planted = {(int(s), len(base) + k) for k, s in enumerate(sources)}
    before = h.copy()
    got = near_pairs(h, d)
    assert np.array_equal(h, before)  # the caller's array is left as it was
    assert planted <= set(map(tuple, got.tolist()))
    assert np.all(popcount64(h[got[:, 0]] ^ h[got[:, 1]]) <= d)
    assert np.all(np.diff(got[:, 0] * len(h) + got[:, 1]) > 0)  # sorted by (i, j), no repeats
    if d == 3:
        assert set(map(tuple, got.tolist())) == planted


def test_near_pairs_accepts_python_ints_above_2_63():
    h = [2**64 - 1, 2**63, 2**64 - 2, 5]
    assert near_pairs(h, 1).tolist() == [[0, 2]]
    assert near_pairs(h, 62).tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]  # (0, 1) and (2, 3) are 63 apart


def test_near_pairs_of_tiny_inputs_and_negative_distances():
    assert near_pairs(np.array([], dtype=np.uint64), 5).shape == (0, 2)
    assert near_pairs(np.array([7], dtype=np.uint64), 5).shape == (0, 2)
    assert near_pairs(np.array([7, 7], dtype=np.uint64), 0).tolist() == [[0, 1]]
    assert near_pairs(np.array([7, 7], dtype=np.uint64), -1).shape == (0, 2)


def test_near_pairs_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="method"):
        near_pairs(np.zeros(3, dtype=np.uint64), 1, method="fast")


def item(path, sha, ph, dh, pixels=100):
    return DedupeItem(path, sha, ph, dh, pixels)


def test_exact_copies_group_and_the_largest_then_first_path_is_kept():
    groups = {a.path: a for a in group_duplicates([
        item("b.jpg", "s1", 0, 0), item("a.jpg", "s1", 0, 0), item("z.png", "s2", 2**40 - 1, 2**40 - 1, pixels=50),
    ])}
    assert groups["a.jpg"].duplicate_of is None
    assert groups["b.jpg"].duplicate_of == "a.jpg" and groups["b.jpg"].kind == "exact"
    assert "z.png" not in groups


def test_near_duplicates_need_both_hashes_within_limits():
    base = 0x0F0F0F0F0F0F0F0F
    items = [
        item("big.png", "s1", base, base, pixels=400),
        item("small.jpg", "s2", base ^ 0b11, base ^ 0b1, pixels=100),  # pHash 2, dHash 1 -> near
        item("lookalike.jpg", "s3", base ^ 0b11, base ^ 0b11111, pixels=100),  # dHash 5: the trap
    ]
    groups = {a.path: a for a in group_duplicates(items, phash_max=8, dhash_max=3)}
    assert groups["small.jpg"].duplicate_of == "big.png" and groups["small.jpg"].kind == "near"
    assert "lookalike.jpg" not in groups


def test_a_group_has_one_kept_file_and_all_others_point_to_it():
    items = [item(f"{i}.jpg", f"s{i}", 1 << i, 0, pixels=i) for i in range(5)]
    assignments = group_duplicates(items, phash_max=2, dhash_max=0)
    kept = [a for a in assignments if a.duplicate_of is None]
    assert len(kept) == 1 and kept[0].path == "4.jpg"
    assert {a.duplicate_of for a in assignments if a.duplicate_of} == {"4.jpg"}


def test_near_links_do_not_chain_a_file_onto_a_keeper_it_is_not_near():
    base = 0
    items = [
        item("a.png", "s1", base, 0, pixels=300),
        item("b.png", "s2", base ^ 0b1111, 0, pixels=200),  # pHash 4 from a
        item("c.png", "s3", base ^ 0b11111111 << 4 | 0b1111, 0, pixels=100),  # 8 from b, 12 from a
    ]
    groups = {a.path: a for a in group_duplicates(items, phash_max=8, dhash_max=3)}
    assert groups["b.png"].duplicate_of == "a.png"
    assert "c.png" not in groups  # it is near b, but b is not kept, and it is not near a


def test_thousands_of_identical_hashes_group_quickly_into_one():
    items = [item(f"{i:05d}.png", f"s{i}", 0, 0, pixels=1) for i in range(20_000)]
    assignments = group_duplicates(items)
    assert len(assignments) == 20_000
    assert {a.duplicate_of for a in assignments} == {None, "00000.png"}


def _reference_groups(items, phash_max, dhash_max):
    """group_duplicates as it was written over DedupeItem objects (before group_arrays): the reference."""
    def hamming(a, b):
        return (a ^ b).bit_count()

    groups = []
    for comp in linked_components(items, phash_max, dhash_max):
        remaining = sorted(comp, key=lambda x: (-x.pixels, x.path))
        while len(remaining) > 1:
            keeper, rest = remaining[0], remaining[1:]
            near = [x for x in rest if x.sha256 == keeper.sha256 or (
                hamming(x.phash, keeper.phash) <= phash_max and hamming(x.dhash, keeper.dhash) <= dhash_max)]
            if near:
                groups.append([keeper] + near)
            taken = {id(x) for x in near}
            remaining = [x for x in rest if id(x) not in taken]
    groups.sort(key=lambda g: min(x.path for x in g))
    out = []
    for number, members in enumerate(groups):
        keeper = members[0]
        for x in sorted(members, key=lambda x: x.path):
            if x is keeper:
                out.append(Assignment(x.path, number, None, None))
            else:
                out.append(Assignment(x.path, number, keeper.path, "exact" if x.sha256 == keeper.sha256 else "near"))
    return out


def _clustered_items(seed, n):
    """n items around a few base hashes: exact copies, near and not-quite-near variants, chains,
    ties in size, and hashes above 2**63, in shuffled (not path) order."""
    rng = np.random.default_rng(seed)
    bases = [int(b) for b in rng.integers(0, 2**64 - 1, size=max(1, n // 8), dtype=np.uint64)]
    items = []
    for i in range(n):
        base = bases[rng.integers(len(bases))]
        ph, dh = base, base ^ 0xFF
        for _ in range(rng.integers(0, 6)):
            ph ^= 1 << int(rng.integers(64))
        for _ in range(rng.integers(0, 3)):
            dh ^= 1 << int(rng.integers(64))
        sha = f"s{i}"
        if items and rng.random() < 0.2:  # an exact copy of an earlier item
            twin = items[rng.integers(len(items))]
            sha, ph, dh = twin.sha256, twin.phash, twin.dhash
        items.append(DedupeItem(f"{rng.integers(10**6):07d}-{i}.jpg", sha, ph, dh, int(rng.integers(1, 4)) * 100))
    return items


@pytest.mark.parametrize("seed", range(20))
def test_array_grouping_gives_the_same_groups_as_the_object_based_reference(seed):
    items = _clustered_items(seed, 300)
    for phash_max, dhash_max in [(8, 3), (4, 1), (0, 0), (12, 6)]:
        expected = _reference_groups(items, phash_max, dhash_max)
        assert group_duplicates(items, phash_max=phash_max, dhash_max=dhash_max) == expected
        assert any(a.kind == "near" for a in expected) or (phash_max, dhash_max) == (0, 0)


def test_group_arrays_points_each_duplicate_at_its_kept_item_by_index():
    # in path order: 0 and 2 are the same content, 1 is near 2 but larger, 3 stands alone
    groups = group_arrays(np.array([7, 8, 7, 9]), np.array([0, 1, 0, 2**64 - 1], np.uint64),
                          np.array([0, 0, 0, 2**64 - 1], np.uint64), np.array([10, 50, 10, 10]))
    assert groups.group.tolist() == [0, 0, 0, -1]
    assert groups.keeper.tolist() == [1, -1, 1, -1]
    assert groups.exact.tolist() == [False, False, False, False]


@pytest.mark.parametrize("seed", range(8))
def test_array_union_find_labels_each_node_with_the_smallest_node_it_reaches(seed):
    from dinobatch.dedupe.groups import _smallest_connected

    rng = np.random.default_rng(seed)
    n = 400
    a, b = rng.integers(0, n, size=(2, int(rng.integers(0, 500))))
    chain = rng.permutation(n)[:60]  # a long path in shuffled node order: many hooks per round
    a, b = np.concatenate([a, chain[:-1]]), np.concatenate([b, chain[1:]])
    neighbours = {i: set() for i in range(n)}
    for x, y in zip(a.tolist(), b.tolist()):
        neighbours[x].add(y)
        neighbours[y].add(x)
    expected = list(range(n))
    for start in range(n):  # breadth-first from each node, in ascending order: the first to reach wins
        if expected[start] == start:
            seen, todo = {start}, [start]
            while todo:
                for y in neighbours[todo.pop()] - seen:
                    seen.add(y)
                    todo.append(y)
            for y in seen:
                expected[y] = min(expected[y], start)
    assert _smallest_connected(n, a, b).tolist() == expected


def test_group_among_leaves_the_others_out_and_keeps_indices_of_all_items():
    """Files in error are left out of grouping; groups and keepers are given over every file."""
    h = np.uint64(0x0F0F0F0F0F0F0F0F)
    among = np.array([1, 3, 4])  # items 0 and 2 (in error) are not grouped
    groups = group_among(5, among, np.array([0, 0, 1]), np.array([h, h, h]), np.array([h, h, h ^ np.uint64(1)]),
                         np.array([10, 20, 10]))
    assert groups.group.tolist() == [-1, 0, -1, 0, 0]
    assert groups.keeper.tolist() == [-1, 3, -1, -1, 3]  # the largest (item 3) is kept
    assert groups.exact.tolist() == [False, True, False, False, False]


def test_group_among_takes_unsigned_indices_as_arrow_sort_indices_are():
    """pyarrow's sort_indices (the path order classify passes) is uint64 on some versions: grouping
    must not overflow writing -1 for the keepers themselves (a CUDA run died there on 2026-12-04)."""
    h = np.uint64(0x0F0F0F0F0F0F0F0F)
    among = np.array([1, 3, 4], dtype=np.uint64)
    groups = group_among(5, among, np.array([0, 0, 1]), np.array([h, h, h]), np.array([h, h, h]),
                         np.array([10, 20, 10]))
    assert groups.keeper.tolist() == [-1, 3, -1, -1, 3]


def test_hashes_from_hex_reads_back_every_64_bit_hash_and_refuses_what_is_not_one():
    values = [0, 1, 2**63, 2**64 - 1] + [int(v) for v in np.random.default_rng(0).integers(0, 2**64, 100, np.uint64)]
    texts = [f"{v:016x}" for v in values]
    assert hashes_from_hex(texts).tolist() == values
    assert hashes_from_hex(["00000000000000AB"]).tolist() == [0xAB]
    assert hashes_from_hex([]).dtype == np.uint64
    for bad in ("abc", "0" * 17, "g" * 16, ""):
        with pytest.raises(ValueError):
            hashes_from_hex(["0" * 16, bad])
