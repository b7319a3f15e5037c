{{/*
Names, labels and the operator's command line. Every helper is prefixed "fedstudy.".
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "fedstudy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" cut to 63 characters (just the release when it holds the name). */}}
{{- define "fedstudy.fullname" -}}
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

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "fedstudy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator's pods: stable across upgrades (no chart version). */}}
{{- define "fedstudy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedstudy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of everything the chart creates. */}}
{{- define "fedstudy.labels" -}}
helm.sh/chart: {{ include "fedstudy.chart" . }}
app.kubernetes.io/name: {{ include "fedstudy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedstudy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "fedstudy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedstudy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository, then @digest or :tag (appVersion by default). */}}
{{- define "fedstudy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Service in front of the operator's HTTP port (/healthz, /metrics). */}}
{{- define "fedstudy.serviceName" -}}
{{- printf "%s-http" (include "fedstudy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The namespaces the operator watches, as a JSON list (empty with watch.allNamespaces). */}}
{{- define "fedstudy.watchedNamespaces" -}}
{{- if .Values.watch.allNamespaces }}
{{- list | toJson }}
{{- else if .Values.watch.namespaces }}
{{- .Values.watch.namespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* Checks the values cannot express in the schema alone; fails rendering with a reason. */}}
{{- define "fedstudy.validate" -}}
{{- if and (eq .Values.role "site") (not .Values.siteName) }}
{{- fail "siteName is required when role is site: the site this cluster runs" }}
{{- end }}
{{- if and (ne .Values.role "site") .Values.siteName }}
{{- fail (printf "siteName is for role site, not %s" .Values.role) }}
{{- end }}
{{- $m := .Values.metrics }}
{{- if and (not $m.enabled) (or $m.serviceMonitor.enabled $m.aggregatorPodMonitor.enabled $m.prometheusRule.enabled $m.dashboard.enabled) }}
{{- fail "metrics.serviceMonitor, aggregatorPodMonitor, prometheusRule and dashboard need metrics.enabled: true" }}
{{- end }}
{{- if .Values.certManager.enabled }}
{{- if not .Values.certManager.study }}
{{- fail "certManager.study is required with certManager.enabled: the study the certificates are for" }}
{{- end }}
{{- if and .Values.certManager.issuer.create (not .Values.certManager.issuer.caSecretName) }}
{{- fail "certManager.issuer.caSecretName is required with certManager.issuer.create" }}
{{- end }}
{{- if and (not .Values.certManager.issuer.create) (not .Values.certManager.issuer.ref.name) }}
{{- fail "certManager.issuer.ref.name is required when certManager.issuer.create is off" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The operator's arguments after "fedstudy" (the container command). */}}
{{- define "fedstudy.operatorArgs" -}}
- operator
- --role
- {{ .Values.role }}
{{- if eq .Values.role "site" }}
- --site-name
- {{ .Values.siteName }}
{{- end }}
{{- if .Values.watch.allNamespaces }}
- --all-namespaces
{{- else }}
{{- range (include "fedstudy.watchedNamespaces" . | fromJsonArray) }}
- --namespace
- {{ . }}
{{- end }}
{{- end }}
- --metrics-port
- {{ .Values.operator.metricsPort | quote }}
- --aggregator-image
- {{ .Values.studyImages.aggregator | quote }}
- --trainer-image
- {{ .Values.studyImages.trainer | quote }}
- --resync-seconds
- {{ .Values.operator.resyncSeconds | quote }}
- --log-format
- {{ .Values.operator.logFormat }}
{{- with .Values.operator.aggregatorStatusUrl }}
- --aggregator-status-url
- {{ . | quote }}
{{- end }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- range .Values.operator.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The security context of every container the chart runs (restricted Pod Security). */}}
{{- define "fedstudy.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The pod security context of every pod the chart runs. */}}
{{- define "fedstudy.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The permissions the operator needs on the resources of the namespaces it watches. */}}
{{- define "fedstudy.namespacedRules" -}}
# The studies: kopf watches them, patches finalizers and its progress annotations.
- apiGroups: ["fedstudy.io"]
  resources: ["federatedstudies"]
  verbs: ["get", "list", "watch", "patch"]
# Status written by the reconcile (phase, conditions, round, sites).
- apiGroups: ["fedstudy.io"]
  resources: ["federatedstudies/status"]
  verbs: ["get", "patch"]
# A study's children: ConfigMap, Services and state PVCs.
- apiGroups: [""]
  resources: ["configmaps", "services", "persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Events on the studies (kopf posts through the core API).
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* Cluster-scoped names carry the release namespace: releases in two namespaces never clash. */}}
{{- define "fedstudy.clusterRoleName" -}}
{{- printf "%s-%s" (include "fedstudy.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Where the study's Certificates and their Secrets go. */}}
{{- define "fedstudy.certNamespace" -}}
{{- default .Release.Namespace .Values.certManager.namespace }}
{{- end }}

{{/* The issuer the Certificates name: the chart's CA Issuer, or certManager.issuer.ref. */}}
{{- define "fedstudy.issuerRef" -}}
{{- if .Values.certManager.issuer.create }}
name: {{ printf "%s-%s-ca" (include "fedstudy.fullname" .) .Values.certManager.study | trunc 63 | trimSuffix "-" }}
kind: Issuer
group: cert-manager.io
{{- else }}
{{- toYaml .Values.certManager.issuer.ref }}
{{- end }}
{{- end }}

{{/* The sites that get a client certificate: certManager.sites, else siteName in role site. */}}
{{- define "fedstudy.certSites" -}}
{{- if .Values.certManager.sites }}
{{- .Values.certManager.sites | toJson }}
{{- else if eq .Values.role "site" }}
{{- list .Values.siteName | toJson }}
{{- else }}
{{- list | toJson }}
{{- end }}
{{- end }}

{{/*
A name the operator derives (its builders.child_name): the parts joined by "-", or when longer
than 63 characters, cut to 54 and suffixed with 8 hex digits of the full name's SHA-256.
Called with a list of parts.
*/}}
{{- define "fedstudy.childName" -}}
{{- $full := join "-" . }}
{{- if le (len $full) 63 }}
{{- $full }}
{{- else }}
{{- printf "%s-%s" (regexReplaceAll "-+$" (trunc 54 $full) "") (sha256sum $full | trunc 8) }}
{{- end }}
{{- end }}
