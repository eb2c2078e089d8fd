"""Console entry points (the only place Hydra is imported)."""
