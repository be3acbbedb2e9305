"""Exact and near-duplicate groups from stored hashes: pure functions, no image access."""

__all__ = ["DEFAULT_PHASH_MAX", "DEFAULT_DHASH_MAX", "HASH_BITS"]

# The near-duplicate limits, here (numpy-free) so the command line's defaults cost no import; groups
# re-exports them. Chosen on the development set (docs/duplicates.md): both distances must be within these.
# dHash is the one that separates the look-alike corythosaurus/parasaurolophus renders (dHash 4-5 apart).
DEFAULT_PHASH_MAX = 8
DEFAULT_DHASH_MAX = 3
# pHash and dHash are 64-bit: a Hamming distance, and so a limit, is between 0 and this.
HASH_BITS = 64
