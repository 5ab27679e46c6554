"""Benchmarks. `make bench` runs them all; each reports ratios against a floor measured in the same run."""
