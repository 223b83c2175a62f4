#!/usr/bin/env bash
# Bring up the mlrollout kind platform (`make cluster`):
#
#   kind cluster -> serving image built + `kind load`ed -> cert-manager -> Gateway API CRDs ->
#   Envoy Gateway CRDs -> Envoy Gateway + GatewayClass/Gateway -> [knative profile: Knative Serving +
#   Kourier] -> KServe (Standard mode, Gateway API) + its runtimes + ours -> KFP 2.17 standalone
#   (cluster-scoped-resources, then env/platform-agnostic) -> Prometheus -> KFP<->KServe wiring of the
#   model namespace -> the rollout operator (helm/mlrollout-operator in mlrollout-system).
#
# The steps shared with the local control plane (CRDs, KServe's charts and admission, the runtimes, the
# model namespace, the operator chart) are the functions of infra/install.sh; this script adds what only kind has (nodes that
# run containers, images, cert-manager, the gateway data plane, KFP, Prometheus).
#
#   bash infra/cluster-up.sh [--dry-run] [--profile knative] [--skip-image] [--preflight-only]
#
# Idempotent: every step is `kubectl apply` / `helm upgrade --install` / "create if missing", so a
# second run (or a run after a failure) converges. Every wait has a timeout and prints how long it
# took; the KServe webhook race right after install is retried (see `retry` in infra/lib.sh).
# Every version comes from infra/versions.env. Settings: CLUSTER_NAME (mlrollout), MODEL_NAMESPACE
# (models), PROFILE (default|knative), and KIND/DOCKER/KUBECTL/HELM to point at other binaries.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=install.sh
. "${here}/install.sh"

PROFILE="${PROFILE:-default}"
SKIP_IMAGE=0
PREFLIGHT_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --profile) [ $# -ge 2 ] || die "--profile needs a value (default or knative)"; PROFILE="$2"; shift ;;
    --profile=*) PROFILE="${1#--profile=}" ;;
    --skip-image) SKIP_IMAGE=1 ;;
    --preflight-only) PREFLIGHT_ONLY=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
  shift
done
case "${PROFILE}" in default|knative) ;; *) die "unknown profile '${PROFILE}': use default or knative" ;; esac
[ "${PROFILE}" = knative ] && KSERVE_VALUES="${INFRA_DIR}/kserve-values-knative.yaml"
INSTALL_WAIT=300

RUNTIME_IMAGE="${MLROLLOUT_RUNTIME_IMAGE}:${MLROLLOUT_VERSION}"
KFP_KUSTOMIZE="github.com/kubeflow/pipelines/manifests/kustomize"
WAIT_SHORT=300   # a controller Deployment (first image pull included)
WAIT_LONG=900    # KFP: mysql + metadata + api server pull ~2 GB of images on a cold node

