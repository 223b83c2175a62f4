"""The operator chart helm/mlrollout-operator, rendered by the real helm binary and checked object by object;
its kustomize twin manifests/operator/; and the Argo CD health check in its README, run by a real Lua 5.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from serving.rollout import health
from serving.rollout.operator import OperatorMetrics
from tests.chart.conftest import MANIFESTS, ROOT, load_docs, versions_env
from tests.chart.validators import assert_restricted, check_builtin, check_object

pytestmark = pytest.mark.chart

CHART = ROOT / "helm" / "mlrollout-operator"
CI_FILES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
NS = "mlrollout-system"
FULL = "mlrollout-operator"  # release "mlrollout-operator": the fullname is the release name
# what the operator calls (README "RBAC"); a change of the code's API calls must change this and the chart
RULES = [
    {"apiGroups": ["mlrollout.io"], "resources": ["modelrollouts"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["mlrollout.io"], "resources": ["modelrollouts/status"], "verbs": ["patch"]},
    {
        "apiGroups": ["serving.kserve.io"],
        "resources": ["inferenceservices"],
        "verbs": ["get", "create", "patch"],
    },
    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": ["get", "patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
LEASE_RULES = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": [FULL],
        "verbs": ["get", "update"],
    },
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
]


@pytest.fixture(scope="module")
def render(tools):
    cache: dict[tuple, list[dict]] = {}

    def _render(*values_files: str, sets: tuple[str, ...] = (), release: str = FULL) -> list[dict]:
        key = (values_files, sets, release)
        if key not in cache:
            args = [tools.helm, "template", release, CHART, "--namespace", NS]
            for f in values_files:
                args += ["-f", CHART / f]
            for s in sets:
                args += ["--set", s]
            cache[key] = load_docs(tools.run(*args, check=True).stdout)
        return cache[key]

    return _render


def kinds(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in kinds(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objs: list[dict]) -> dict:
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


# ------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("values_file", [None, *CI_FILES])
def test_helm_lint_strict(tools, values_file):
    args = [tools.helm, "lint", "--strict", CHART, "--namespace", NS]
    if values_file:
        args += ["-f", CHART / "ci" / values_file]
    proc = tools.run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def check_service_monitor(sm: dict) -> None:
    """No ServiceMonitor schema is installable offline: its metadata through the real ObjectMeta schema, the
    spec field by field against prometheus-operator's monitoring.coreos.com/v1 (the fields rendered)."""
    check_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": sm["metadata"]})
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"}
        assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", ep["interval"]), ep


