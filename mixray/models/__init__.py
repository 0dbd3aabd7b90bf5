"""Model loading (offline aliases) and Ray-agnostic batch callables."""
