"""Demo and test helpers: tiny random-weight models, sample img2dataset shards, the offline CPU environment.

Used by ``make demo``, the tests and the benchmarks; the pipeline itself never imports them.
"""
