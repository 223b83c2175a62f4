#!/usr/bin/env bash
# Delete the mlrollout kind cluster (`make cluster-down`). Idempotent: no cluster, nothing to do.
#
#   bash infra/cluster-down.sh [--dry-run]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${here}/lib.sh"

[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
if [ "${DRY_RUN}" = 0 ]; then
  command -v "${KIND}" >/dev/null 2>&1 ||
    die "kind not found: nothing to delete (install kind ${KIND_VERSION} if a cluster '${CLUSTER_NAME}' exists)"
  if ! "${KIND}" get clusters 2>/dev/null | grep -qx "${CLUSTER_NAME}"; then
    log "no kind cluster '${CLUSTER_NAME}': nothing to do"
    exit 0
  fi
fi
timed "kind cluster ${CLUSTER_NAME} deleted" "${KIND}" delete cluster --name "${CLUSTER_NAME}"
