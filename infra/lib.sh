#!/usr/bin/env bash
# Shared helpers for the infra scripts. Source it; do not run it.
#
#   . infra/lib.sh
#
# - every version comes from infra/versions.env (sourced here), nothing is pinned in scripts;
# - run/run_sh print each command before running it, and only print it when DRY_RUN=1
#   (`infra/cluster-up.sh --dry-run` shows the whole ordered plan without touching anything);
# - wait_for/timed print how long every wait took and give up after a timeout;
# - retry re-runs a command on the known transient failures of a fresh cluster (an admission
#   webhook whose pod is not serving yet: "failed calling webhook ... connection refused").

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${INFRA_DIR}/.." && pwd)"
export INFRA_DIR REPO_ROOT

# load_versions: source infra/versions.env, but a key that already has a non-empty value (from the
# environment, e.g. `KSERVE_VERSION=0.20.0 make cluster`, or from the caller) keeps it: the file's plain
# KEY=value lines would otherwise overwrite it. Every key of the file is treated alike. The file stays plain
# KEY=value lines (the workflow and the tests parse it with a regex).
load_versions() {
  local _key
  local -a _keep=()
  while IFS= read -r _key; do
    if [ -n "${!_key:-}" ]; then _keep+=("${_key}=${!_key}"); fi
  done < <(sed -n 's/^\([A-Z][A-Z0-9_]*\)=.*/\1/p' "${INFRA_DIR}/versions.env")
  # shellcheck source-path=SCRIPTDIR source=versions.env
  . "${INFRA_DIR}/versions.env"
  for _key in ${_keep[@]+"${_keep[@]}"}; do
    printf -v "${_key%%=*}" '%s' "${_key#*=}"
  done
}
load_versions

# tools: overridable, e.g. KIND=/opt/kind/bin/kind; the Makefile puts .tools/bin (pinned helm/kubectl) first on PATH
KUBECTL="${KUBECTL:-kubectl}"
HELM="${HELM:-helm}"
KIND="${KIND:-kind}"
DOCKER="${DOCKER:-docker}"
DRY_RUN="${DRY_RUN:-0}"

# cluster settings (not versions): override from the environment
CLUSTER_NAME="${CLUSTER_NAME:-mlrollout}"
MODEL_NAMESPACE="${MODEL_NAMESPACE:-models}"
OPERATOR_NAMESPACE="${OPERATOR_NAMESPACE:-mlrollout-system}"

# RETRY_DELAY_OVERRIDE=0 makes retries immediate (the unit tests use it)
# transient errors worth retrying: webhook not serving yet, CA bundle not injected yet, API server busy
RETRY_ON_DEFAULT='failed calling webhook|connection refused|no endpoints available|x509: certificate signed by unknown authority|i/o timeout|context deadline exceeded|TLS handshake timeout|the server is currently unable to handle the request|etcdserver: request timed out'

_ts() { date -u +%H:%M:%S; }
log() { printf '[%s] %s\n' "$(_ts)" "$*" >&2; }
step() { printf '\n[%s] ==> %s\n' "$(_ts)" "$*" >&2; }
die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# Print a command, shell-quoted, as one "+ ..." line on stdout (the plan).
show() {
  local out="+" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s\n' "${out}"
}

# run CMD...: print it, then run it (only print with DRY_RUN=1).
run() {
  show "$@"
  [ "${DRY_RUN}" = 1 ] && return 0
  "$@"
}

# run_sh 'a | b': a pipeline, printed verbatim and evaluated in this shell (functions stay visible).
run_sh() {
  printf '+ %s\n' "$1"
  [ "${DRY_RUN}" = 1 ] && return 0
  eval "$1"
}

