{{/*
"true" when NMI may request ServiceAccount tokens for federated identities
(federatedTokens.enabled, or defaultTokenSource federated), else empty.
*/}}
{{- define "aad-pod-identity.federatedTokens" -}}
{{- if or (eq (toString .Values.defaultTokenSource) "federated") .Values.federatedTokens.enabled -}}
true
{{- end -}}
{{- end -}}