# ---------------------------------------------------------------- preflight
# What cannot be bootstrapped (docker engine, kind) is checked before anything else and reported in
# ONE line; helm/kubectl come from `make tools`.
preflight() {
  local missing=() hints=() out
  if ! command -v "${DOCKER}" >/dev/null 2>&1; then
    missing+=("docker"); hints+=("install Docker Engine (https://docs.docker.com/engine/install/)")
  elif ! out="$(timeout 20 "${DOCKER}" info --format '{{.ServerVersion}}' 2>&1)"; then
    missing+=("a running docker engine (docker info: $(tail -n1 <<<"${out}"))")
    hints+=("start it (sudo systemctl start docker) or set DOCKER_HOST")
  fi
  if ! command -v "${KIND}" >/dev/null 2>&1; then
    missing+=("kind"); hints+=("install kind ${KIND_VERSION}: go install sigs.k8s.io/kind@${KIND_VERSION} or https://kind.sigs.k8s.io/docs/user/quick-start/#installation")
  fi
  if [ "${PREFLIGHT_ONLY}" = 0 ]; then
    command -v "${KUBECTL}" >/dev/null 2>&1 || { missing+=("kubectl"); hints+=("run make tools"); }
    command -v "${HELM}" >/dev/null 2>&1 || { missing+=("helm"); hints+=("run make tools"); }
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    local what how i
    what="${missing[0]}"; how="${hints[0]}"
    for ((i = 1; i < ${#missing[@]}; i++)); do
      what+=", ${missing[i]}"
      [[ "${how}" == *"${hints[i]}"* ]] || how+="; ${hints[i]}"
    done
    printf 'make cluster: missing %s -> %s\n' "${what}" "${how}" >&2
    exit 2
  fi
}

check_host() {
  local v
  v="$("${KIND}" version 2>/dev/null | awk '{print $2}')" || true
  [ "${v}" = "${KIND_VERSION}" ] || log "note: kind ${v:-?} found, ${KIND_VERSION} is the tested version"
  if [ -r /proc/sys/fs/inotify/max_user_instances ]; then
    local inst watches
    inst="$(cat /proc/sys/fs/inotify/max_user_instances)"; watches="$(cat /proc/sys/fs/inotify/max_user_watches)"
    if [ "${inst}" -lt 512 ] || [ "${watches}" -lt 524288 ]; then
      log "WARNING: inotify limits are low (max_user_instances=${inst}, max_user_watches=${watches}); KFP pods may"
      log "         crash-loop with 'too many open files'. Fix: sudo sysctl fs.inotify.max_user_instances=1280 fs.inotify.max_user_watches=655360"
    fi
  fi
}

# ---------------------------------------------------------------- steps
kind_cluster() {
  if [ "${DRY_RUN}" = 0 ] && "${KIND}" get clusters 2>/dev/null | grep -qx "${CLUSTER_NAME}"; then
    log "kind cluster '${CLUSTER_NAME}' exists: reusing it"
    run "${KUBECTL}" config use-context "kind-${CLUSTER_NAME}"
    return 0
  fi
  timed "kind cluster ${CLUSTER_NAME}" "${KIND}" create cluster --name "${CLUSTER_NAME}" \
    --image "${KIND_NODE_IMAGE}" --config "${INFRA_DIR}/kind-config.yaml" --wait 180s
}

serving_image() {
  if [ "${SKIP_IMAGE}" = 1 ]; then log "--skip-image: not building ${RUNTIME_IMAGE}"; return 0; fi
  [ "${DRY_RUN}" = 1 ] || [ -f "${REPO_ROOT}/serving/Dockerfile" ] || die "serving/Dockerfile not found: cannot build ${RUNTIME_IMAGE}"
  timed "image ${RUNTIME_IMAGE} built" "${DOCKER}" build -t "${RUNTIME_IMAGE}" -f "${REPO_ROOT}/serving/Dockerfile" "${REPO_ROOT}"
  timed "image loaded into kind" "${KIND}" load docker-image "${RUNTIME_IMAGE}" --name "${CLUSTER_NAME}"
}

cert_manager() {
  retry 5 5 "${KUBECTL}" apply -f "https://github.com/cert-manager/cert-manager/releases/download/${CERT_MANAGER_VERSION}/cert-manager.yaml"
  timed "cert-manager deployments" "${KUBECTL}" -n cert-manager wait --for=condition=Available --timeout="${WAIT_SHORT}s" \
    deployment/cert-manager deployment/cert-manager-cainjector deployment/cert-manager-webhook
}

envoy_gateway() {
  # --skip-crds: the chart's crds/ carries the experimental Gateway API CRDs, which Helm 4 would apply
  # over the standard ones (see envoy_gateway_crds in infra/install.sh); its own CRDs are installed there.
  timed "Envoy Gateway chart" "${HELM}" upgrade --install eg oci://docker.io/envoyproxy/gateway-helm \
    --version "${ENVOY_GATEWAY_VERSION}" -n envoy-gateway-system --create-namespace --skip-crds \
    --wait --timeout "${WAIT_SHORT}s"
  timed "envoy-gateway controller" "${KUBECTL}" -n envoy-gateway-system wait --for=condition=Available \
    --timeout="${WAIT_SHORT}s" deployment/envoy-gateway
  apply_rendered "${INFRA_DIR}/manifests/gateway.yaml"
  timed "GatewayClass envoy accepted" "${KUBECTL}" wait --for=condition=Accepted --timeout=120s gatewayclass/envoy
  timed "Gateway kserve/kserve-ingress-gateway programmed" "${KUBECTL}" -n kserve wait --for=condition=Programmed \
    --timeout="${WAIT_SHORT}s" gateway/kserve-ingress-gateway
}

knative() {
  local base="https://github.com/knative/serving/releases/download/knative-${KNATIVE_SERVING_VERSION}"
  retry 5 5 "${KUBECTL}" apply -f "${base}/serving-crds.yaml"
  timed "Knative CRDs established" "${KUBECTL}" wait --for=condition=Established --timeout=60s crd/services.serving.knative.dev
  retry 10 5 "${KUBECTL}" apply -f "${base}/serving-core.yaml"
  retry 10 5 "${KUBECTL}" apply -f "https://github.com/knative/net-kourier/releases/download/knative-${KNATIVE_KOURIER_VERSION}/kourier.yaml"
  timed "Knative Serving + Kourier" "${KUBECTL}" -n knative-serving wait --for=condition=Available --timeout="${WAIT_SHORT}s" \
    deployment/controller deployment/webhook deployment/activator deployment/autoscaler deployment/net-kourier-controller
  retry 10 5 "${KUBECTL}" -n knative-serving patch configmap/config-network --type merge \
    -p '{"data":{"ingress-class":"kourier.ingress.networking.knative.dev"}}'
  retry 10 5 "${KUBECTL}" -n knative-serving patch configmap/config-domain --type merge -p '{"data":{"example.com":""}}'
  # kind-loaded images are not in any registry: Knative must not resolve their tags to digests (kserve#3689)
  retry 10 5 "${KUBECTL}" -n knative-serving patch configmap/config-deployment --type merge \
    -p "{\"data\":{\"registries-skipping-tag-resolving\":\"kind.local,ko.local,dev.local,${MLROLLOUT_RUNTIME_IMAGE%%/*}\"}}"
}

kserve_webhook_serving() {
  "${KUBECTL}" -n kserve get endpointslices -l kubernetes.io/service-name=kserve-webhook-server-service \
    -o jsonpath='{.items[*].endpoints[*].conditions.ready}' 2>/dev/null | grep -q true
}

# On kind the KServe controller is the chart's Deployment (on the control plane it is a local process).
kserve_controller() {
  timed "kserve-controller-manager" "${KUBECTL}" -n kserve wait --for=condition=Available --timeout="${WAIT_SHORT}s" \
    deployment/kserve-controller-manager
  wait_for "KServe webhook endpoints ready" 120 kserve_webhook_serving
}

kfp() {
  retry 5 10 "${KUBECTL}" apply -k "${KFP_KUSTOMIZE}/cluster-scoped-resources?ref=${KFP_VERSION}"
  timed "KFP CRDs established" "${KUBECTL}" wait --for=condition=Established --timeout=60s crd/applications.app.k8s.io
  retry 5 10 "${KUBECTL}" apply -k "${KFP_KUSTOMIZE}/env/platform-agnostic?ref=${KFP_VERSION}"
  timed "KFP deployments (first pull of ~2 GB of images is the slow part)" "${KUBECTL}" -n kubeflow wait \
    --for=condition=Available --timeout="${WAIT_LONG}s" deployment/mysql deployment/seaweedfs \
    deployment/metadata-grpc-deployment deployment/ml-pipeline deployment/ml-pipeline-ui deployment/workflow-controller
}

prometheus() {
  apply_rendered "${INFRA_DIR}/manifests/prometheus.yaml"
  timed "Prometheus" "${KUBECTL}" -n monitoring rollout status deployment/prometheus --timeout="${WAIT_SHORT}s"
}

summary() {
  cat >&2 <<EOF

mlrollout platform is up (kind cluster '${CLUSTER_NAME}', profile ${PROFILE}).
  model traffic   http://127.0.0.1:8080  (Envoy Gateway kserve/kserve-ingress-gateway; send the route's Host header)
  KFP UI / API    ${KUBECTL} -n kubeflow port-forward svc/ml-pipeline-ui 8888:80   -> http://127.0.0.1:8888
  Prometheus      ${KUBECTL} -n monitoring port-forward svc/prometheus 9090:9090    -> http://127.0.0.1:9090
  models go in    namespace ${MODEL_NAMESPACE} (serviceAccountName: kfp-s3 for s3://mlpipeline/...)
  next            make e2e        tear down: make cluster-down
EOF
}

# ---------------------------------------------------------------- main
STEPS=(kind_cluster serving_image cert_manager gateway_api_crds envoy_gateway_crds envoy_gateway)
[ "${PROFILE}" = knative ] && STEPS+=(knative)
STEPS+=(kserve_charts kserve_controller kserve_admission kserve_runtimes kfp prometheus model_namespace mlrollout_operator)

CURRENT_STEP=""
STEP_START="${SECONDS}"
on_exit() {
  local rc="$1"
  if [ "${rc}" -ne 0 ] && [ -n "${CURRENT_STEP}" ]; then
    log "step '${CURRENT_STEP}' failed after $((SECONDS - STEP_START))s (exit ${rc}); re-run 'make cluster' to resume (every step is idempotent)"
    diagnostics
  fi
}

main() {
  if [ "${DRY_RUN}" = 1 ]; then
    log "dry run: printing the plan for profile ${PROFILE}, executing nothing"
  else
    preflight
    [ "${PREFLIGHT_ONLY}" = 1 ] && return 0
    check_host
  fi
  trap 'on_exit $?' EXIT
  local s timings=() total_start="${SECONDS}"
  for s in "${STEPS[@]}"; do
    step "${s}"
    CURRENT_STEP="${s}"; STEP_START="${SECONDS}"
    "${s}"   # errexit applies: the first failing command ends the run (and on_exit explains)
    timings+=("$(printf '%-18s %4ss' "${s}" "$((SECONDS - STEP_START))")")
  done
  CURRENT_STEP=""
  if [ "${DRY_RUN}" = 0 ]; then
    step "timings"
    printf '  %s\n' "${timings[@]}" >&2
    log "total $((SECONDS - total_start))s"
    summary
  fi
}

main
