{{/* Chart name (or nameOverride). */}}
{{- define "aad-pod-identity.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Base of every object name: fullnameOverride, else the chart name. The
release name is not used, as upstream. */}}
{{- define "aad-pod-identity.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- include "aad-pod-identity.name" . -}}
{{- end -}}
{{- end -}}

{{- define "aad-pod-identity.mic.fullname" -}}
{{- printf "%s-mic" (include "aad-pod-identity.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aad-pod-identity.nmi.fullname" -}}
{{- printf "%s-nmi" (include "aad-pod-identity.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aad-pod-identity.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aad-pod-identity.labels" -}}
app.kubernetes.io/name: {{ include "aad-pod-identity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "aad-pod-identity.chart" . }}
{{- end -}}

{{- define "aad-pod-identity.mic.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aad-pod-identity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mic
{{- end -}}

{{- define "aad-pod-identity.nmi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aad-pod-identity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nmi
{{- end -}}

{{- define "aad-pod-identity.mic.labels" -}}
{{ include "aad-pod-identity.labels" . }}
app.kubernetes.io/component: mic
{{- end -}}

{{- define "aad-pod-identity.nmi.labels" -}}
{{ include "aad-pod-identity.labels" . }}
app.kubernetes.io/component: nmi
tier: node
{{- end -}}

{{/* Standard mode runs MIC. */}}
{{- define "aad-pod-identity.standard" -}}
{{- if eq (lower (toString .Values.operationMode)) "standard" -}}true{{- end -}}
{{- end -}}

{{/* The ServiceAccount MIC's pods run as: the chart's own, or the namespace's
"default" when rbac.enabled is false (the Deployment then names none). */}}
{{- define "aad-pod-identity.mic.serviceAccountName" -}}
{{- if .Values.rbac.enabled -}}
{{- include "aad-pod-identity.mic.fullname" . -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* The user name the apiserver gives MIC's requests. */}}
{{- define "aad-pod-identity.mic.username" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "aad-pod-identity.mic.serviceAccountName" .) -}}
{{- end -}}

{{/* The ServiceAccount NMI's pods run as: the chart's own, or the namespace's
"default" when rbac.enabled is false. */}}
{{- define "aad-pod-identity.nmi.serviceAccountName" -}}
{{- if .Values.rbac.enabled -}}
{{- include "aad-pod-identity.nmi.fullname" . -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* The user name the apiserver gives NMI's requests. */}}
{{- define "aad-pod-identity.nmi.username" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "aad-pod-identity.nmi.serviceAccountName" .) -}}
{{- end -}}

{{/* nmi.startupTaint.key when nmi.startupTaint.enabled, else empty. */}}
{{- define "aad-pod-identity.nmi.startupTaintKey" -}}
{{- with .Values.nmi.startupTaint -}}
{{- if .enabled -}}
{{- if not .key -}}
{{- fail "nmi.startupTaint.key must name the taint NMI removes when nmi.startupTaint.enabled is true" -}}
{{- end -}}
{{- .key -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* identityPolicy.mode, checked: off, warn or enforce. */}}
{{- define "aad-pod-identity.policyMode" -}}
{{- $mode := toString .Values.identityPolicy.mode -}}
{{- if not (has $mode (list "off" "warn" "enforce")) -}}
{{- fail (printf "identityPolicy.mode must be off, warn or enforce, not %q" $mode) -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{/* Non-empty when the admission policies are installed (mode warn or enforce). */}}
{{- define "aad-pod-identity.policyOn" -}}
{{- if ne (include "aad-pod-identity.policyMode" .) "off" -}}true{{- end -}}
{{- end -}}

{{/* Name of the ConfigMap in which MIC records the identities it added to
nodes (MIC's --owned-identities-configmap default). */}}
{{- define "aad-pod-identity.mic.ownedConfigMap" -}}
aad-pod-identity-mic-owned
{{- end -}}

{{/* Lease namespace: --leader-election-namespace, whose default is "default". */}}
{{- define "aad-pod-identity.mic.leaseNamespace" -}}
{{- default "default" .Values.mic.leaderElection.namespace -}}
{{- end -}}

{{/* The Secrets type 1/2 entries of azureIdentities name, as "namespace/name"
lines (used when rbac.allowAccessToSecrets is null). */}}
{{- define "aad-pod-identity.spSecrets" -}}
{{- range $key, $id := .Values.azureIdentities }}
{{- if and (has (int $id.type) (list 1 2)) $id.clientPassword }}
{{- $ref := $id.clientPassword }}
{{- if kindIs "string" $ref }}{{ $ref = fromJson $ref }}{{ end }}
{{- if not $ref.name }}{{ fail (printf "azureIdentities.%s.clientPassword must name a Secret: {\"name\":...,\"namespace\":...}" $key) }}{{ end }}
{{ default (default $.Release.Namespace $id.namespace) $ref.namespace }}/{{ $ref.name }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A number value as the flag wants it: Helm reads numbers from values files
as float64, which would print 1000000 as 1e+06. Empty for "" and null. */}}
{{- define "aad-pod-identity.wholeNumber" -}}
{{- if kindIs "float64" . -}}
{{- if eq (. | int64 | float64) . -}}{{ . | int64 }}{{- else -}}{{ . }}{{- end -}}
{{- else if not (kindIs "invalid" .) -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* Checks of values a schema cannot express. */}}
{{- define "aad-pod-identity.validate" -}}
{{- range $key, $bounds := dict "maxConnections" (list 1 65536) "maxConnectionsPerIP" (list 1 65536) "maxPendingFetchesPerPod" (list 1 4096) "maxCachedTokens" (list 1 1000000) "firstSyncWaitSec" (list 0 300) }}
{{- $v := include "aad-pod-identity.wholeNumber" (index $.Values.nmi $key) }}
{{- if ne $v "" }}
{{- if not (regexMatch "^[0-9]+$" $v) }}{{ fail (printf "nmi.%s must be a whole number from %d to %d, not %q" $key (index $bounds 0) (index $bounds 1) $v) }}{{ end }}
{{- if or (lt (atoi $v) (index $bounds 0)) (gt (atoi $v) (index $bounds 1)) }}{{ fail (printf "nmi.%s must be from %d to %d, not %s" $key (index $bounds 0) (index $bounds 1) $v) }}{{ end }}
{{- end }}
{{- end }}
{{- range $key, $id := .Values.azureIdentities }}
{{- if not $id.clientID }}{{ fail (printf "azureIdentities.%s.clientID is required" $key) }}{{ end }}
{{- if and (eq (int $id.type) 0) (not $id.resourceID) }}{{ fail (printf "azureIdentities.%s.resourceID is required for type 0" $key) }}{{ end }}
{{- if and (has (int $id.type) (list 1 2)) (or (not $id.tenantID) (not $id.clientPassword)) }}{{ fail (printf "azureIdentities.%s: tenantID and clientPassword are required for type %d" $key (int $id.type)) }}{{ end }}
{{- if or (not $id.binding) (not $id.binding.selector) }}{{ fail (printf "azureIdentities.%s.binding.selector is required" $key) }}{{ end }}
{{- end }}
{{- end -}}
