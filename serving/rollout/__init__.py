"""Progressive canary delivery with ML-aware gates (see serving/rollout/README.md).

Layers, Flagger-style: a pure state machine (:mod:`.machine`) decides from gate results
(:mod:`.gates`, math in :mod:`.stats`); providers fetch evidence (:mod:`.metrics`); routers shift
traffic (:mod:`.routers`); stores persist state (:mod:`.store`); :mod:`.controller` is the loop;
:mod:`.localstack` runs the real local stack (runtimes, HAProxy, Prometheus, traffic).
"""
