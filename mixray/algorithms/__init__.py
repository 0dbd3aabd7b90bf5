"""Layer 1: pure functions on numpy arrays / torch tensors. No Ray, no I/O, no config."""
