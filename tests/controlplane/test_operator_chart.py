"""The operator chart (helm/mlrollout-operator) installed with the real Helm 4 on the control plane, the way
`make cluster` installs it (`install.sh mlrollout_operator`), and once more in namespaced mode.

What is proven here: the API server accepts every object (the real CRD, RBAC, PDB, NetworkPolicy schemas);
both operator pods and the helm test Pod are admitted in a namespace that enforces Pod Security
`restricted`; and the operator's ServiceAccount can do exactly what the operator calls and nothing more,
as the API server's RBAC authorizer answers it (SubjectAccessReviews for the whole matrix, and
`kubectl auth can-i --as=system:serviceaccount:...` agreeing on a sample of it); and the operator's own
code, started here as a process with each release's ServiceAccount token and the live Deployment's flags,
takes its Lease and watches ModelRollouts without a 403. kwok runs no containers, so nothing runs in the
pods themselves; kind's e2e checks that.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.controlplane.conftest import ROOT, Kube
from tests.podsecurity import assert_restricted_pod

CHART = ROOT / "helm" / "mlrollout-operator"
OP_NS, OP = "mlrollout-system", "mlrollout-operator"  # install.sh's namespace and release (= fullname)
NSD_NS, NSD = "mlrollout-nsop", "nsop-mlrollout-operator"  # the namespaced-mode release, watching `models`
WATCHED = "models"

# (verb, resource, namespace, extra kubectl flags): what the operator calls (README "RBAC")
NEEDS = [
    ("get", "modelrollouts.mlrollout.io", WATCHED, ()),
    ("list", "modelrollouts.mlrollout.io", WATCHED, ()),
    ("watch", "modelrollouts.mlrollout.io", WATCHED, ()),
    ("patch", "modelrollouts.mlrollout.io", WATCHED, ("--subresource=status",)),
    ("get", "inferenceservices.serving.kserve.io", WATCHED, ()),
    ("create", "inferenceservices.serving.kserve.io", WATCHED, ()),
    ("patch", "inferenceservices.serving.kserve.io", WATCHED, ()),
    ("get", "httproutes.gateway.networking.k8s.io", WATCHED, ()),
    ("patch", "httproutes.gateway.networking.k8s.io", WATCHED, ()),
    ("get", "deployments.apps", WATCHED, ()),
    ("create", "events", WATCHED, ()),
]
# what it must not do anywhere
NEVER = [
    ("delete", "inferenceservices.serving.kserve.io", WATCHED, ()),
    ("update", "inferenceservices.serving.kserve.io", WATCHED, ()),
    ("list", "inferenceservices.serving.kserve.io", WATCHED, ()),
    ("delete", "modelrollouts.mlrollout.io", WATCHED, ()),
    ("patch", "modelrollouts.mlrollout.io", WATCHED, ()),  # spec is the user's; status only
    ("create", "modelrollouts.mlrollout.io", WATCHED, ()),
    ("get", "secrets", WATCHED, ()),
    ("list", "secrets", OP_NS, ()),
    ("get", "configmaps", WATCHED, ()),
    ("create", "pods", WATCHED, ()),
    ("patch", "deployments.apps", WATCHED, ()),
    ("delete", "httproutes.gateway.networking.k8s.io", WATCHED, ()),
    ("create", "serviceaccounts", WATCHED, ("--subresource=token",)),
    ("patch", "clusterroles.rbac.authorization.k8s.io", "", ()),
    ("get", f"leases.coordination.k8s.io/{OP}", WATCHED, ()),  # the Lease lives in its own namespace only
]


def can(k: Kube, sa: str, ns_of_sa: str, verb: str, resource: str, ns: str, extra: tuple[str, ...]) -> bool:
    """``kubectl auth can-i`` as the ServiceAccount (impersonation; the API server's RBAC authorizer)."""
    where = ("-n", ns) if ns else ("--all-namespaces",)
    proc = k.run("auth", "can-i", verb, resource, *where, *extra,
                 f"--as=system:serviceaccount:{ns_of_sa}:{sa}", check=False)  # fmt: skip
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {resource}: {proc.stdout} {proc.stderr}"
    return answer == "yes"


def review(authz, sa: str, ns_of_sa: str, verb: str, resource: str, ns: str, extra: tuple[str, ...]) -> bool:
    """The same question as a SubjectAccessReview, in process: ~40 kubectl processes would cost ~30 s on
    a loaded 2-core machine. ``resource`` is kubectl's ``plural.group[/name]``."""
    from kubernetes import client

    what, _, name = resource.partition("/")
    plural, _, group = what.partition(".")
    sub = next((x.split("=", 1)[1] for x in extra if x.startswith("--subresource=")), None)
    attrs = client.V1ResourceAttributes(verb=verb, group=group, resource=plural, subresource=sub,
                                        name=name or None, namespace=ns or None)  # fmt: skip
    body = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=f"system:serviceaccount:{ns_of_sa}:{sa}",
        groups=["system:serviceaccounts", f"system:serviceaccounts:{ns_of_sa}", "system:authenticated"],
        resource_attributes=attrs))  # fmt: skip
    return bool(authz.create_subject_access_review(body).status.allowed)


