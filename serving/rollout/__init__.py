"""Progressive canary delivery with ML-aware gates (see serving/rollout/README.md).

Layers, Flagger-style: a pure state machine (:mod:`.machine`) decides from gate results
(:mod:`.gates`, math in :mod:`.stats`); providers fetch evidence (:mod:`.metrics`); routers shift
traffic (:mod:`.routers`); stores persist state (:mod:`.store`); :mod:`.controller` is the loop;
the local stack and the demo live in :mod:`serving.demo`, which nothing here imports.
"""
