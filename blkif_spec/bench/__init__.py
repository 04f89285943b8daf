"""Benchmarks: `python -m blkif_spec.bench codec|iops` (conventions §9)."""
