"""Benchmarks of the service against llama.cpp itself (``make bench``)."""
