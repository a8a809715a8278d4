"""Evaluation: benchmarks, the systems compared, generation and verdict caches, statistics and the
report."""
