"""Benchmark scripts and specs (run them with ``python -m dalab.benchmarks.<name>``)."""
