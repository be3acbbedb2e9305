"""Where work runs: devices, memory, crash-isolating worker pools, burst and DataLoader decoding."""
