#!/usr/bin/env bash
# The install steps `make cluster` (infra/cluster-up.sh) and the local control plane
# (`python -m infra.controlplane up`) share: one code path; only where charts and CRDs come from differs.
#
#   bash infra/install.sh STEP...        run steps in order (each is idempotent)
#   . infra/install.sh                    (from another script: defines the functions, runs nothing)
#
# Steps: gateway_api_crds envoy_gateway_crds kserve_charts kserve_admission kserve_runtimes model_namespace
#        mlrollout_operator
#
# Sources, defaulting to the registries and release URLs `make cluster` uses; the control plane points them
# at the same files inside the pinned Go modules (offline):
#   GATEWAY_API_CRDS   the Gateway API standard-install.yaml, or a folder holding the standard-channel CRDs
#   EG_CRDS_CHART      Envoy Gateway's gateway-crds-helm chart (oci://...), or its folder
#   KSERVE_CHARTS      the folder/OCI prefix holding kserve-crd, kserve-resources, kserve-runtime-configs
#   KSERVE_HELM_ARGS   extra arguments for the kserve-resources release (the control plane's post-renderer)
#   KSERVE_VALUES      extra values file for kserve-resources (PROFILE=knative: infra/kserve-values-knative.yaml)
#   OPERATOR_HELM_ARGS extra arguments for the mlrollout-operator release (e.g. --set watchNamespaces={models})
set -euo pipefail

_install_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${_install_here}/lib.sh"

GATEWAY_API_CRDS="${GATEWAY_API_CRDS:-https://github.com/kubernetes-sigs/gateway-api/releases/download/${GATEWAY_API_VERSION}/standard-install.yaml}"
EG_CRDS_CHART="${EG_CRDS_CHART:-oci://docker.io/envoyproxy/gateway-crds-helm}"
KSERVE_CHARTS="${KSERVE_CHARTS:-oci://ghcr.io/kserve/charts}"
KSERVE_HELM_ARGS="${KSERVE_HELM_ARGS:-}"
KSERVE_VALUES="${KSERVE_VALUES:-}"
OPERATOR_HELM_ARGS="${OPERATOR_HELM_ARGS:-}"
INSTALL_WAIT="${INSTALL_WAIT:-300}"

# Gateway API CRDs, standard channel, owned by one manager. The Envoy Gateway chart carries its own
# (experimental) copy of them in crds/; see envoy_gateway_crds for why that copy is never installed.
gateway_api_crds() {
  retry 5 5 "${KUBECTL}" apply --server-side --force-conflicts -f "${GATEWAY_API_CRDS}"
  timed "Gateway API CRDs established" "${KUBECTL}" wait --for=condition=Established --timeout=60s \
    crd/gatewayclasses.gateway.networking.k8s.io crd/gateways.gateway.networking.k8s.io crd/httproutes.gateway.networking.k8s.io
}

# Envoy Gateway's own CRDs (EnvoyProxy, BackendTrafficPolicy, ...), without the Gateway API ones. Helm 4
# installs a chart's crds/ by server-side apply (not create-or-skip as Helm 3 did), so the gateway-helm
# chart would re-apply the experimental Gateway API CRDs over the standard ones above: an SSA conflict,
# and the standard channel's `safe-upgrades` ValidatingAdmissionPolicy refuses experimental-over-standard
# anyway. So the EG chart is installed with --skip-crds (cluster-up.sh) and its CRDs come from here.
envoy_gateway_crds() {
  run_sh "\"${HELM}\" template eg-crds \"${EG_CRDS_CHART}\" --version \"${ENVOY_GATEWAY_VERSION}\" --set crds.gatewayAPI.enabled=false --set crds.envoyGateway.enabled=true | \"${KUBECTL}\" apply --server-side -f - >&2"
  timed "Envoy Gateway CRDs established" "${KUBECTL}" wait --for=condition=Established --timeout=60s \
    crd/envoyproxies.gateway.envoyproxy.io crd/backendtrafficpolicies.gateway.envoyproxy.io
}

# KServe's CRDs and controller resources (Standard mode, Gateway API; infra/kserve-values.yaml). The
# storage-initializer's `restricted` securityContext is a chart value there, so Helm owns all of it.
kserve_charts() {
  local values=(-f "${INFRA_DIR}/kserve-values.yaml") extra=()
  [ -n "${KSERVE_VALUES}" ] && values+=(-f "${KSERVE_VALUES}")
  # shellcheck disable=SC2206  # KSERVE_HELM_ARGS is a list of plain words by contract
  [ -n "${KSERVE_HELM_ARGS}" ] && extra=(${KSERVE_HELM_ARGS})
  timed "KServe CRDs chart" "${HELM}" upgrade --install kserve-crd "${KSERVE_CHARTS}/kserve-crd" \
    --version "v${KSERVE_VERSION}" -n kserve --create-namespace --wait --timeout "${INSTALL_WAIT}s"
  # the chart's cert-manager Certificate can hit cert-manager's own webhook before it serves: retried
  retry 6 10 "${HELM}" upgrade --install kserve "${KSERVE_CHARTS}/kserve-resources" \
    --version "v${KSERVE_VERSION}" -n kserve "${values[@]}" "${extra[@]}" --wait --timeout "${INSTALL_WAIT}s"
}

