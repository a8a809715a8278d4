"""Mutation harness: each entry plants one small bug and names the tests that must catch it.

Run `python -m tests.mutations` (all entries) or `python -m tests.mutations --only ID [ID ...]`
from the repository root. It is not part of the default pytest run (no test_* file here).
"""
