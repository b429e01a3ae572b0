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

{{/* upstreamManifestNames: the names and selectors of upstream's flat
manifests (its deploy/infra), so that applying ours over them replaces each
object in place: Deployment "mic", DaemonSet "nmi", ServiceAccounts
"aad-pod-id-{mic,nmi}-service-account", ClusterRoles "aad-pod-id-{mic,nmi}-role",
ClusterRoleBindings "aad-pod-id-{mic,nmi}-binding"; objects upstream did not
have are named "aad-pod-id-{mic,nmi}...". */}}
{{- define "aad-pod-identity.upstreamNames" -}}
{{- if eq (toString .Values.upstreamManifestNames) "true" -}}true{{- end -}}
{{- end -}}

{{/* Base of MIC's object names (Roles, Secret, ...). */}}
{{- define "aad-pod-identity.mic.fullname" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}
aad-pod-id-mic
{{- else -}}
{{- printf "%s-mic" (include "aad-pod-identity.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Base of NMI's object names (Roles, ...). */}}
{{- define "aad-pod-identity.nmi.fullname" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}
aad-pod-id-nmi
{{- else -}}
{{- printf "%s-nmi" (include "aad-pod-identity.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "aad-pod-identity.mic.deploymentName" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}mic{{- else -}}{{ include "aad-pod-identity.mic.fullname" . }}{{- end -}}
{{- end -}}

{{- define "aad-pod-identity.nmi.daemonSetName" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}nmi{{- else -}}{{ include "aad-pod-identity.nmi.fullname" . }}{{- end -}}
{{- end -}}

{{- define "aad-pod-identity.mic.clusterRoleName" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}aad-pod-id-mic-role{{- else -}}{{ include "aad-pod-identity.mic.fullname" . }}{{- end -}}
{{- end -}}

{{- define "aad-pod-identity.mic.clusterRoleBindingName" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}aad-pod-id-mic-binding{{- else -}}{{ include "aad-pod-identity.mic.fullname" . }}{{- end -}}
{{- end -}}

{{- define "aad-pod-identity.nmi.clusterRoleName" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}aad-pod-id-nmi-role{{- else -}}{{ include "aad-pod-identity.nmi.fullname" . }}{{- end -}}
{{- end -}}

{{- define "aad-pod-identity.nmi.clusterRoleBindingName" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}aad-pod-id-nmi-binding{{- else -}}{{ include "aad-pod-identity.nmi.fullname" . }}{{- end -}}
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

{{/* The selectors equal upstream chart 4.1.18's (a Deployment's or
DaemonSet's selector cannot change, so `helm upgrade` from it keeps them), or
upstream's flat manifests' with upstreamManifestNames. */}}
{{- define "aad-pod-identity.mic.selectorLabels" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}
app: mic
component: mic
{{- else -}}
app.kubernetes.io/name: {{ include "aad-pod-identity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mic
{{- end -}}
{{- end -}}

{{- define "aad-pod-identity.nmi.selectorLabels" -}}
{{- if include "aad-pod-identity.upstreamNames" . -}}
component: nmi
tier: node
{{- else -}}
app.kubernetes.io/name: {{ include "aad-pod-identity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nmi
{{- end -}}
{{- end -}}

{{/* Labels of NMI's pods: the selector's and tier: node. */}}
{{- define "aad-pod-identity.nmi.podLabels" -}}
{{ include "aad-pod-identity.nmi.selectorLabels" . }}
{{- if not (include "aad-pod-identity.upstreamNames" .) }}
tier: node
{{- end -}}
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
{{- if and .Values.rbac.enabled (include "aad-pod-identity.upstreamNames" .) -}}
aad-pod-id-mic-service-account
{{- else if .Values.rbac.enabled -}}
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
{{- if and .Values.rbac.enabled (include "aad-pod-identity.upstreamNames" .) -}}
aad-pod-id-nmi-service-account
{{- else if .Values.rbac.enabled -}}
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

{{/* Name of the Lease and of upstream's Endpoints lock: --leader-election-name,
whose default is "aad-pod-identity-mic". */}}
{{- define "aad-pod-identity.mic.leaseName" -}}
{{- default "aad-pod-identity-mic" .Values.mic.leaderElection.name -}}
{{- end -}}

{{/* Non-empty when MIC also holds upstream's Endpoints lock
(mic.leaderElection.endpointsLock, default true). */}}
{{- define "aad-pod-identity.mic.endpointsLock" -}}
{{- if ne (toString .Values.mic.leaderElection.endpointsLock) "false" -}}true{{- end -}}
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

{{/* On upgrade, fails when this release already has a workload of the same
component under another name (args: dict "ctx" $ "kind" "DaemonSet"
"component" "nmi" "name" <new name>). Helm would create the new one before it
deletes the old, so two nmi DaemonSets (or two MICs) with the same selector
would run at once. Upstream's chart did not apply fullnameOverride to the mic
and nmi names; this chart does. lookup answers nothing in helm template. */}}
{{- define "aad-pod-identity.renameGuard" -}}
{{- $ctx := .ctx -}}
{{- if $ctx.Release.IsUpgrade -}}
{{- range (lookup "apps/v1" .kind $ctx.Release.Namespace "").items | default list -}}
{{- $annotations := .metadata.annotations | default dict -}}
{{- $labels := .metadata.labels | default dict -}}
{{- if and (eq (toString (index $annotations "meta.helm.sh/release-name")) $ctx.Release.Name) (eq (toString (index $labels "app.kubernetes.io/component")) $.component) (ne .metadata.name $.name) -}}
{{- fail (printf "this upgrade would replace %s %s of release %s by %s: both would run at once. Upstream's chart did not apply fullnameOverride to the mic and nmi names; remove fullnameOverride (or set nameOverride as before) and upgrade again (docs/migration.md)" $.kind .metadata.name $ctx.Release.Name $.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
