"""Near pairs equal brute force; groups keep the largest image and never chain through a miss."""

from __future__ import annotations

import numpy as np
import pytest

from dinobatch.dedupe import DedupeItem, group_duplicates, near_pairs, popcount64


def brute_force(h: np.ndarray, d: int) -> np.ndarray:
    out = []
    for i in range(len(h) - 1):
        js = np.nonzero(popcount64(h[i] ^ h[i + 1:]) <= d)[0] + i + 1
        out.extend((i, int(j)) for j in js)
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def clustered(rng, n, spread):
    centres = rng.integers(0, 2**63, size=max(1, n // 8), dtype=np.uint64)
    h = np.repeat(centres, 8)[:n].copy()
    for _ in range(spread):
        bit = rng.integers(0, 64, size=n).astype(np.uint64)
        h ^= (np.uint64(1) << bit) * (rng.random(n) < 0.5).astype(np.uint64)
    return h


@pytest.mark.parametrize("d", [0, 1, 3, 6, 10, 16])
def test_near_pairs_equals_brute_force_on_clustered_hashes(d):
    rng = np.random.default_rng(d)
    h = clustered(rng, 600, spread=5)
    assert np.array_equal(near_pairs(h, d), brute_force(h, d))


@pytest.mark.parametrize("make", [
    lambda rng: np.zeros(200, dtype=np.uint64),
    lambda rng: np.full(150, 0xFFFFFFFFFFFFFFFF, dtype=np.uint64),
    lambda rng: rng.integers(0, 2**64 - 1, size=500, dtype=np.uint64),
    lambda rng: np.array([0, 1, 3, 7, 15, 31, 63, 127, 255, 2**63], dtype=np.uint64),
], ids=["all-zero", "all-ones", "random", "one-bit-steps"])
@pytest.mark.parametrize("d", [0, 3, 8, 64])
def test_near_pairs_equals_brute_force_on_adversarial_inputs(make, d):
    h = make(np.random.default_rng(1))
    assert np.array_equal(near_pairs(h, d), brute_force(h, d))


def test_near_pairs_of_tiny_inputs():
    assert near_pairs(np.array([], dtype=np.uint64), 5).shape == (0, 2)
    assert near_pairs(np.array([7], dtype=np.uint64), 5).shape == (0, 2)


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
