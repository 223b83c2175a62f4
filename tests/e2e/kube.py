"""Thin, logged wrappers around the real kubectl and helm binaries for the e2e suite (no client library:
the suite drives the cluster the way users do)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class KubeError(AssertionError):
    pass


@dataclass
class Kube:
    kubectl: str
    helm: str
    namespace: str

    def run(self, *args: str, timeout: float = 120, check: bool = True, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [self.kubectl, *args], capture_output=True, text=True, timeout=timeout, input=stdin
        )
        if check and proc.returncode != 0:
            raise KubeError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}"
            )
        return proc.stdout

    def json(self, *args: str, timeout: float = 60) -> dict[str, Any]:
        return json.loads(self.run(*args, "-o", "json", timeout=timeout))

    def ns(self, *args: str, **kw: Any) -> str:
        return self.run("-n", self.namespace, *args, **kw)

    def helm_run(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.helm, *args, "-n", self.namespace], capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise KubeError(
                f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}"
            )
        return proc

    def wait_serving(self, isvc: str, storage_uri: str, timeout_s: int = 600) -> None:
        """The README's wait after a model change (never `helm --wait`: Helm 4's kstatus reads KServe's
        observedGeneration, which is the Deployment's): the predictor Deployment's pod template carries the
        new model, then it has rolled out, so the new model's pods are the ready ones."""
        dep = f"deployment/{isvc}-predictor"
        self.ns("wait", dep, "--for=create", f"--timeout={timeout_s}s", timeout=timeout_s + 30)
        key = "internal\\.serving\\.kserve\\.io/storage-initializer-sourceuri"
        self.ns(
            "wait", dep, f"--for=jsonpath={{.spec.template.metadata.annotations.{key}}}={storage_uri}",
            f"--timeout={timeout_s}s", timeout=timeout_s + 30,
        )  # fmt: skip
        self.ns("rollout", "status", dep, f"--timeout={timeout_s}s", timeout=timeout_s + 30)

    def wait_isvcs_ready(self, selector: str, timeout_s: int = 600) -> None:
        self.ns(
            "wait",
            "--for=condition=Ready",
            "inferenceservice",
            "-l",
            selector,
            f"--timeout={timeout_s}s",
            timeout=timeout_s + 30,
        )

    def wait_route_programmed(self, name: str, timeout_s: float = 120) -> dict[str, Any]:
        """Wait until the gateway has accepted the HTTPRoute's current generation; return the route."""
        deadline = time.monotonic() + timeout_s
        while True:
            route = self.json("-n", self.namespace, "get", "httproute", name)
            gen = route["metadata"]["generation"]
            parents = route.get("status", {}).get("parents", [])
            ok = parents and all(
                any(
                    c["type"] == "Accepted"
                    and c["status"] == "True"
                    and c.get("observedGeneration", gen) == gen
                    for c in p.get("conditions", [])
                )
                for p in parents
            )
            if ok:
                return route
            if time.monotonic() > deadline:
                raise KubeError(
                    f"HTTPRoute {name} generation {gen} not accepted after {timeout_s}s: {parents}"
                )
            time.sleep(2)

    @contextlib.contextmanager
    def port_forward(
        self, namespace: str, target: str, remote_port: int, timeout_s: float = 60
    ) -> Iterator[int]:
        """`kubectl port-forward` on a free local port chosen by kubectl; yields that port; always stopped."""
        proc = subprocess.Popen(
            [
                self.kubectl,
                "-n",
                namespace,
                "port-forward",
                target,
                f":{remote_port}",
                "--address",
                "127.0.0.1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + timeout_s
            port = None
            assert proc.stdout is not None
            while port is None:
                line = proc.stdout.readline()
                m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
                if m:
                    port = int(m.group(1))
                elif proc.poll() is not None or time.monotonic() > deadline:
                    raise KubeError(f"port-forward {namespace}/{target}:{remote_port} failed: {line.strip()}")
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
