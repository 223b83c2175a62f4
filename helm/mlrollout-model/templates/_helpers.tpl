{{/*
Names. The limit that matters is a LABEL, not a Service name: KServe labels the predictor Deployment's
selector and pods `app: isvc.<InferenceService name>-predictor` (KServe v0.20.0
pkg/constants/constants.go:755-756 GetRawServiceLabel; reconcilers/deployment/deployment_reconciler.go:146,153),
and a label value is at most 63 characters, so an InferenceService name may be at most 63 - 15 = 48.
  - canary / blueGreen render "<fullname>-stable|-canary|-blue|-green": a release-derived fullname is
    truncated to 41 (48 - len("-stable")).
  - rolling / knativeCanary render one InferenceService "<fullname>": truncated to 45 as before (<= 48;
    unchanged so that no existing release is renamed).
fullnameOverride is used as given (never silently cut, since the rollout controller is told the same name);
"mlrollout-model.validate" fails with one line when an InferenceService name would exceed 48.
*/}}
{{- define "mlrollout-model.maxIsvcName" -}}48{{- end }}

{{- define "mlrollout-model.fullnameMax" -}}
{{- if has .Values.strategy.type (list "canary" "blueGreen") }}41{{ else }}45{{ end }}
{{- end }}

{{- define "mlrollout-model.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 45 | trimSuffix "-" }}
{{- end }}

{{- define "mlrollout-model.fullname" -}}
{{- $max := include "mlrollout-model.fullnameMax" . | int }}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc $max | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc $max | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mlrollout-model.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlrollout-model.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlrollout-model.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mlrollout-model.labels" -}}
helm.sh/chart: {{ include "mlrollout-model.chart" . }}
{{ include "mlrollout-model.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mlrollout
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The model name in request URLs. */}}
{{- define "mlrollout-model.modelName" -}}
{{- default (include "mlrollout-model.fullname" .) .Values.model.name }}
{{- end }}

{{/*
The paths the HTTPRoute forwards: this model's inference, metadata and readiness, and the server's health
and metadata. Nothing else: not /metrics (prediction scores, classes, traffic), not KServe's model-repository
API, not /docs. Gateway API PathPrefix matches whole path segments, so V1's "<name>:predict" needs its own
Exact match (a PathPrefix /v1/models/<name> would not match it).
*/}}
{{- define "mlrollout-model.routeMatches" -}}
{{- $m := include "mlrollout-model.modelName" . }}
{{- $matches := list
    (dict "type" "Exact" "value" (printf "/v1/models/%s:predict" $m))
    (dict "type" "Exact" "value" (printf "/v1/models/%s" $m))
    (dict "type" "PathPrefix" "value" (printf "/v2/models/%s" $m))
    (dict "type" "Exact" "value" "/v2/health/ready")
    (dict "type" "Exact" "value" "/v2/health/live")
    (dict "type" "Exact" "value" "/v2") }}
{{- toJson $matches }}
{{- end }}

{{- define "mlrollout-model.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mlrollout-model.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The runtime: knativeCanary gets mlrollout-onnx-knative (one container port; Knative allows only one across
all containers, knative/serving knative-v1.21.1 pkg/apis/serving/k8s_validation.go:501-533); every
Standard-mode strategy keeps mlrollout-onnx (http1 8080 + h2c 8081).
*/}}
{{- define "mlrollout-model.runtimeName" -}}
{{- if .Values.model.runtimeName }}
{{- .Values.model.runtimeName }}
{{- else if eq .Values.model.runtime "triton" }}
{{- "kserve-tritonserver" }}
{{- else if eq .Values.strategy.type "knativeCanary" }}
{{- "mlrollout-onnx-knative" }}
{{- else }}
{{- "mlrollout-onnx" }}
{{- end }}
{{- end }}

{{/*
The container securityContext of a Knative-mode predictor (knativeCanary). Knative's webhook rejects every
pod-level securityContext field under its default feature flags (knative/serving knative-v1.21.1
pkg/apis/serving/k8s_validation.go:941-946 CheckDisallowedFields against PodSecurityContextMask;
pkg/apis/serving/fieldmask.go:663-702: with kubernetes.podspec-securitycontext Disabled only seccompProfile
survives, and only when secure-pod-defaults is on; pkg/apis/config/features.go:92,113: both Disabled by
default). So for Knative the pod-level fields move into the container: containerSecurityContext, plus
runAsNonRoot/runAsUser/runAsGroup/seccompProfile from podSecurityContext where the container does not set
them (fsGroup has no container equivalent and is dropped: the model volume is an emptyDir). Only the fields
SecurityContextMask keeps (fieldmask.go:707-738) are rendered: capabilities (drop only; add needs
kubernetes.containerspec-addcapabilities, fieldmask.go:743-764), readOnlyRootFilesystem, runAsUser,
runAsGroup, runAsNonRoot, allowPrivilegeEscalation, seccompProfile, and privileged only when false.
*/}}
{{- define "mlrollout-model.knativeContainerSecurityContext" -}}
{{- $pod := .Values.podSecurityContext | default dict }}
{{- $in := deepCopy (.Values.containerSecurityContext | default dict) }}
{{- range $k := list "runAsNonRoot" "runAsUser" "runAsGroup" "seccompProfile" }}
{{- if and (hasKey $pod $k) (not (hasKey $in $k)) }}
{{- $_ := set $in $k (get $pod $k) }}
{{- end }}
{{- end }}
{{- $out := dict }}
{{- range $k := list "allowPrivilegeEscalation" "readOnlyRootFilesystem" "runAsGroup" "runAsNonRoot" "runAsUser" "seccompProfile" }}
{{- if hasKey $in $k }}
{{- $_ := set $out $k (get $in $k) }}
{{- end }}
{{- end }}
{{- with $in.capabilities }}
{{- if .drop }}
{{- $_ := set $out "capabilities" (dict "drop" .drop) }}
{{- end }}
{{- end }}
{{- if and (hasKey $in "privileged") (not $in.privileged) }}
{{- $_ := set $out "privileged" false }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{- define "mlrollout-model.protocolVersion" -}}
{{- if eq .Values.model.runtime "triton" }}
{{- "v2" }}
{{- else }}
{{- default "v1" .Values.model.protocolVersion }}
{{- end }}
{{- end }}

{{- define "mlrollout-model.runtimeImage" -}}
{{- printf "%s:%s" .Values.clusterServingRuntime.image.repository (default .Chart.AppVersion .Values.clusterServingRuntime.image.tag) }}
{{- end }}

{{/*
The InferenceServices this release renders, as a list of dicts:
  name (InferenceService name), track (stable|canary|blue|green), storageUri, version.
rolling and knativeCanary: one InferenceService named <fullname>, track "stable".
*/}}
{{- define "mlrollout-model.tracks" -}}
{{- $full := include "mlrollout-model.fullname" . }}
{{- $s := .Values.strategy }}
{{- $tracks := list }}
{{- if eq $s.type "canary" }}
{{- $tracks = append $tracks (dict "name" (printf "%s-stable" $full) "track" "stable" "storageUri" .Values.model.storageUri "version" .Values.model.version) }}
{{- $tracks = append $tracks (dict "name" (printf "%s-canary" $full) "track" "canary" "storageUri" $s.canary.storageUri "version" $s.canary.version) }}
{{- else if eq $s.type "blueGreen" }}
{{- $tracks = append $tracks (dict "name" (printf "%s-blue" $full) "track" "blue" "storageUri" $s.blueGreen.blue.storageUri "version" $s.blueGreen.blue.version) }}
{{- $tracks = append $tracks (dict "name" (printf "%s-green" $full) "track" "green" "storageUri" $s.blueGreen.green.storageUri "version" $s.blueGreen.green.version) }}
{{- else }}
{{- $tracks = append $tracks (dict "name" $full "track" "stable" "storageUri" .Values.model.storageUri "version" .Values.model.version) }}
{{- end }}
{{- toJson $tracks }}
{{- end }}

{{/* The predictor Service KServe creates for an InferenceService (Standard mode: "<isvc>-predictor", port 80). */}}
{{- define "mlrollout-model.predictorService" -}}
{{- printf "%s-predictor" . }}
{{- end }}

{{/*
Operator mode ("true" or ""): the rollout operator drives this release through the ModelRollout <fullname>
(templates/modelrollout.yaml). The schema allows operator.enabled only with strategy canary or knativeCanary.
*/}}
{{- define "mlrollout-model.operatorMode" -}}
{{- if and .Values.operator.enabled (has .Values.strategy.type (list "canary" "knativeCanary")) }}true{{ end }}
{{- end }}

{{/* Whether the HTTPRoute renders. */}}
{{- define "mlrollout-model.routeEnabled" -}}
{{- $t := .Values.strategy.type }}
{{- if or (eq $t "canary") (eq $t "blueGreen") (and (eq $t "rolling") .Values.route.enabled) }}true{{ end }}
{{- end }}

{{- define "mlrollout-model.hostnames" -}}
{{- if .Values.route.hostnames }}
{{- toJson .Values.route.hostnames }}
{{- else }}
{{- toJson (list (printf "%s-%s.%s" (include "mlrollout-model.fullname" .) .Release.Namespace .Values.route.domain)) }}
{{- end }}
{{- end }}

{{/*
Checks JSON schema cannot express (it cannot compare two values); fail with one readable line.
*/}}
{{- define "mlrollout-model.validate" -}}
{{- $max := include "mlrollout-model.maxIsvcName" . | int }}
{{- range $t := include "mlrollout-model.tracks" . | fromJsonArray }}
{{- if gt (len $t.name) $max }}
{{- fail (printf "InferenceService name %q is %d characters, over the limit of %d (KServe labels its pods app: isvc.<name>-predictor, a label value of at most 63): shorten fullnameOverride or the release name" $t.name (len $t.name) $max) }}
{{- end }}
{{- end }}
{{- range $i, $e := .Values.model.env }}
{{- if hasPrefix "MLROLLOUT_FAULT_" (toString $e.name) }}
{{- fail (printf "model.env[%d].name %s is the runtime's test-only fault injection: it never belongs in a release" $i $e.name) }}
{{- end }}
{{- end }}
{{- if lt (int .Values.replicas.max) (int .Values.replicas.min) }}
{{- fail (printf "replicas.max (%v) must be >= replicas.min (%v)" .Values.replicas.max .Values.replicas.min) }}
{{- end }}
{{- if and (eq .Values.strategy.type "blueGreen") (eq .Values.strategy.blueGreen.blue.active .Values.strategy.blueGreen.green.active) }}
{{- fail "strategy.blueGreen: exactly one of blue.active / green.active must be true" }}
{{- end }}
{{- end }}

{{/* A list of strings as a CEL list literal: ['a', 'b'] (the schema keeps quotes and backslashes out). */}}
{{- define "mlrollout-model.celList" -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}'{{ $v }}'{{ end }}]
{{- end }}
