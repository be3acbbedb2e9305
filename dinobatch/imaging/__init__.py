"""Image bytes to facts, perceptual hashes and model input (no torch needed but for tensors)."""
