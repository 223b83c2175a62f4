#!/usr/bin/env python3
"""Rewrite KServe's rendered chart for a controller that runs outside the cluster (Helm post-renderer).

stdin: the manifests Helm rendered; stdout: the same manifests, with
* every webhook whose clientConfig names KServe's webhook Service pointed at ``url=`` + the webhook's
  path, with ``ca=``'s certificate as caBundle (the control plane's webhook CA stands in for cert-manager);
* cert-manager objects (Certificate, Issuer) and cert-manager's CA-injection annotation dropped: there is
  no cert-manager on the control plane;
* the in-cluster controller Deployment scaled to 0, so no (fake, kwok-run) pod poses as the controller.
Anything else passes through untouched. Arguments come from ``--post-renderer-args key=value``.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import yaml

WEBHOOK_SERVICE = "kserve-webhook-server-service"
CONTROLLER = "kserve-controller-manager"
INJECT_ANNOTATION = "cert-manager.io/inject-ca-from"


def rewrite(docs: list[dict], url: str, ca_pem: bytes) -> list[dict]:
    bundle = base64.b64encode(ca_pem).decode()
    out = []
    for doc in docs:
        if not doc:
            continue
        if str(doc.get("apiVersion", "")).startswith("cert-manager.io/"):
            continue
        kind, meta = doc.get("kind"), doc.setdefault("metadata", {})
        if kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            (meta.get("annotations") or {}).pop(INJECT_ANNOTATION, None)
            for hook in doc.get("webhooks") or []:
                cfg = hook.setdefault("clientConfig", {})
                svc = cfg.pop("service", None)
                if svc is not None:
                    if svc.get("name") != WEBHOOK_SERVICE:
                        raise SystemExit(
                            f"local-webhooks: webhook {hook.get('name')} names Service {svc.get('name')}"
                        )
                    cfg["url"] = url.rstrip("/") + svc.get("path", "/")
                cfg["caBundle"] = bundle
        if kind == "Deployment" and meta.get("name") == CONTROLLER:
            doc.setdefault("spec", {})["replicas"] = 0
            meta.setdefault("annotations", {})["mlrollout.io/controlplane"] = (
                "the controller runs as a local process"
            )
        out.append(doc)
    return out


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    missing = {"url", "ca"} - set(args)
    if missing:
        need = " and ".join(f"--post-renderer-args {m}=..." for m in sorted(missing))
        print(
            f"local-webhooks: missing {need} (url=https://127.0.0.1:<port>, ca=<PEM file>)", file=sys.stderr
        )
        return 2
    docs = list(yaml.safe_load_all(sys.stdin))
    yaml.safe_dump_all(rewrite(docs, args["url"], Path(args["ca"]).read_bytes()), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
