"""The curated safe-informative set of phase 2 (curate.py)."""
