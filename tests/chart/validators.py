"""Validators for rendered Kubernetes objects, used by the chart and kustomize tests.

- Built-in kinds: the real Kubernetes 1.37 JSON schemas (`kubernetes-validate`, strict: unknown fields fail).
- KServe kinds (InferenceService, ClusterServingRuntime, ...): KServe's own SDK models (kserve 0.21.0).
  The object is built bottom-up through the generated classes: every key must be in the class's
  `attribute_map`, every value must have the declared type, and the class constructors run their own
  client-side checks (required fields such as a container's `name`). Nested Kubernetes types resolve to
  the `kubernetes` client's models.
- HTTPRoute (gateway.networking.k8s.io/v1): no Gateway API CRD or schema is installable offline here (PyPI
  has none; the npm models ship compiled JS validators only), so `check_httproute` is a hand-written strict
  structural check of the v1 (standard channel) fields the chart uses and their documented limits.
"""

from __future__ import annotations

import re
from typing import Any

import kserve.models as kserve_models
import kubernetes.client.models as k8s_models
import kubernetes_validate

K8S_VERSION = "1.37.0"

KSERVE_KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
}
# the SDK names a few nested types it does not ship; they are the Kubernetes types of the same shape
ALIASES = {"K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy", "ResourceQuantity": "str"}
PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}


class InvalidObject(AssertionError):
    """An object does not match its schema; the message names the object and the field path."""


