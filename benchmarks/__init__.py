"""Benchmarks of the whole pipeline (``make bench``: ``python -m benchmarks.run``)."""
