"""Measurement code: timings, throughput against transformers, profiles, memory reports.

Not installed with the library (which never imports torch); run from a checkout of the
repository, at its root:

    python -m benchmarks.bench_train --config=configs/bench.py --compare_hf

hf_reference.py builds the transformers model that the benchmarks time and the tests and
notebooks compare against.
"""
