"""Metrics backends: where the gates' evidence comes from. One file per backend, one registry.

Adding a backend: one file with a class like :class:`~.prometheus.PrometheusProvider` (the
:class:`~.base.MetricsProvider` interface plus ``check_config``/``from_config``), and one line in
:data:`PROVIDERS`; the CLI's ``--metrics`` choices and the record's validation read the registry.
"""

from __future__ import annotations

from typing import Any

from serving.rollout.metrics.base import MetricsError, MetricsProvider, Target
from serving.rollout.metrics.prometheus import PrometheusProvider
from serving.rollout.metrics.scrape import ScrapeProvider, parse_exposition

PROVIDERS: dict[str, type] = {cls.name: cls for cls in (PrometheusProvider, ScrapeProvider)}

__all__ = [
    "PROVIDERS",
    "MetricsError",
    "MetricsProvider",
    "PrometheusProvider",
    "ScrapeProvider",
    "Target",
    "build_provider",
    "check_config",
    "parse_exposition",
]


def check_config(cfg: dict[str, Any]) -> None:
    """Raise ValueError naming the field when the record's ``metrics`` config is unusable."""
    provider = cfg.get("provider")
    if provider not in PROVIDERS:
        raise ValueError(f"provider: {provider!r} is not one of {', '.join(PROVIDERS)}")
    PROVIDERS[provider].check_config(cfg)


def build_provider(cfg: dict[str, Any]) -> MetricsProvider:
    check_config(cfg)
    return PROVIDERS[cfg["provider"]].from_config(cfg)
