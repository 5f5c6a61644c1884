{{/* Names, labels and derived settings shared by every template. */}}

{{/* The chart name, as the app.kubernetes.io/name label. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: <release>-<chart>, or the release name alone when it already holds
the chart name. Truncated to 63 characters because some names become DNS labels.
*/}}
{{- define "finetune-operator.fullname" -}}
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

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object the chart creates. */}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The subset of labels that selects the operator's pods; immutable once a Deployment exists. */}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "finetune-operator.imageRef" -}}
{{- $image := index . 0 }}
{{- $appVersion := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $appVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "finetune-operator.image" -}}
{{- include "finetune-operator.imageRef" (list .Values.image .Chart.AppVersion) }}
{{- end }}

{{- define "finetune-operator.trainerImage" -}}
{{- include "finetune-operator.imageRef" (list .Values.trainer.image .Chart.AppVersion) }}
{{- end }}

{{/* "true" when leader election is on (explicitly, or because several replicas run), else empty. */}}
{{- define "finetune-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{- end }}
{{- end }}

{{/* The name of the replicas' Lease, in the release namespace. */}}
{{- define "finetune-operator.leaseName" -}}
{{- default (include "finetune-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Which namespaces the operator serves, and so how it is granted its rules: "cluster" (every namespace, a
ClusterRoleBinding), "namespaces" (watchNamespaces, a Role per namespace) or "selector"
(watchNamespaceSelector, a ClusterRole bound in each tenant namespace by its onboarding's RoleBinding).
*/}}
{{- define "finetune-operator.scope" -}}
{{- if and .Values.watchNamespaces .Values.watchNamespaceSelector }}
{{- fail "watchNamespaces and watchNamespaceSelector are both set: serve a list of namespaces or the namespaces with a label, not both" }}
{{- end }}
{{- if .Values.watchNamespaceSelector }}selector{{ else if .Values.watchNamespaces }}namespaces{{ else }}cluster{{ end }}
{{- end }}

{{/* "true" when the operator serves every namespace (a ClusterRole bound cluster-wide), else empty. */}}
{{- define "finetune-operator.clusterwide" -}}
{{- if eq (include "finetune-operator.scope" .) "cluster" }}true{{- end }}
{{- end }}

{{/*
The trainer's imagePullSecrets as the operator reads them: names, comma-separated.
*/}}
{{- define "finetune-operator.trainerPullSecrets" -}}
{{- $names := list }}
{{- range .Values.trainer.imagePullSecrets }}
{{- $names = append $names .name }}
{{- end }}
{{- join "," $names }}
{{- end }}

{{/* NetworkPolicy egress to the API server and cluster DNS (templates/networkpolicy.yaml). */}}
{{- define "finetune-operator.apiServerEgress" -}}
- ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.apiServer.cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
# Cluster DNS, wherever it runs: rank 0's name, the API server's, the hub's.
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}

{{/* trainer.podDefaults as the operator reads it (JSON), without the empty fields. */}}
{{- define "finetune-operator.podDefaults" -}}
{{- $defaults := dict }}
{{- range $key, $value := .Values.trainer.podDefaults }}
{{- if $value }}
{{- $_ := set $defaults $key $value }}
{{- end }}
{{- end }}
{{- toJson $defaults }}
{{- end }}