# retry ATTEMPTS DELAY_S CMD...: run CMD; on a failure whose output matches $RETRY_ON (default: the
# transient errors above) try again after DELAY_S, doubling the delay up to 30 s. Any other failure,
# or the last attempt failing, returns CMD's exit code at once with its output on stderr.
retry() {
  local attempts="$1" delay="${RETRY_DELAY_OVERRIDE:-$2}"; shift 2
  local pattern="${RETRY_ON:-${RETRY_ON_DEFAULT}}" n=1 rc out
  show "$@"
  [ "${DRY_RUN}" = 1 ] && { printf '  (retry: up to %s attempts on transient errors)\n' "${attempts}"; return 0; }
  while :; do
    rc=0
    out="$("$@" 2>&1)" || rc=$?
    if [ "${rc}" -eq 0 ]; then
      [ -n "${out}" ] && printf '%s\n' "${out}"
      [ "${n}" -gt 1 ] && log "succeeded on attempt ${n}/${attempts}"
      return 0
    fi
    if ! grep -qE "${pattern}" <<<"${out}"; then
      printf '%s\n' "${out}" >&2
      log "failed (exit ${rc}), not a known transient error: not retrying"
      return "${rc}"
    fi
    if [ "${n}" -ge "${attempts}" ]; then
      printf '%s\n' "${out}" >&2
      log "still failing after ${n} attempts (exit ${rc}): giving up"
      return "${rc}"
    fi
    log "attempt ${n}/${attempts} failed (exit ${rc}): $(grep -E "${pattern}" <<<"${out}" | head -n1 | cut -c1-160)"
    log "retrying in ${delay}s"
    sleep "${delay}"
    delay=$((delay * 2)); [ "${delay}" -gt 30 ] && delay=30
    n=$((n + 1))
  done
}

# wait_for DESCRIPTION TIMEOUT_S CMD...: poll CMD every 2 s until it succeeds; print the time it took.
wait_for() {
  local desc="$1" timeout="$2"; shift 2
  printf '+ wait_for (timeout %ss) %s: %s\n' "${timeout}" "${desc}" "$*"
  [ "${DRY_RUN}" = 1 ] && return 0
  local start="${SECONDS}"
  until "$@" >/dev/null 2>&1; do
    if [ $((SECONDS - start)) -ge "${timeout}" ]; then
      log "timed out after ${timeout}s waiting for ${desc}"
      return 1
    fi
    sleep 2
  done
  log "ready: ${desc} (waited $((SECONDS - start))s)"
}

# timed DESCRIPTION CMD...: run a command that waits by itself (kubectl wait, helm --wait); print how long.
timed() {
  local desc="$1"; shift
  show "$@"
  [ "${DRY_RUN}" = 1 ] && return 0
  local start="${SECONDS}" rc=0
  "$@" || rc=$?
  if [ "${rc}" -eq 0 ]; then
    log "ready: ${desc} (waited $((SECONDS - start))s)"
  else
    log "FAILED: ${desc} after $((SECONDS - start))s (exit ${rc})"
  fi
  return "${rc}"
}

# render FILE: print FILE with every ${KEY} from versions.env (and CLUSTER_NAME/MODEL_NAMESPACE) substituted.
# Unknown ${...} placeholders are an error, so a typo cannot reach the cluster.
render() {
  local file="$1" text key
  text="$(<"${file}")"
  for key in $(sed -n 's/^\([A-Z][A-Z0-9_]*\)=.*/\1/p' "${INFRA_DIR}/versions.env") CLUSTER_NAME MODEL_NAMESPACE OPERATOR_NAMESPACE; do
    text="${text//\$\{${key}\}/${!key}}"
  done
  if grep -qE '\$\{[A-Z][A-Z0-9_]*\}' <<<"${text}"; then
    die "render ${file}: unknown placeholder(s): $(grep -oE '\$\{[A-Z][A-Z0-9_]*\}' <<<"${text}" | sort -u | tr '\n' ' ')"
  fi
  printf '%s\n' "${text}"
}

# apply_rendered FILE: render FILE and `kubectl apply` it (retried on transient webhook errors).
apply_rendered() {
  local file="$1"
  printf '+ render %s | %s apply -f -\n' "${file#"${REPO_ROOT}"/}" "${KUBECTL}"
  [ "${DRY_RUN}" = 1 ] && return 0
  local tmp
  tmp="$(mktemp)"
  render "${file}" >"${tmp}"
  DRY_RUN=0 retry 6 5 "${KUBECTL}" apply -f "${tmp}" >&2 || { rm -f "${tmp}"; return 1; }
  rm -f "${tmp}"
}

# diagnostics: what a failed wait usually needs (used by cluster-up on error and by CI on failure).
diagnostics() {
  [ "${DRY_RUN}" = 1 ] && return 0
  echo "---- pods not Running/Completed" >&2
  "${KUBECTL}" get pods -A --no-headers 2>&1 | grep -vE ' (Running|Completed) ' >&2 || true
  echo "---- recent warning events" >&2
  "${KUBECTL}" get events -A --field-selector type=Warning --sort-by=.lastTimestamp 2>&1 | tail -n 25 >&2 || true
}