def matrix(k: Kube, sa: str, ns_of_sa: str, checks: list[tuple]) -> dict[tuple, bool]:
    from kubernetes import client

    authz = client.AuthorizationV1Api(k.api().api_client)
    got = {c: review(authz, sa, ns_of_sa, *c) for c in checks}
    # kubectl auth can-i agrees, on one allowed and one refused question (the reviews above are the matrix)
    yes, no = next(c for c in checks if got[c]), next(c for c in checks if not got[c])
    assert (can(k, sa, ns_of_sa, *yes), can(k, sa, ns_of_sa, *no)) == (True, False), (yes, no)
    return got


def restricted_namespace(k: Kube, ns: str) -> None:
    k.run("apply", "-f", "-", input=(
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n"
        "    pod-security.kubernetes.io/enforce: restricted\n"
    ))  # fmt: skip


@pytest.fixture(scope="module")
def installed(controlplane, k: Kube):
    """install.sh's own step (cluster-wide), and a namespaced-mode release; both removed after."""
    controlplane.install_steps("mlrollout_operator")
    restricted_namespace(k, NSD_NS)
    # no --wait: this release is read for its RBAC and the Deployment's flags only
    k.helm("install", "nsop", str(CHART), "-n", NSD_NS, "--set", f"watchNamespaces={{{WATCHED}}}")
    try:
        yield k
    finally:
        # no --wait: the namespaces' deletion takes what is left in them
        k.helm("uninstall", "nsop", "-n", NSD_NS, check=False)
        k.helm("uninstall", OP, "-n", OP_NS, check=False)
        k.run("delete", "namespace", NSD_NS, OP_NS, "--ignore-not-found", "--wait=false", check=False)


def test_install_step_runs_two_restricted_replicas_under_enforcement(installed):
    k = installed
    assert k.get("namespace", OP_NS, ns="")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "restricted"
    )
    dep = k.get("deployment", OP, ns=OP_NS)
    assert dep["status"].get("availableReplicas") == 2, dep["status"]
    pods = k.items("pods", "-l", "app.kubernetes.io/component=operator", ns=OP_NS)
    assert len(pods) == 2
    for pod in pods:
        assert_restricted_pod(pod)
        assert pod["spec"]["automountServiceAccountToken"] is False
        # the projected token is the one credential, in the operator container only
        (c,) = pod["spec"]["containers"]
        assert "/var/run/secrets/kubernetes.io/serviceaccount" in [m["mountPath"] for m in c["volumeMounts"]]
    pdb = k.get("poddisruptionbudget", OP, ns=OP_NS)
    assert pdb["status"]["expectedPods"] == 2 and pdb["status"]["disruptionsAllowed"] == 1
    crd = k.get("crd", "modelrollouts.mlrollout.io", ns="")
    assert crd is not None