def _ident(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name')}"


# ---------------------------------------------------------------- built-in kinds


def check_builtin(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise InvalidObject(f"{_ident(obj)}: at '{path}': {exc.message}") from None


# ---------------------------------------------------------------- KServe kinds via the SDK models


def _resolve_class(name: str):
    name = ALIASES.get(name, name)
    for module in (kserve_models, k8s_models):
        cls = getattr(module, name, None)
        if cls is not None:
            return cls
    return None


def _build(value: Any, type_str: str, path: str) -> Any:
    """Build `value` as `type_str` (an OpenAPI generator type string); raise InvalidObject on any mismatch."""
    type_str = ALIASES.get(type_str, type_str)
    if value is None:
        return None
    m = re.fullmatch(r"list\[(.+)\]", type_str)
    if m:
        if not isinstance(value, list):
            raise InvalidObject(f"{path}: expected a list, got {type(value).__name__}")
        return [_build(v, m.group(1), f"{path}[{i}]") for i, v in enumerate(value)]
    m = re.fullmatch(r"dict\(str, (.+)\)", type_str)
    if m:
        if not isinstance(value, dict):
            raise InvalidObject(f"{path}: expected a map, got {type(value).__name__}")
        return {k: _build(v, m.group(1), f"{path}.{k}") for k, v in value.items()}
    if type_str == "object":  # free-form in the API (int-or-string, raw JSON)
        return value
    if type_str in PRIMITIVES:
        ok = PRIMITIVES[type_str]
        if isinstance(value, bool) and bool not in ok:
            raise InvalidObject(f"{path}: expected {type_str}, got bool")
        if not isinstance(value, ok):
            raise InvalidObject(f"{path}: expected {type_str}, got {type(value).__name__} {value!r}")
        return value
    cls = _resolve_class(type_str)
    if cls is None:
        raise InvalidObject(f"{path}: the SDK has no model for type {type_str}")
    if not isinstance(value, dict):
        raise InvalidObject(f"{path}: expected an object ({type_str}), got {type(value).__name__}")
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_json))
    if unknown:
        raise InvalidObject(f"{path}: unknown field(s) {unknown} for {cls.__name__}")
    kwargs = {by_json[k]: _build(v, cls.openapi_types[by_json[k]], f"{path}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidObject(f"{path}: {cls.__name__}: {exc}") from None


def check_kserve(obj: dict):
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in KSERVE_KINDS:
        raise InvalidObject(f"{_ident(obj)}: not a KServe kind this validator knows: {key}")
    return _build(obj, KSERVE_KINDS[key], _ident(obj))


# ---------------------------------------------------------------- Gateway API HTTPRoute (structural)

_DNS_HOST = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")


def _fields(d: Any, allowed: set[str], required: set[str], path: str) -> dict:
    if not isinstance(d, dict):
        raise InvalidObject(f"{path}: expected an object")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise InvalidObject(f"{path}: unknown field(s) {unknown}")
    missing = sorted(required - set(d))
    if missing:
        raise InvalidObject(f"{path}: missing required field(s) {missing}")
    return d


def _list(d: Any, path: str, max_items: int) -> list:
    if not isinstance(d, list):
        raise InvalidObject(f"{path}: expected a list")
    if len(d) > max_items:
        raise InvalidObject(f"{path}: at most {max_items} items, got {len(d)}")
    return d


def _port(v: Any, path: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
        raise InvalidObject(f"{path}: port must be an integer 1-65535, got {v!r}")


def _backend_ref(ref: Any, path: str, with_weight: bool) -> None:
    allowed = {"group", "kind", "name", "namespace", "port"} | (
        {"weight", "filters"} if with_weight else set()
    )
    _fields(ref, allowed, {"name"}, path)
    if ref.get("kind", "Service") == "Service" and ref.get("group", "") == "" and "port" not in ref:
        raise InvalidObject(f"{path}: a Service backendRef needs a port")
    if "port" in ref:
        _port(ref["port"], f"{path}.port")
    if not _DNS_LABEL.match(str(ref["name"])) or len(ref["name"]) > 63:
        raise InvalidObject(f"{path}.name: {ref['name']!r} is not a valid Service name")
    if "weight" in ref:
        w = ref["weight"]
        if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 1_000_000:
            raise InvalidObject(f"{path}.weight: must be an integer 0-1000000, got {w!r}")


def check_httproute(obj: dict) -> None:
    ident = _ident(obj)
    _fields(
        obj,
        {"apiVersion", "kind", "metadata", "spec", "status"},
        {"apiVersion", "kind", "metadata", "spec"},
        ident,
    )
    if obj["apiVersion"] != "gateway.networking.k8s.io/v1" or obj["kind"] != "HTTPRoute":
        raise InvalidObject(f"{ident}: expected gateway.networking.k8s.io/v1 HTTPRoute")
    # metadata is a plain ObjectMeta: check it with the real Kubernetes schema through a ConfigMap shell
    check_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})
    spec = _fields(obj["spec"], {"parentRefs", "hostnames", "rules"}, set(), f"{ident}.spec")
    for i, ref in enumerate(_list(spec.get("parentRefs", []), f"{ident}.spec.parentRefs", 32)):
        p = f"{ident}.spec.parentRefs[{i}]"
        _fields(ref, {"group", "kind", "namespace", "name", "sectionName", "port"}, {"name"}, p)
        if "port" in ref:
            _port(ref["port"], f"{p}.port")
    for i, host in enumerate(_list(spec.get("hostnames", []), f"{ident}.spec.hostnames", 16)):
        if not isinstance(host, str) or len(host) > 253 or not _DNS_HOST.match(host):
            raise InvalidObject(f"{ident}.spec.hostnames[{i}]: {host!r} is not a valid hostname")
    for r, rule in enumerate(_list(spec.get("rules", []), f"{ident}.spec.rules", 16)):
        p = f"{ident}.spec.rules[{r}]"
        _fields(rule, {"name", "matches", "filters", "backendRefs", "timeouts", "retry"}, set(), p)
        for m, match in enumerate(_list(rule.get("matches", []), f"{p}.matches", 64)):
            mp = f"{p}.matches[{m}]"
            _fields(match, {"path", "headers", "queryParams", "method"}, set(), mp)
            if "path" in match:
                path = _fields(match["path"], {"type", "value"}, set(), f"{mp}.path")
                if path.get("type", "PathPrefix") not in {"Exact", "PathPrefix", "RegularExpression"}:
                    raise InvalidObject(f"{mp}.path.type: unsupported {path.get('type')!r}")
                if not str(path.get("value", "/")).startswith("/"):
                    raise InvalidObject(f"{mp}.path.value: must start with '/'")
        for f, flt in enumerate(_list(rule.get("filters", []), f"{p}.filters", 16)):
            fp = f"{p}.filters[{f}]"
            kinds = {
                "RequestHeaderModifier": "requestHeaderModifier",
                "ResponseHeaderModifier": "responseHeaderModifier",
                "RequestMirror": "requestMirror",
                "RequestRedirect": "requestRedirect",
                "URLRewrite": "urlRewrite",
                "ExtensionRef": "extensionRef",
            }
            _fields(flt, {"type", *kinds.values()}, {"type"}, fp)
            if flt["type"] not in kinds:
                raise InvalidObject(f"{fp}.type: unsupported filter type {flt['type']!r}")
            if kinds[flt["type"]] not in flt or set(flt) - {"type", kinds[flt["type"]]}:
                raise InvalidObject(f"{fp}: type {flt['type']} needs exactly the field {kinds[flt['type']]}")
            if flt["type"] == "RequestMirror":
                mirror = _fields(
                    flt["requestMirror"],
                    {"backendRef", "percent", "fraction"},
                    {"backendRef"},
                    f"{fp}.requestMirror",
                )
                _backend_ref(mirror["backendRef"], f"{fp}.requestMirror.backendRef", with_weight=False)
        refs = _list(rule.get("backendRefs", []), f"{p}.backendRefs", 16)
        for b, ref in enumerate(refs):
            _backend_ref(ref, f"{p}.backendRefs[{b}]", with_weight=True)
        if "timeouts" in rule:
            t = _fields(rule["timeouts"], {"request", "backendRequest"}, set(), f"{p}.timeouts")
            for k, v in t.items():
                if not isinstance(v, str) or not _DURATION.match(v):
                    raise InvalidObject(f"{p}.timeouts.{k}: {v!r} is not a Gateway API duration")


# ---------------------------------------------------------------- dispatch


def check_object(obj: dict) -> str:
    """Validate one rendered object with the right validator; return which one ran."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in KSERVE_KINDS:
        check_kserve(obj)
        return "kserve-sdk"
    if key == ("gateway.networking.k8s.io/v1", "HTTPRoute"):
        check_httproute(obj)
        return "gateway-api-structural"
    check_builtin(obj)
    return "kubernetes-1.37"


def pod_specs(objs: list[dict]):
    """(where, pod-level securityContext, [containers], pod spec) for every pod spec we control. A
    Knative-mode InferenceService has no pod-level securityContext (Knative rejects it): None."""
    for o in objs:
        where = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "InferenceService":
            pred = o["spec"]["predictor"]
            yield where, pred.get("securityContext"), [pred["model"]], pred
        elif o["kind"] == "ClusterServingRuntime":
            yield where, None, o["spec"]["containers"], o["spec"]
        elif o["kind"] == "Pod":
            yield where, o["spec"]["securityContext"], o["spec"]["containers"], o["spec"]
        elif o["kind"] == "Deployment":  # the operator chart's
            spec = o["spec"]["template"]["spec"]
            yield where, spec["securityContext"], spec["containers"], spec


def assert_restricted(objs: list[dict]) -> int:
    """Every pod spec and container in ``objs`` meets Pod Security 'restricted' (non-root, seccomp
    RuntimeDefault, no privilege escalation, all capabilities dropped, read-only root filesystem, no
    service-account token) and sets resources. Returns how many containers were checked.

    The container-level checks alone satisfy 'restricted' (runAsNonRoot and seccompProfile may be set per
    container), which is how a Knative-mode predictor, with no pod-level securityContext, passes."""
    seen = 0
    for where, pod_ctx, containers, spec in pod_specs(objs):
        if pod_ctx is not None:
            assert pod_ctx["runAsNonRoot"] is True, where
            assert pod_ctx.get("runAsUser", 1) != 0, where
            assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
        if not where.startswith("ClusterServingRuntime/"):
            assert spec.get("automountServiceAccountToken") is False, where
        for c in containers:
            ctx = c["securityContext"]
            assert ctx["runAsNonRoot"] is True, where
            assert ctx.get("runAsUser", 1) != 0, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "limits" in c.get("resources", {}) and "requests" in c.get("resources", {}), where
            seen += 1
    return seen


# ---------------------------------------------------------------- Knative admission (default feature flags)

# knative/serving knative-v1.21.1 with its default feature flags (pkg/apis/config/features.go:92,113:
# kubernetes.podspec-securitycontext and secure-pod-defaults both Disabled):
# - PodSecurityContextMask (pkg/apis/serving/fieldmask.go:663-702) keeps nothing, so every pod-level
#   securityContext field is rejected (k8s_validation.go:941-946);
# - SecurityContextMask (fieldmask.go:707-738) keeps these container fields, `privileged` only when false;
# - CapabilitiesMask (fieldmask.go:743-764) keeps only `drop` (`add` needs containerspec-addcapabilities);
# - validateContainersPorts (k8s_validation.go:501-533): at most one port across all containers.
KNATIVE_POD_SECURITY_CONTEXT_FIELDS: frozenset[str] = frozenset()
KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS = frozenset(
    {
        "capabilities",
        "readOnlyRootFilesystem",
        "runAsUser",
        "runAsGroup",
        "runAsNonRoot",
        "allowPrivilegeEscalation",
        "seccompProfile",
        "privileged",
    }
)
KNATIVE_CAPABILITIES_FIELDS = frozenset({"drop"})


def _knative_container_context(ctx: dict | None, where: str) -> None:
    if not ctx:
        return
    extra = sorted(set(ctx) - KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS)
    if extra:
        raise InvalidObject(f"{where}: container securityContext field(s) Knative rejects: {extra}")
    if ctx.get("privileged") is not None and ctx["privileged"] is not False:
        raise InvalidObject(f"{where}: Knative allows securityContext.privileged only as false")
    caps = sorted(set(ctx.get("capabilities") or {}) - KNATIVE_CAPABILITIES_FIELDS)
    if caps:
        raise InvalidObject(f"{where}: securityContext.capabilities field(s) Knative rejects: {caps}")


def check_knative_admissible(isvc: dict, runtime: dict) -> None:
    """What Knative's webhook checks on the Knative Service KServe builds from ``isvc`` and its
    ``runtime`` (KServe merges the runtime's containers with the predictor's model container): no
    pod-level securityContext field, only masked container fields, one container port in all."""
    where = _ident(isvc)
    pred = isvc["spec"]["predictor"]
    pod_ctx = pred.get("securityContext") or {}
    extra = sorted(set(pod_ctx) - KNATIVE_POD_SECURITY_CONTEXT_FIELDS)
    if extra:
        raise InvalidObject(f"{where}: pod-level securityContext field(s) Knative rejects: {extra}")
    _knative_container_context(pred["model"].get("securityContext"), f"{where}.spec.predictor.model")
    for c in runtime["spec"]["containers"]:
        _knative_container_context(c.get("securityContext"), f"{_ident(runtime)} container {c['name']}")
    ports = [p for c in [*runtime["spec"]["containers"], pred["model"]] for p in c.get("ports") or []]
    if len(ports) > 1:
        raise InvalidObject(
            f"{where}: {len(ports)} container ports across the containers; Knative allows only one"
        )


# ---------------------------------------------------------------- RBAC of a release (the pipeline's hand-off)

PIPELINE_VERBS = {"create", "get", "patch", "list", "watch"}


def assert_pipeline_rbac(objs: list[dict], role: str, runner: dict | None, name: str | None = None) -> None:
    """The release's RBAC (helm/mlrollout-model/templates/rbac.yaml): one Role ``role``, bound to ``runner``
    (KFP's pipeline-runner) alone, that grants create/get/patch/list/watch on ModelRollouts and nothing
    else: no InferenceServices, routes, ConfigMaps, Secrets, tokens, delete or wildcards anywhere, and no
    identity for anybody to act as. ``name``: get/patch/list/watch are limited to that one ModelRollout
    (the chart; kustomize overlays cannot rename such a name, so there they are not)."""
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert not [
        o for o in objs if o["kind"] == "ServiceAccount" and o["metadata"]["name"].endswith("-deployer")
    ]
    roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Role"}
    bindings = {o["metadata"]["name"]: o for o in objs if o["kind"] == "RoleBinding"}
    if runner is None:
        assert not roles and not bindings, sorted(roles)
        return
    assert set(roles) == {role} and set(bindings) == {role}, (sorted(roles), sorted(bindings))
    rules = roles[role]["rules"]
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}: {rule}"
        assert rule["apiGroups"] == ["mlrollout.io"] and rule["resources"] == ["modelrollouts"], rule
        assert set(rule["verbs"]) <= PIPELINE_VERBS, rule
    assert {v for rule in rules for v in rule["verbs"]} == PIPELINE_VERBS
    if name is not None:
        for rule in rules:
            # create cannot be limited by name; everything else is, to the release's one ModelRollout
            assert rule.get("resourceNames") == (None if rule["verbs"] == ["create"] else [name]), rule
    assert bindings[role]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role,
    }
    assert bindings[role]["subjects"] == [runner]
