"""The ders benchmark: `python -m bench.run` (see README.md, "Benchmark")."""
