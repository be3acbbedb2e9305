"""Classify's stages as plain functions over batches (fingerprint, decode, infer, group, rows), with no
knowledge of how they are scheduled: the engines in dinobatch.engines decide that (docs/architecture.md)."""
