"""Benchmarks (run as scripts: ``python benchmarks/NAME.py --help``); see benchmarks/RESULTS.md."""
