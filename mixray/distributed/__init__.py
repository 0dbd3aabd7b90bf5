"""Layer 2: Ray Data pipelines and Ray actors that shard work and call layer 1."""