def test_every_rendered_object_is_valid_and_restricted(render):
    """Defaults and every ci/ file: each distinct object once (schema validation is the slow part)."""
    seen: set[str] = set()
    for values in [(), *((f"ci/{f}",) for f in CI_FILES)]:
        objs = render(*values)
        for o in objs:
            key = json.dumps(o, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            if o["kind"] == "ServiceMonitor":
                check_service_monitor(o)
            else:
                assert check_object(o) == "kubernetes-1.37"
        # the operator and the helm test Pod: non-root, read-only root, drop ALL, RuntimeDefault, no automount
        assert assert_restricted(objs) == 2, values
        assert {o["metadata"]["namespace"] for o in objs if "namespace" in o["metadata"]} <= {NS, "models"}
    assert len(seen) >= 15


def test_deployment_runs_two_replicas_with_the_lease_and_soft_spread(render):
    objs = render()
    dep = one(objs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    c = container(objs)
    assert c["command"] == ["python", "-m", "serving.rollout", "operator"]
    assert c["image"] == f"ghcr.io/mlrollout/onnx-runtime:{versions_env()['MLROLLOUT_VERSION']}"
    args = c["args"]
    assert f"--lease-name={FULL}" in args and "--lease-namespace=$(POD_NAMESPACE)" in args
    assert "--identity=$(POD_NAME)" in args and "--metrics-port=8080" in args
    assert not any(a.startswith("--namespace") for a in args)  # cluster-wide
    # the flags exist: the operator's own argparse accepts exactly these arguments
    from serving.rollout.cli import build_parser

    build_parser().parse_args(
        ["operator", *(a.replace("$(POD_NAMESPACE)", NS).replace("$(POD_NAME)", "p") for a in args)]
    )
    # soft spread only: a second node or zone is preferred, never required
    assert all(t["whenUnsatisfiable"] == "ScheduleAnyway" for t in spec["topologySpreadConstraints"])
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in spec["affinity"]["podAntiAffinity"]
    # the token: projected into the operator container only, at the path the kubernetes client reads
    assert spec["automountServiceAccountToken"] is False
    mount = next(m for m in c["volumeMounts"] if m["name"] == "api-token")
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and mount["readOnly"]
    sources = next(v for v in spec["volumes"] if v["name"] == "api-token")["projected"]["sources"]
    assert sources[0]["serviceAccountToken"] == {"path": "token", "expirationSeconds": 3600}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe


def test_pdb_keeps_one_replica_and_selects_exactly_the_operator_pods(render):
    objs = render()
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    sel = pdb["spec"]["selector"]["matchLabels"]
    assert sel.items() <= pod_labels.items()
    # the helm test Pod is not one of them (it would count as available, and join the Service)
    test_pod = one(objs, "Pod")
    assert not sel.items() <= test_pod["metadata"]["labels"].items()
    assert not one(objs, "Service")["spec"]["selector"].items() <= test_pod["metadata"]["labels"].items()
    assert not kinds(render(sets=("replicaCount=1",)), "PodDisruptionBudget")  # it would block every drain


def test_cluster_wide_rbac_is_exactly_what_the_operator_calls(render):
    objs = render()
    assert one(objs, "ClusterRole", FULL)["rules"] == RULES
    crb = one(objs, "ClusterRoleBinding", FULL)
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": FULL, "namespace": NS}]
    lease = one(objs, "Role", f"{FULL}-leader-election")
    assert lease["metadata"]["namespace"] == NS and lease["rules"] == LEASE_RULES
    assert [r["metadata"]["name"] for r in kinds(objs, "Role")] == [f"{FULL}-leader-election"]
    assert one(objs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_namespaced_rbac_is_a_role_in_the_watched_namespace_and_the_flag(render):
    objs = render("ci/namespaced-values.yaml")
    assert not kinds(objs, "ClusterRole") and not kinds(objs, "ClusterRoleBinding")
    role = one(objs, "Role", FULL)
    assert role["metadata"]["namespace"] == "models" and role["rules"] == RULES
    rb = one(objs, "RoleBinding", FULL)
    assert rb["metadata"]["namespace"] == "models" and rb["roleRef"]["kind"] == "Role"
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": FULL, "namespace": NS}]
    assert one(objs, "Role", f"{FULL}-leader-election")["metadata"]["namespace"] == NS
    assert "--namespace=models" in container(objs)["args"]


def test_rbac_has_no_wildcards_secrets_or_deletes_in_any_mode(render):
    for objs in (render(), render("ci/namespaced-values.yaml")):
        for role in kinds(objs, "Role") + kinds(objs, "ClusterRole"):
            for rule in role["rules"]:
                assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
                assert not {"secrets", "configmaps", "pods"} & set(rule["resources"]), rule
                assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(
                    rule["verbs"]
                )
    assert not [o for o in render(sets=("rbac.create=false",)) if o["kind"].endswith(("Role", "RoleBinding"))]


def test_image_digest_pins_the_image(render):
    digest = "sha256:" + "ab" * 32
    assert (
        container(render(sets=(f"image.digest={digest}",)))["image"]
        == f"ghcr.io/mlrollout/onnx-runtime@{digest}"
    )


def test_service_monitor_is_off_by_default_and_scrapes_the_metrics_service(render):
    assert not kinds(render(), "ServiceMonitor")
    objs = render("ci/cluster-values.yaml")
    sm, svc = one(objs, "ServiceMonitor"), one(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert svc["metadata"]["name"] == f"{FULL}-metrics"


def test_network_policies_admit_only_the_metrics_port(render):
    objs = render()
    op = one(objs, "NetworkPolicy", FULL)["spec"]
    assert op["policyTypes"] == ["Ingress"] and [p["port"] for p in op["ingress"][0]["ports"]] == ["metrics"]
    test = one(objs, "NetworkPolicy", f"{FULL}-test")["spec"]
    assert test["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in test
    assert test["egress"][1]["ports"] == [{"port": 8080, "protocol": "TCP"}]


BAD_VALUES = {
    "unknown key": (["replicas=2"], "additional properties 'replicas' not allowed"),
    "no replicas": (["replicaCount=0"], "at '/replicaCount': minimum: got 0, want 1"),
    "duration without unit": (
        ["operator.leaseDuration=15"],
        "at '/operator/leaseDuration': got number, want string",
    ),
    "bad digest": (["image.digest=abc"], "at '/image/digest'"),
    "writable root": (
        ["securityContext.readOnlyRootFilesystem=false"],
        "readOnlyRootFilesystem': value must be true",
    ),
    "capabilities kept": (
        ["securityContext.capabilities.drop={NET_RAW}"],
        "at '/securityContext/capabilities/drop'",
    ),
    "root": (["securityContext.runAsNonRoot=false"], "at '/securityContext/runAsNonRoot'"),
    "bad namespace": (["watchNamespaces={Models}"], "at '/watchNamespaces/0'"),
    "two namespaces": (
        ["watchNamespaces={a,b}"],
        "watchNamespaces: the operator watches one namespace or all (got 2)",
    ),
    "no service account": (["serviceAccount.create=false"], "serviceAccount.name is required"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_with_a_readable_message(tools, case):
    sets, message = BAD_VALUES[case]
    assert "kind: Deployment" not in tools.assert_refused(CHART, FULL, NS, sets, message)


def test_notes_tell_what_to_do_next(tools):
    proc = tools.run(tools.helm, "install", FULL, CHART, "-n", NS, "--dry-run=client", check=True)
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NS} rollout status deployment/{FULL}" in notes
    assert f"helm test {FULL} -n {NS}" in notes and "kubectl get modelrollouts -A" in notes
    assert "each ModelRollout needs spec.metrics.url" in notes  # no operator.prometheusUrl set
    proc = tools.run(tools.helm, "install", FULL, CHART, "-n", NS, "--dry-run=client", "-f",
                     CHART / "ci" / "namespaced-values.yaml", check=True)  # fmt: skip
    assert "driving ModelRollouts in namespace models only" in proc.stdout
    assert "spec.metrics.url" not in proc.stdout.split("NOTES:", 1)[1]


def test_readme_documents_every_value():
    cmd = [sys.executable, "helm/values_doc.py", "helm/mlrollout-operator", "--check"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------- helm test


def test_helm_test_script_passes_on_a_real_operator_endpoint_and_fails_on_503(render):
    """The hook's own Python, run here against health.serve with the operator's real registry."""
    pod = one(render(), "Pod")
    c = pod["spec"]["containers"][0]
    assert c["command"][:2] == ["python", "-c"]
    assert {e["name"]: e["value"] for e in c["env"]}["BASE_URL"] == f"http://{FULL}-metrics.{NS}.svc:8080"
    problem: list[str | None] = [None]
    server = health.serve(0, OperatorMetrics().registry, lambda: problem[0], addr="127.0.0.1")
    try:
        env = {**os.environ, "BASE_URL": f"http://127.0.0.1:{server.server_port}", "ATTEMPTS": "1"}
        ok = subprocess.run([sys.executable, "-c", c["command"][2]], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
        assert ok.returncode == 0 and "/healthz ok" in ok.stdout, ok.stderr
        problem[0] = "thread(s) watch stopped"
        bad = subprocess.run([sys.executable, "-c", c["command"][2]], env=env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert bad.returncode != 0 and "/healthz answered (503" in bad.stderr, bad.stderr
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------- kustomize


def test_kustomize_manifests_are_generated_from_the_chart_and_current():
    proc = subprocess.run([sys.executable, "helm/operator_manifests.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def kustomize_labels(node):
    """``node`` with the two Helm-only labels as helm/operator_manifests.py rewrites them."""
    if isinstance(node, list):
        return [kustomize_labels(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: kustomize_labels(v) for k, v in node.items() if k != "helm.sh/chart"}
    if out.get("app.kubernetes.io/managed-by") == "Helm":
        out["app.kubernetes.io/managed-by"] = "kustomize"
    return out


def _key(o: dict) -> tuple:
    return (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])


@pytest.mark.parametrize(
    ("overlay", "sets"), [("cluster-wide", ()), ("namespaced", ("watchNamespaces={models}",))]
)
def test_kustomize_build_equals_helm_template_but_for_the_helm_labels(tools, render, overlay, sets):
    out = tools.run(tools.kubectl, "kustomize", MANIFESTS / "operator" / overlay, check=True).stdout
    built = {_key(o): o for o in load_docs(out)}
    crd = yaml.safe_load((CHART / "crds" / "modelrollouts.mlrollout.io.yaml").read_text())
    want = {_key(o): o for o in render(sets=("test.enabled=false", *sets))} | {_key(crd): crd}
    assert built.keys() == want.keys()
    for key, obj in want.items():
        assert built[key] == kustomize_labels(obj), key
    assert assert_restricted(list(built.values())) == 1


# ------------------------------------------------------------------------------------------- Argo CD health


def argocd_health_lua() -> str:
    readme = (CHART / "README.md").read_text()
    block = readme.split("<!-- argocd-health:begin -->", 1)[1].split("<!-- argocd-health:end -->", 1)[0]
    cm = yaml.safe_load(block.strip().removeprefix("```yaml").removesuffix("```"))
    return cm["data"]["resource.customizations.health.mlrollout.io_ModelRollout"]


def mr(version: str = "1.1.0", generation: int = 2, **status) -> dict:
    obj = {"metadata": {"generation": generation}, "spec": {"model": {"version": version}}}
    if status:
        obj["status"] = status
    return obj


ST = {"stableVersion": "1.0.0", "canaryVersion": "1.1.0", "observedGeneration": 2}
HEALTH_CASES = {
    "no status yet": (mr(), "Progressing", "waiting for the operator"),
    # a first install (gitops.py): the desired model is the stable one, no canary
    "initialized": (
        mr("1.0.0", stableVersion="1.0.0", observedGeneration=2, phase="Initialized"),
        "Healthy",
        "1.0.0 serves (Initialized)",
    ),
    "initialized, a new version desired": (
        mr("1.1.0", 3, stableVersion="1.0.0", observedGeneration=2, phase="Initialized"),
        "Progressing",
        "a rollout of 1.1.0",
    ),
    "progressing": (mr(**ST, phase="Progressing", canaryWeight=25), "Progressing", "canary 1.1.0 at 25%"),
    "paused": (
        mr(**ST, phase="Paused", canaryWeight=10, message="5 inconclusive"),
        "Suspended",
        "paused at weight 10%",
    ),
    # the watch after promotion: promoted, not yet final (a failure restores 1.0.0)
    "verifying": (
        mr(**ST, phase="Verifying", canaryWeight=100, message="hold: watch after promotion passed 1/3"),
        "Progressing",
        "1.1.0 promoted, watched after promotion: hold",
    ),
    "promoted": (mr(**ST, phase="Promoted", canaryWeight=100), "Healthy", "1.1.0 serves (Promoted)"),
    "rolled back": (
        mr(**ST, phase="RolledBack", message="success rate 0.7 < 0.99"),
        "Degraded",
        "1.1.0 was RolledBack",
    ),
    "aborted": (mr(**ST, phase="Aborted"), "Degraded", "1.1.0 was Aborted"),
    "spec reverted to the stable after a rollback": (
        mr("1.0.0", **ST, phase="RolledBack"),
        "Healthy",
        "1.0.0 serves",
    ),
    "new version after a promotion": (
        mr("1.2.0", 3, **ST, phase="Promoted"),
        "Progressing",
        "a rollout of 1.2.0",
    ),
    "spec refused": (
        mr(observedGeneration=2, message="only spec.target.release is driven"),
        "Degraded",
        "only spec",
    ),
    "observed, nothing to do": (mr(observedGeneration=2), "Healthy", "nothing to roll out: 1.1.0 serves"),
    "not observed yet": (mr(generation=3, observedGeneration=2), "Progressing", "waiting for the operator"),
    "refusal of an older generation": (
        mr(generation=3, observedGeneration=2, message="old"),
        "Progressing",
        "waiting for the operator",  # an older generation's refusal is not this spec's
    ),
}


@pytest.mark.parametrize("case", sorted(HEALTH_CASES))
def test_argocd_health_check_runs_in_lua_5_1(case):
    lua51 = pytest.importorskip("lupa.lua51", reason="lupa (requirements.lock) not installed")
    obj, status, message = HEALTH_CASES[case]
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"  # gopher-lua, which Argo CD embeds, is Lua 5.1
    # Argo CD runs the script as a function body with the object as the global `obj`
    fn = lua.execute(f"return function(obj)\n{argocd_health_lua()}\nend")
    hs = fn(lua.table_from(obj, recursive=True))
    assert (hs["status"], message in hs["message"]) == (status, True), dict(hs)
