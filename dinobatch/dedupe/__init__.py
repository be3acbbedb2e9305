"""Exact and near-duplicate groups from stored hashes: pure functions, no image access."""
