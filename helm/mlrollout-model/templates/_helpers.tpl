{{/*
Names. fullname is truncated to 45 characters so that "<fullname>-stable-predictor" (the Service KServe
creates for the stable InferenceService) stays within the 63-character DNS label limit.
*/}}
{{- define "mlrollout-model.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 45 | trimSuffix "-" }}
{{- end }}

{{- define "mlrollout-model.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
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

{{- define "mlrollout-model.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mlrollout-model.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mlrollout-model.runtimeName" -}}
{{- if .Values.model.runtimeName }}
{{- .Values.model.runtimeName }}
{{- else if eq .Values.model.runtime "triton" }}
{{- "kserve-tritonserver" }}
{{- else }}
{{- "mlrollout-onnx" }}
{{- end }}
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
{{- if lt (int .Values.replicas.max) (int .Values.replicas.min) }}
{{- fail (printf "replicas.max (%v) must be >= replicas.min (%v)" .Values.replicas.max .Values.replicas.min) }}
{{- end }}
{{- if and (eq .Values.strategy.type "blueGreen") (eq .Values.strategy.blueGreen.blue.active .Values.strategy.blueGreen.green.active) }}
{{- fail "strategy.blueGreen: exactly one of blue.active / green.active must be true" }}
{{- end }}
{{- end }}
