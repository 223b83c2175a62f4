"""Bring the control plane up in order, install what ``make cluster`` installs, and tear it down.

    etcd -> kube-apiserver -> kube-controller-manager + kube-scheduler -> kwok + fake nodes
         -> install.sh gateway_api_crds envoy_gateway_crds kserve_charts (charts from the Go modules)
         -> Knative Serving's CRDs and autoscaler config (the knative path as far as no data plane allows)
         -> KServe controller (local process, its own ServiceAccount token; webhooks on 127.0.0.1)
         -> install.sh kserve_admission kserve_runtimes, KFP's identity, model_namespace

Everything listens on 127.0.0.1 on ports picked at start (several control planes can coexist), except
the KServe webhook server: controller-runtime binds every interface and KServe exposes no flag for the
host (its port is still random and the server only answers TLS under the control plane's own CA).
State (certificates, kubeconfigs, logs, PIDs, etcd data) lives in one folder; ``state.json`` there says
where everything is, so ``down`` and a test session attach to a running control plane by folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from infra.controlplane.build import Binaries
from infra.controlplane.pki import PKI, SERVICE_CIDR, kubeconfig, make_pki
from infra.controlplane.procs import ProcessError, Supervisor, http_ok, wait_until
from infra.controlplane.versions import REPO_ROOT

INFRA = REPO_ROOT / "infra"
PLUGINS = INFRA / "controlplane" / "helm-plugins"
NODE_ANNOTATION = "kwok.x-k8s.io/node"
MODEL_NAMESPACE = "models"
KSERVE_NAMESPACE = "kserve"
KSERVE_SA = "kserve-controller-manager"


def _log(msg: str) -> None:
    print(f"[controlplane] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_state_dir() -> Path:
    return Path(os.environ.get("MLROLLOUT_CONTROLPLANE_DIR") or REPO_ROOT / ".controlplane")


@dataclass
class Settings:
    nodes: int = 2
    # kwok marks a pod Ready this long after it is scheduled (+ up to 50 % jitter): long enough that a
    # rolling update is observable (old pods serve while new ones start), as with real containers
    pod_ready_delay_ms: int = 1500
    node_cpu: str = "16"
    node_memory: str = "64Gi"
    # Knative Serving's CRDs (no Knative controller): KServe then reconciles Knative-mode InferenceServices
    # into Knative Services, which show what Knative's webhook would be asked to admit
    knative_crds: bool = True


class ControlPlane:
    def __init__(self, state_dir: Path, binaries: Binaries | None = None, log: Callable[[str], None] = _log):
        self.dir = state_dir.resolve()
        self.bin = binaries
        self.log = log
        self.procs = Supervisor(self.dir)
        self.state_file = self.dir / "state.json"
        self.state: dict = {}
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())

    # ------------------------------------------------------------------ paths and clients

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state['ports']['apiserver']}"

    def tools(self) -> dict[str, str]:
        tools = REPO_ROOT / ".tools" / "bin"
        kubectl = tools / "kubectl" if (tools / "kubectl").exists() else shutil.which("kubectl")
        helm = tools / "helm" if (tools / "helm").exists() else shutil.which("helm")
        if not kubectl or not helm:
            raise ProcessError("kubectl/helm not found: run `make tools`")
        return {"kubectl": str(kubectl), "helm": str(helm)}

    def env(self) -> dict[str, str]:
        """The environment a client of this control plane runs with (kubectl, helm, install.sh)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = os.pathsep.join(
            [str(Path(sys.executable).parent), str(REPO_ROOT / ".tools" / "bin"), env["PATH"]]
        )
        # helm's caches and config in the state folder: a test session never touches ~/.config/helm
        for var, sub in (
            ("HELM_CACHE_HOME", "helm/cache"),
            ("HELM_CONFIG_HOME", "helm/config"),
            ("HELM_DATA_HOME", "helm/data"),
        ):
            env[var] = str(self.dir / sub)
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(
            [self.tools()["kubectl"], *args],
            input=input,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ProcessError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def token(self, namespace: str, service_account: str, duration: str = "24h") -> str:
        """A bound ServiceAccount token from the TokenRequest API, as a pod of that account would get."""
        return self.kubectl(
            "-n", namespace, "create", "token", service_account, f"--duration={duration}"
        ).strip()

    def service_account_kubeconfig(
        self, namespace: str, service_account: str, path: Path | None = None
    ) -> Path:
        path = path or self.dir / f"sa-{namespace}-{service_account}.kubeconfig"
        user = f"system:serviceaccount:{namespace}:{service_account}"
        path.write_text(
            kubeconfig(
                self.server,
                self.dir / "pki" / "ca.crt",
                user=user,
                token=self.token(namespace, service_account),
            )
        )
        path.chmod(0o600)
        return path

    def _tls(self, client: str = "admin") -> ssl.SSLContext:
        pki = self.dir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
        return ctx

    # ------------------------------------------------------------------ bring-up

    def up(self, settings: Settings | None = None) -> float:
        if not self.bin:
            raise ProcessError("no binaries: run `python -m infra.controlplane build` first")
        if self.procs.pids():
            raise ProcessError(
                f"a control plane already runs from {self.dir}: `make controlplane-down` first"
            )
        settings = settings or Settings()
        start = time.monotonic()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        ports = {
            k: free_port()
            for k in (
                "etcd",
                "etcd_peer",
                "apiserver",
                "kcm",
                "scheduler",
                "kwok",
                "webhook",
                "kserve_metrics",
                "kserve_probe",
            )
        }
        self.state = {"ports": ports, "binaries": self.bin.to_json(), "started": time.time()}
        self._save()
        pki = make_pki(self.dir / "pki")
        self._write_kubeconfigs(pki)
        try:
            self._core(pki, settings)
            self._install(pki, settings)
        except BaseException:
            self.log(f"bring-up failed; logs in {self.procs.logs}; stopping what started")
            self.procs.stop_all()
            raise
        took = time.monotonic() - start
        self.state["ready_s"] = round(took, 1)
        self._save()
        self.log(f"control plane ready in {took:.0f} s")
        return took

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=1))

    def _write_kubeconfigs(self, pki: PKI) -> None:
        server = f"https://127.0.0.1:{self.state['ports']['apiserver']}"
        for ident, pair in pki.clients.items():
            path = self.dir / f"{ident}.kubeconfig"
            path.write_text(kubeconfig(server, pki.ca, user=ident, cert=pair))
            path.chmod(0o600)

    def _core(self, pki: PKI, s: Settings) -> None:
        b, p, d = self.bin, self.state["ports"], self.dir
        assert b is not None
        self.procs.start(
            "etcd",
            [
                str(b.etcd),
                "--name=controlplane",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
                f"--initial-cluster=controlplane=http://127.0.0.1:{p['etcd_peer']}",
                "--listen-metrics-urls=",
                # a test cluster: durability is not the point, and fsync dominates on a shared disk
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        t = wait_until(
            "etcd",
            lambda: http_ok(f"http://127.0.0.1:{p['etcd']}/health"),
            30,
            lambda: self.procs.check("etcd"),
        )
        self.log(f"etcd ready ({t:.1f} s)")
        self.procs.start(
            "kube-apiserver",
            [
                str(b.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p['apiserver']}",
                f"--tls-cert-file={pki.apiserver.cert}",
                f"--tls-private-key-file={pki.apiserver.key}",
                f"--client-ca-file={pki.ca}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                # kubectl apply of big CRDs and chart releases in a burst: no throttling in a test cluster
                "--max-requests-inflight=800",
                "--max-mutating-requests-inflight=400",
                "--v=1",
            ],
        )
        ctx = self._tls()
        t = wait_until(
            "kube-apiserver /readyz",
            lambda: http_ok(f"https://127.0.0.1:{p['apiserver']}/readyz", ctx),
            60,
            lambda: self.procs.check("kube-apiserver"),
        )
        self.log(f"kube-apiserver ready ({t:.1f} s)")
        common = [
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
        ]
        self.procs.start(
            "kube-controller-manager",
            [
                str(b.kube_controller_manager),
                f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={d / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={d / 'controller-manager.kubeconfig'}",
                f"--secure-port={p['kcm']}",
                f"--root-ca-file={pki.ca}",
                f"--service-account-private-key-file={pki.sa_key}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--cluster-name=mlrollout-controlplane",
                *common,
            ],
        )
        self.procs.start(
            "kube-scheduler",
            [
                str(b.kube_scheduler),
                f"--kubeconfig={d / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={d / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={d / 'scheduler.kubeconfig'}",
                f"--secure-port={p['scheduler']}",
                *common,
            ],
        )
        (d / "kwok.yaml").write_text(self._kwok_config(s))
        self.procs.start(
            "kwok",
            [
                str(b.kwok),
                f"--kubeconfig={d / 'kwok.kubeconfig'}",
                f"--config={d / 'kwok.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}=fake",
                "--cidr=10.244.0.1/16",
                "--node-ip=10.0.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{p['kwok']}",
            ],
        )
        for name, port in (("kube-controller-manager", p["kcm"]), ("kube-scheduler", p["scheduler"])):
            t = wait_until(
                f"{name} /healthz",
                lambda port=port: http_ok(f"https://127.0.0.1:{port}/healthz", _insecure()),
                60,
                lambda name=name: self.procs.check(name),
            )
            self.log(f"{name} ready ({t:.1f} s)")
        self.kubectl("apply", "-f", "-", input=self._nodes(s))
        t = wait_until(
            f"{s.nodes} kwok nodes Ready",
            lambda: self._ready_nodes() >= s.nodes,
            60,
            lambda: self.procs.check("kwok"),
        )
        self.log(f"{s.nodes} fake nodes Ready ({t:.1f} s)")
        # pods need their namespace's `default` ServiceAccount: wait for the controller that makes them
        wait_until(
            "ServiceAccount default/default",
            lambda: bool(
                self.kubectl(
                    "get", "serviceaccount", "default", "-n", "default", "--ignore-not-found", "-o", "name"
                )
            ),
            60,
            lambda: self.procs.check("kube-controller-manager"),
        )

    def _ready_nodes(self) -> int:
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
        return sum(
            any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n.get("status", {}).get("conditions", [])
            )
            for n in nodes
        )

    def _kwok_config(self, s: Settings) -> str:
        """kwok's own stage definitions, from its module: node-initialize, lease heartbeat, pod lifecycle.

        The pod-ready stage gets a delay so pods start as real ones do (see Settings.pod_ready_delay_ms).
        """
        assert self.bin is not None
        stages = self.bin.kwok_module / "kustomize" / "stage"
        files = [
            stages / "node" / "fast" / "node-initialize.yaml",
            stages / "node" / "heartbeat-with-lease" / "node-heartbeat-with-lease.yaml",
            *sorted((stages / "pod" / "fast").glob("pod-*.yaml")),
        ]
        docs = []
        for f in files:
            doc = yaml.safe_load(f.read_text())
            if doc["metadata"]["name"] == "pod-ready" and s.pod_ready_delay_ms:
                doc["spec"]["delay"] = {
                    "durationMilliseconds": s.pod_ready_delay_ms,
                    "jitterDurationMilliseconds": s.pod_ready_delay_ms * 3 // 2,
                }
            docs.append(doc)
        return yaml.safe_dump_all(docs, sort_keys=False)

    @staticmethod
    def _nodes(s: Settings) -> str:
        docs = []
        for i in range(s.nodes):
            name = f"kwok-node-{i}"
            capacity = {"cpu": s.node_cpu, "memory": s.node_memory, "pods": "110"}
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "type": "kwok",
                            "topology.kubernetes.io/zone": f"zone-{i % 2}",
                        },
                    },
                    "status": {"allocatable": capacity, "capacity": capacity},
                }
            )
        return yaml.safe_dump_all(docs)

    def install_env(self, pki_dir: Path | None = None) -> dict[str, str]:
        """install.sh's sources: the pinned Go modules' own files, and the local-webhooks post-renderer."""
        assert self.bin is not None
        pki_dir = pki_dir or self.dir / "pki"
        env = self.env()
        env.update(
            KUBECTL=self.tools()["kubectl"],
            HELM=self.tools()["helm"],
            GATEWAY_API_CRDS=str(self.bin.gateway_api_module / "config" / "crd" / "standard"),
            EG_CRDS_CHART=str(self.bin.envoy_gateway_module / "charts" / "gateway-crds-helm"),
            KSERVE_CHARTS=str(self.bin.kserve_module / "charts"),
            HELM_PLUGINS=str(PLUGINS),
            KSERVE_HELM_ARGS=(
                "--post-renderer local-webhooks "
                f"--post-renderer-args url=https://127.0.0.1:{self.state['ports']['webhook']} "
                f"--post-renderer-args ca={pki_dir / 'webhook-ca.crt'}"
            ),
            MODEL_NAMESPACE=MODEL_NAMESPACE,
            INSTALL_WAIT="120",
        )
        return env

    def install_steps(self, *steps: str, timeout: float = 600) -> None:
        start = time.monotonic()
        proc = subprocess.run(
            ["bash", str(INFRA / "install.sh"), *steps],
            env=self.install_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-25:])
            raise ProcessError(f"install.sh {' '.join(steps)} failed (exit {proc.returncode}):\n{tail}")
        self.log(f"installed {', '.join(steps)} ({time.monotonic() - start:.1f} s)")

    def _install(self, pki: PKI, s: Settings) -> None:
        self.install_steps("gateway_api_crds", "envoy_gateway_crds", "kserve_charts")
        if s.knative_crds:
            self._knative()
        self._start_kserve(pki)
        self._kfp_identity()
        self.install_steps("kserve_admission", "kserve_runtimes", "model_namespace")

    def _knative(self) -> None:
        """Knative Serving's CRDs and its `config-autoscaler` (KServe reads it for Knative-mode services),
        from the knative.dev/serving module at the version the pinned KServe is built against."""
        assert self.bin is not None
        core = self.bin.knative_serving_module / "config" / "core"
        self.kubectl("apply", "--server-side", "-f", str(core / "300-resources"))
        self.kubectl("create", "namespace", "knative-serving")
        self.kubectl("apply", "-f", str(core / "configmaps" / "autoscaler.yaml"))
        self.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/services.serving.knative.dev"
        )
        self.log("Knative Serving CRDs installed (no Knative controller)")

    def _start_kserve(self, pki: PKI) -> None:
        assert self.bin is not None
        p = self.state["ports"]
        home = self.dir / "kserve"
        certs = home / "tmp" / "k8s-webhook-server" / "serving-certs"  # controller-runtime's default CertDir
        certs.mkdir(parents=True)
        shutil.copy(pki.webhook.cert, certs / "tls.crt")
        shutil.copy(pki.webhook.key, certs / "tls.key")
        kcfg = self.service_account_kubeconfig(KSERVE_NAMESPACE, KSERVE_SA)
        env = {
            **os.environ,
            "KUBECONFIG": str(kcfg),
            "POD_NAMESPACE": KSERVE_NAMESPACE,
            "TMPDIR": str(home / "tmp"),
        }
        self.procs.start(
            "kserve-controller",
            [
                str(self.bin.kserve_manager),
                f"--metrics-addr=127.0.0.1:{p['kserve_metrics']}",
                f"--health-probe-addr=127.0.0.1:{p['kserve_probe']}",
                f"--webhook-port={p['webhook']}",
                "--leader-elect=false",
            ],
            env=env,
        )
        t = wait_until(
            "KServe controller /readyz",
            lambda: http_ok(f"http://127.0.0.1:{p['kserve_probe']}/readyz"),
            90,
            lambda: self.procs.check("kserve-controller"),
        )
        self.log(f"KServe controller ready ({t:.1f} s; webhooks on 127.0.0.1:{p['webhook']})")

    def _kfp_identity(self) -> None:
        """What KFP gives the model namespace on kind: the `kubeflow/pipeline-runner` account and the object
        store's credential Secret (random values here). KFP 2.17.0's own RBAC for pipeline-runner is a Role in
        `kubeflow` (manifests/kustomize/base/pipeline/pipeline-runner-role.yaml), so it grants nothing in the
        model namespace; what it may do there is only what the project binds (model-namespace.yaml and the
        chart's Role).
        """
        docs = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}},
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "pipeline-runner", "namespace": "kubeflow"},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "mlpipeline-minio-artifact", "namespace": "kubeflow"},
                "stringData": {"accesskey": secrets.token_hex(8), "secretkey": secrets.token_hex(16)},
            },
        ]
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

    # ------------------------------------------------------------------ tear-down and status

    def down(self) -> list[str]:
        stopped = self.procs.stop_all()
        return stopped

    def status(self) -> dict[str, object]:
        pids = self.procs.pids()
        return {"dir": str(self.dir), "running": pids, "kubeconfig": str(self.kubeconfig), **self.state}


def _insecure() -> ssl.SSLContext:
    """For the components' /healthz on 127.0.0.1: they serve self-signed certificates of their own."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
