"""Benchmarks: each prints its figure beside its baseline, measured in the same run."""
