"""Benchmarks: scripts that print a table and end with one JSON line (not timed unit tests)."""
