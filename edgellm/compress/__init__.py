"""Compression: plans (per-layer formats) and, later, the passes that produce them."""
