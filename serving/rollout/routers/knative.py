"""``kserve_knative``: KServe's classic ``spec.predictor.canaryTrafficPercent`` on one InferenceService.

Knative mode: promote = remove the field (the latest revision takes 100%), rollback = 0.
"""

from __future__ import annotations

import argparse
from typing import Any

from serving.rollout import kube
from serving.rollout.routers.base import Release, RouterError, check_k8s_names, check_weights, require_flags


class KServeKnativeRouter:
    """``spec.predictor.canaryTrafficPercent`` of one InferenceService (KServe Knative mode)."""

    name = "kserve_knative"
    # why a release's metrics cannot be scraped per side (the KFP step then needs Prometheus)
    no_scrape = "revisions share one Service: nothing to scrape"

    def __init__(self, isvc: str, namespace: str, api: Any = None, kubeconfig: str | None = None):
        self.isvc, self.namespace, self.kubeconfig = isvc, namespace, kubeconfig
        self.api = api or kube.custom_api(kubeconfig)

    # ----------------------------------------------------------------- configuration

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        k = parser.add_argument_group("router: kserve_knative (canaryTrafficPercent)")
        k.add_argument("--isvc", help="the InferenceService (kserve_knative, kserve_canary)")

    @classmethod
    def config_from_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        require_flags(cls.name, ns, ("isvc",), " (the InferenceService with canaryTrafficPercent)")
        return {"router": cls.name, "isvc": ns.isvc, "namespace": ns.namespace, "kubeconfig": ns.kubeconfig}

    @staticmethod
    def state_location(cfg: dict[str, Any]) -> tuple[str, str]:
        return f"{cfg['isvc']}-rollout", cfg["isvc"]

    @staticmethod
    def check_config(cfg: dict[str, Any]) -> None:
        check_k8s_names(cfg, ("namespace", "isvc"))

    @classmethod
    def from_config(cls, cfg: dict[str, Any], api: Any = None) -> KServeKnativeRouter:
        return cls(**{k: v for k, v in cfg.items() if k != "router"}, api=api)

    @classmethod
    def for_release(cls, fullname: str, namespace: str) -> Release:
        """The chart's ``strategy: knativeCanary``: the single InferenceService ``<fullname>``."""
        cfg = {"router": cls.name, "isvc": fullname, "namespace": namespace, "kubeconfig": None}
        return Release(cfg, fullname, ("", ""))

    # ----------------------------------------------------------------- routing

    def _patch(self, percent: int | None) -> None:
        kube.patch(
            self.api,
            kube.ISVC,
            self.namespace,
            self.isvc,
            {"spec": {"predictor": {"canaryTrafficPercent": percent}}},
        )

    def set_weights(self, stable: int, canary: int) -> None:
        check_weights(stable, canary)
        self._patch(int(canary))

    def get_weights(self) -> tuple[int, int]:
        """From ``status.components.predictor.traffic[]`` (what Knative applied), else from the spec."""
        obj = kube.get(self.api, kube.ISVC, self.namespace, self.isvc)
        if obj is None:
            raise RouterError(f"InferenceService {self.namespace}/{self.isvc} does not exist")
        traffic = obj.get("status", {}).get("components", {}).get("predictor", {}).get("traffic") or []
        if traffic:
            latest = sum(int(t.get("percent") or 0) for t in traffic if t.get("latestRevision"))
            return 100 - latest, latest
        pct = obj["spec"]["predictor"].get("canaryTrafficPercent")
        return (0, 100) if pct is None else (100 - int(pct), int(pct))

    def promote(self) -> None:
        self._patch(None)  # merge-patch null removes the field: the latest revision takes 100%

    def rollback(self) -> None:
        self._patch(0)  # 100% pinned to the previous rolled-out revision

    def config(self) -> dict[str, Any]:
        return {
            "router": self.name,
            "isvc": self.isvc,
            "namespace": self.namespace,
            "kubeconfig": self.kubeconfig,
        }