def test_helm_test_pod_is_admitted_under_restricted(installed):
    k = installed
    k.helm("test", OP, "-n", OP_NS, "--timeout", "2s", check=False)  # kwok never runs it to completion
    pod = k.get("pod", f"{OP}-test-health", ns=OP_NS)
    assert pod is not None, "the helm test Pod was not admitted"
    assert_restricted_pod(pod)
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_cluster_wide_service_account_can_do_exactly_what_the_operator_calls(installed):
    k = installed
    elsewhere = [(v, r, "default", x) for v, r, ns, x in NEEDS]  # cluster-wide: any namespace
    lease = [
        ("get", f"leases.coordination.k8s.io/{OP}", OP_NS, ()),
        ("update", f"leases.coordination.k8s.io/{OP}", OP_NS, ()),
        ("create", "leases.coordination.k8s.io", OP_NS, ()),
    ]
    other_lease = [
        ("update", "leases.coordination.k8s.io/kube-scheduler", "kube-system", ()),
        ("update", "leases.coordination.k8s.io/someone-else", OP_NS, ()),
        ("delete", f"leases.coordination.k8s.io/{OP}", OP_NS, ()),
    ]
    got = matrix(k, OP, OP_NS, NEEDS + elsewhere + lease + NEVER + other_lease)
    assert [c for c in NEEDS + elsewhere + lease if not got[c]] == []
    assert [c for c in NEVER + other_lease if got[c]] == []


def test_namespaced_service_account_is_confined_to_its_namespace(installed):
    k = installed
    dep = k.get("deployment", NSD, ns=NSD_NS)
    assert f"--namespace={WATCHED}" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert k.get("clusterrole", NSD, ns="") is None
    other = [(v, r, "default", x) for v, r, ns, x in NEEDS] + [
        ("list", "modelrollouts.mlrollout.io", "", ()),  # across all namespaces
        ("get", "inferenceservices.serving.kserve.io", "kserve", ()),
        ("create", "leases.coordination.k8s.io", WATCHED, ()),
    ]
    lease = [("get", f"leases.coordination.k8s.io/{NSD}", NSD_NS, ()),
             ("create", "leases.coordination.k8s.io", NSD_NS, ())]  # fmt: skip
    got = matrix(k, NSD, NSD_NS, NEEDS + lease + other + NEVER)
    assert [c for c in NEEDS + lease if not got[c]] == []
    assert [c for c in other + NEVER if got[c]] == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_operator_runs_with_its_own_token_and_the_deployments_flags(controlplane, installed, tmp_path):
    """The real operator code, as each release's ServiceAccount (its own token) with the flags the live
    Deployment carries: it takes its Lease, lists and watches ModelRollouts (cluster-wide, or in `models`)
    and says /healthz ok, with no 403 in its log. kwok's pods run none of this; these processes do."""
    k = installed
    procs = []
    for ns, full in ((OP_NS, OP), (NSD_NS, NSD)):
        args = k.get("deployment", full, ns=ns)["spec"]["template"]["spec"]["containers"][0]["args"]
        identity, port = f"{full}-test-{os.getpid()}", free_port()
        args = [a.replace("$(POD_NAMESPACE)", ns).replace("$(POD_NAME)", identity) for a in args]
        kubeconfig = controlplane.service_account_kubeconfig(ns, full, tmp_path / f"{full}.kubeconfig")
        cmd = [
            sys.executable,
            "-m",
            "serving.rollout",
            "operator",
            *args,
            "--kubeconfig",
            str(kubeconfig),
            f"--metrics-port={port}",
        ]  # fmt: skip  (argparse keeps the last --metrics-port)
        log = tmp_path / f"{full}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env={**k.env, "PYTHONPATH": str(ROOT)}, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
        procs.append((proc, ns, full, identity, port, log))
    try:
        deadline = time.monotonic() + 60
        for proc, ns, full, identity, port, log in procs:
            while (k.get("lease", full, ns=ns) or {}).get("spec", {}).get("holderIdentity") != identity:
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, (
                    f"{identity} never took its Lease: {log.read_text()[-2000:]}"
                )
                time.sleep(0.5)
            r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert (r.status_code, r.text) == (200, "ok\n")
        time.sleep(1.0)  # a list and a watch round trip after leading
        for *_, log in procs:
            text = log.read_text()
            assert "403" not in text and "orbidden" not in text, text[-2000:]
    finally:
        for proc, *_ in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
