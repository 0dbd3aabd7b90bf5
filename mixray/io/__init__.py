"""Readers and the run directory (manifests, atomic outputs, skip/resume)."""
