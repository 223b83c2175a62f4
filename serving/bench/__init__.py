"""Serving benchmark: the project runtime against its named peers, in one run, on loopback.

``python -m serving.bench`` (or ``make bench-serving``) starts every server on 127.0.0.1, pinned
to one core, drives each with the same ``wrk`` load generator pinned to another core, and prints
req/s, p50 and p99 at concurrency 1, 8 and 32 plus the same-run ratios. See README.md here.

Every other benchmark lives here too: :mod:`.runtime` (``make bench-runtime``: the request path
in-process), :mod:`.batch` (``make bench-batch``: batch scoring end to end), :mod:`.batch_io` (the batch
readers and writers), :mod:`.pipeline` (``make bench``:
the training pipeline and predict latency). Nothing in the product imports this package.
"""
