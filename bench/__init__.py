"""Benchmarks of jasper-consumer against the real broker and the simulator (``make bench``).

See ``BENCHMARKS.md`` for what each scenario measures and the latest results.
"""