# The webhook answers "connection refused" / x509 for a while after it starts (kserve#4182, #5037,
# #3748): prove admission works with a server-side dry-run, retried, before anything depends on it.
kserve_admission() {
  retry 12 5 "${KUBECTL}" apply --dry-run=server -f "${INFRA_DIR}/manifests/kserve-webhook-probe.yaml"
}

# KServe's own ClusterServingRuntimes (kserve-tritonserver for `model.runtime: triton`, ...) live in the
# kserve-runtime-configs chart, off by default; then the project's runtimes (manifests/base/runtime).
# Both are checked by KServe's ServingRuntime webhook, so this runs after kserve_admission.
kserve_runtimes() {
  retry 6 5 "${HELM}" upgrade --install kserve-runtime-configs "${KSERVE_CHARTS}/kserve-runtime-configs" \
    --version "v${KSERVE_VERSION}" -n kserve --set kserve.servingruntime.enabled=true --wait --timeout "${INSTALL_WAIT}s"
  retry 6 5 "${KUBECTL}" apply -k "${REPO_ROOT}/manifests/base/runtime"
}

# The S3 Secret KServe's storage-initializer uses, copied from KFP's own (so no credential is in git),
# with the annotations KServe turns into S3_ENDPOINT & co (the same settings as the chart's `storage.s3`
# defaults). Path-style addressing: SeaweedFS needs it; region `minio` is what KFP's launcher uses.
create_storage_secret() {
  printf '+ copy kubeflow/mlpipeline-minio-artifact -> %s/kfp-s3-credentials (KServe S3 annotations)\n' "${MODEL_NAMESPACE}"
  [ "${DRY_RUN}" = 1 ] && return 0
  local access secret
  access="$("${KUBECTL}" -n kubeflow get secret mlpipeline-minio-artifact -o jsonpath='{.data.accesskey}' | base64 -d)"
  secret="$("${KUBECTL}" -n kubeflow get secret mlpipeline-minio-artifact -o jsonpath='{.data.secretkey}' | base64 -d)"
  if [ -z "${access}" ] || [ -z "${secret}" ]; then
    die "kubeflow/mlpipeline-minio-artifact has no accesskey/secretkey"
  fi
  "${KUBECTL}" -n "${MODEL_NAMESPACE}" create secret generic kfp-s3-credentials \
    --from-literal=AWS_ACCESS_KEY_ID="${access}" --from-literal=AWS_SECRET_ACCESS_KEY="${secret}" \
    --dry-run=client -o yaml | "${KUBECTL}" apply -f - >&2
  "${KUBECTL}" -n "${MODEL_NAMESPACE}" annotate --overwrite secret kfp-s3-credentials \
    serving.kserve.io/s3-endpoint=seaweedfs.kubeflow.svc.cluster.local:9000 \
    serving.kserve.io/s3-usehttps=0 serving.kserve.io/s3-verifyssl=0 \
    serving.kserve.io/s3-region=minio serving.kserve.io/s3-usevirtualbucket=0 >&2
}

# The model namespace (Pod Security `restricted`), KFP <-> KServe wiring and the S3 Secret.
model_namespace() {
  apply_rendered "${INFRA_DIR}/manifests/model-namespace.yaml"
  create_storage_secret
}

# The rollout operator (helm/mlrollout-operator: the ModelRollout CRD, two replicas, RBAC, metrics) in
# ${OPERATOR_NAMESPACE} under `restricted`, after KServe (it drives InferenceServices). Its image is the
# serving image `make cluster` builds and loads (image.tag defaults to the chart's appVersion =
# MLROLLOUT_VERSION); rollouts without spec.metrics.url use the platform's Prometheus.
mlrollout_operator() {
  local extra=()
  # shellcheck disable=SC2206  # OPERATOR_HELM_ARGS is a list of plain words by contract
  [ -n "${OPERATOR_HELM_ARGS}" ] && extra=(${OPERATOR_HELM_ARGS})
  apply_rendered "${INFRA_DIR}/manifests/operator-namespace.yaml"
  timed "mlrollout-operator chart" "${HELM}" upgrade --install mlrollout-operator "${REPO_ROOT}/helm/mlrollout-operator" \
    -n "${OPERATOR_NAMESPACE}" --set image.repository="${MLROLLOUT_RUNTIME_IMAGE}" --set image.tag="${MLROLLOUT_VERSION}" \
    --set operator.prometheusUrl=http://prometheus.monitoring.svc:9090 "${extra[@]}" --wait --timeout "${INSTALL_WAIT}s"
}

install_main() {
  local s
  [ $# -gt 0 ] || die "usage: install.sh STEP... (gateway_api_crds envoy_gateway_crds kserve_charts kserve_admission kserve_runtimes model_namespace mlrollout_operator)"
  for s in "$@"; do
    case "${s}" in
      gateway_api_crds|envoy_gateway_crds|kserve_charts|kserve_admission|kserve_runtimes|model_namespace|mlrollout_operator) ;;
      *) die "unknown step '${s}'" ;;
    esac
  done
  for s in "$@"; do
    step "${s}"
    "${s}"
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  install_main "$@"
fi
