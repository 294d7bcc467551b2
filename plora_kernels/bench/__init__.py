"""Benchmarks behind ``plora bench {linear,unload,train}``.

Each module has ``main(argv) -> int``. On a CUDA machine they time every contender in one process with
``triton.testing.do_bench`` (median, L2 flushed between runs) and write a JSON record and a PNG plot into
``benchmarks/results/``; ``benchmarks/make_report.py`` turns those records into BENCHMARKS.md. Without a GPU
they say so and time the pure-torch reference path on a small shape (a smoke test, not kernel performance).
"""
