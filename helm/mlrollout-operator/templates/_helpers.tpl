{{/* Names: object names are at most 63 characters; "<fullname>-metrics" is the longest suffix, so the
fullname is cut to 55. fullnameOverride is used as given (the schema bounds it). */}}
{{- define "mlrollout-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 55 | trimSuffix "-" }}
{{- end }}

{{- define "mlrollout-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mlrollout-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlrollout-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlrollout-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mlrollout-operator.labels" -}}
helm.sh/chart: {{ include "mlrollout-operator.chart" . }}
{{ include "mlrollout-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mlrollout
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mlrollout-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mlrollout-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given (a digest is immutable, a tag is not). */}}
{{- define "mlrollout-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The operator's rules on ModelRollouts, the KServe and Gateway API objects it drives, and Events: the
same list for the ClusterRole (cluster-wide) and each namespace's Role (watchNamespaces). Derived from the
calls in serving/rollout (README "RBAC" maps each rule to its caller). */}}
{{- define "mlrollout-operator.rules" -}}
- apiGroups: ["mlrollout.io"]
  resources: ["modelrollouts"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["mlrollout.io"]
  resources: ["modelrollouts/status"]
  verbs: ["patch"]
- apiGroups: ["serving.kserve.io"]
  resources: ["inferenceservices"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
