"""The pipeline's stages as plain functions over batches (classify: fingerprint, decode, infer, group,
rows; scan: hashes), with no knowledge of how they are scheduled: engines decide that (docs/architecture.md)."""
