"""The per-worker training loop, its checkpoints and the Ray wrappers."""
