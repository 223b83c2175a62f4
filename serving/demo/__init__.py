"""The demo: ``python -m serving.demo`` (``make demo``), the whole loop on one machine, no cluster.

:mod:`.rollout` runs the two rollouts (a good canary promoted, a bad one rolled back) on
:mod:`.localstack` (two real runtimes, HAProxy, Prometheus, generated traffic); :mod:`.badmodel`
builds the bad canary. Nothing in the product imports this package.
"""
