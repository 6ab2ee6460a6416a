"""Benchmarks of ftdist's training path (``python -m bench.throughput --help``); results in RESULTS.md."""
