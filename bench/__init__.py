"""Benchmarks (run with `make bench`); see bench/results.py for the results file."""
