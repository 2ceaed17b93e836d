{{/* Chart name, overridable. */}}
{{- define "waldur-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, prefixed with the chart name unless it already holds it. */}}
{{- define "waldur-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "waldur-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "waldur-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "waldur-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "waldur-operator.labels" -}}
helm.sh/chart: {{ include "waldur-operator.chart" . }}
{{ include "waldur-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: waldur
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "waldur-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "waldur-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "true" when the pods elect a leader: asked for, more than one replica, or shards (each
shard elects its own). */}}
{{- define "waldur-operator.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) (gt (int (include "waldur-operator.shards" .)) 1) }}true{{ end }}
{{- end }}

{{/* The number of shards (sharding.shards), checked: an integer of at least 1. */}}
{{- define "waldur-operator.shards" -}}
{{- $sharding := .Values.sharding | default dict }}
{{- $shards := hasKey $sharding "shards" | ternary $sharding.shards 1 }}
{{- if not (or (kindIs "int" $shards) (kindIs "int64" $shards) (and (kindIs "float64" $shards) (eq (float64 $shards) (float64 (int $shards))))) }}
{{- fail (printf "sharding.shards must be an integer of at least 1, not %v" $shards) }}
{{- end }}
{{- if lt (int $shards) 1 }}
{{- fail (printf "sharding.shards must be an integer of at least 1, not %v" $shards) }}
{{- end }}
{{- int $shards }}
{{- end }}

{{/* The name of shard i's Deployment (and PodDisruptionBudget): include with (list . i).
The full name is shortened so that the name stays within 63 characters with its index. */}}
{{- define "waldur-operator.shardName" -}}
{{- $suffix := printf "-shard-%d" (int (index . 1)) }}
{{- $base := include "waldur-operator.fullname" (index . 0) | trunc (int (sub 63 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $base $suffix }}
{{- end }}

{{/* The pod label that tells shard i's pods from the other shards': include with the index. */}}
{{- define "waldur-operator.shardLabel" -}}
openstack.waldur.com/shard: {{ . | quote }}
{{- end }}

{{- define "waldur-operator.leaseName" -}}
{{- default (include "waldur-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "waldur-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- if .Values.image.tag }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- end }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Secret holding the default Waldur token, and its key; empty when there is none. */}}
{{- define "waldur-operator.tokenSecretName" -}}
{{- if and .Values.waldur.existingSecret .Values.waldur.token }}
{{- fail "waldur.existingSecret and waldur.token are exclusive: set one of them" }}
{{- end }}
{{- if .Values.waldur.existingSecret }}
{{- .Values.waldur.existingSecret }}
{{- else if .Values.waldur.token }}
{{- printf "%s-waldur" (include "waldur-operator.fullname" .) }}
{{- end }}
{{- end }}

{{- define "waldur-operator.tokenSecretKey" -}}
{{- if .Values.waldur.existingSecret }}
{{- .Values.waldur.existingSecretKey }}
{{- else }}token{{ end }}
{{- end }}

{{/* The ConfigMap holding the extra CA bundle, and its key; empty when there is none. */}}
{{- define "waldur-operator.caConfigMapName" -}}
{{- if and .Values.waldur.caBundle .Values.waldur.caBundleConfigMap }}
{{- fail "waldur.caBundle and waldur.caBundleConfigMap are exclusive: set one of them" }}
{{- end }}
{{- if .Values.waldur.caBundleConfigMap }}
{{- .Values.waldur.caBundleConfigMap }}
{{- else if .Values.waldur.caBundle }}
{{- printf "%s-ca" (include "waldur-operator.fullname" .) }}
{{- end }}
{{- end }}

{{- define "waldur-operator.caConfigMapKey" -}}
{{- if .Values.waldur.caBundleConfigMap }}
{{- .Values.waldur.caBundleConfigMapKey }}
{{- else }}ca.crt{{ end }}
{{- end }}

{{/* The rules the operator needs on ServerGroups, their Events and credentials Secrets. */}}
{{- define "waldur-operator.rules" -}}
- apiGroups: ["openstack.waldur.com"]
  resources: ["servergroups"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["openstack.waldur.com"]
  resources: ["servergroups/status"]
  verbs: ["get", "patch"]
- apiGroups: ["openstack.waldur.com"]
  resources: ["servergroups/finalizers"]
  verbs: ["update"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Credentials Secrets named by spec.credentialsRef: the operator watches their metadata only,
# reads one when a ServerGroup uses it, and patches its finalizers
# (openstack.waldur.com/credentials-in-use) so that it outlives the cleanup that needs it.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}

{{/* A probe on the metrics port: include with (dict "path" "/healthz" "probe" .Values.livenessProbe). */}}
{{- define "waldur-operator.probe" -}}
httpGet:
  path: {{ .path }}
  port: metrics
{{ toYaml (omit .probe "enabled") }}
{{- end }}

{{/* The rules of the ClusterRoles aggregated into view (read) and edit/admin (write). */}}
{{- define "waldur-operator.userReadRules" -}}
- apiGroups: ["openstack.waldur.com"]
  resources: ["servergroups", "servergroups/status"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{- define "waldur-operator.userWriteRules" -}}
# Users write the spec; the status and finalizers are the operator's.
- apiGroups: ["openstack.waldur.com"]
  resources: ["servergroups"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
{{- end }}
