{{/* The chart's name. */}}
{{- define "election-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's objects' name. */}}
{{- define "election-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "election-agent.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "election-agent.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the agent's pods. */}}
{{- define "election-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "election-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "election-agent.labels" -}}
{{ include "election-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The ServiceAccount the agent runs as. */}}
{{- define "election-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "election-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The agent's environment: every setting the values make, as the EA_* variables the agent reads.
Kept in one place so that the e2e test can run the agent out of cluster with exactly this.
*/}}
{{- define "election-agent.env" -}}
- name: EA_ENV
  value: {{ .Values.log.env | quote }}
- name: EA_LOG_LEVEL
  value: {{ .Values.log.level | quote }}
- name: EA_GRPC_PORT
  value: {{ .Values.grpc.port | quote }}
- name: EA_HTTP_PORT
  value: {{ .Values.http.port | quote }}
- name: EA_METRIC_ENABLE
  value: {{ .Values.metrics.enabled | quote }}
- name: EA_KUBE_ENABLE
  value: {{ .Values.kube.enabled | quote }}
- name: EA_KUBE_IN_CLUSTER
  value: "true"
- name: EA_KUBE_NAMESPACES
  value: {{ join "," .Values.watchNamespaces | quote }}
- name: EA_CONTROLLER_ENABLE
  value: {{ .Values.controller.enabled | quote }}
- name: EA_CONTROLLER_TERM
  value: {{ .Values.controller.term | quote }}
- name: EA_REDIS_MODE
  value: {{ include "election-agent.redisMode" . | quote }}
{{- if .Values.redis.demo.enabled }}
- name: EA_REDIS_URLS
  value: "redis://{{ include "election-agent.fullname" . }}-redis:6379"
{{- else if .Values.redis.existingSecret }}
- name: EA_REDIS_URLS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else if .Values.redis.urls }}
- name: EA_REDIS_URLS
  value: {{ join "," .Values.redis.urls | quote }}
{{- end }}
{{- if .Values.redis.master }}
- name: EA_REDIS_MASTER
  value: {{ .Values.redis.master | quote }}
{{- end }}
- name: EA_REDIS_OPERATION_TIMEOUT
  value: {{ .Values.redis.operationTimeout | quote }}
- name: EA_REDIS_SERVER_TIMEOUT
  value: {{ .Values.redis.serverTimeout | quote }}
- name: EA_REDIS_REPLICA_ACKS
  value: {{ .Values.redis.replicaAcks | quote }}
- name: EA_LEASE_MIN_TERM
  value: {{ .Values.lease.minTerm | quote }}
- name: EA_LEASE_MAX_TERM
  value: {{ .Values.lease.maxTerm | quote }}
- name: EA_LEASE_RETENTION
  value: {{ .Values.lease.retention | quote }}
- name: EA_SHUTDOWN_TIMEOUT
  value: {{ .Values.shutdownTimeout | quote }}
{{- if .Values.auth.tokens.existingSecret }}
- name: EA_AUTH_TOKENS_FILE
  value: {{ printf "/etc/election-agent/tokens/%s" .Values.auth.tokens.key | quote }}
{{- end }}
{{- if .Values.auth.kubernetes.enabled }}
- name: EA_AUTH_KUBERNETES
  value: "true"
- name: EA_AUTH_AUDIENCE
  value: {{ .Values.auth.kubernetes.audience | quote }}
{{- end }}
{{- if or .Values.auth.policy.existingConfigMap .Values.auth.policy.existingSecret }}
- name: EA_AUTH_POLICY_FILE
  value: {{ printf "/etc/election-agent/policy/%s" .Values.auth.policy.key | quote }}
{{- end }}
{{- if .Values.auth.protectMetrics }}
- name: EA_AUTH_METRICS
  value: "true"
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The store's mode: `single` with the demo Redis. */}}
{{- define "election-agent.redisMode" -}}
{{- if .Values.redis.demo.enabled -}}
single
{{- else -}}
{{- .Values.redis.mode -}}
{{- end -}}
{{- end -}}

{{/* Replicas: 2 by default with Redis, 1 with the memory store (never more). */}}
{{- define "election-agent.replicas" -}}
{{- $memory := eq (include "election-agent.redisMode" .) "memory" -}}
{{- if kindIs "invalid" .Values.replicaCount -}}
{{- ternary 1 2 $memory -}}
{{- else if and $memory (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 needs a Redis store (redis.mode): with the memory store each replica would elect its own leaders" -}}
{{- else -}}
{{- .Values.replicaCount -}}
{{- end -}}
{{- end -}}

{{/* The files authentication reads: the tokens Secret and the policy ConfigMap or Secret. */}}
{{- define "election-agent.authVolumes" -}}
{{- with .Values.auth.tokens.existingSecret }}
- name: auth-tokens
  secret:
    secretName: {{ . }}
{{- end }}
{{- if .Values.auth.policy.existingConfigMap }}
- name: auth-policy
  configMap:
    name: {{ .Values.auth.policy.existingConfigMap }}
{{- else if .Values.auth.policy.existingSecret }}
- name: auth-policy
  secret:
    secretName: {{ .Values.auth.policy.existingSecret }}
{{- end }}
{{- end -}}

{{- define "election-agent.authVolumeMounts" -}}
{{- if .Values.auth.tokens.existingSecret }}
- name: auth-tokens
  mountPath: /etc/election-agent/tokens
  readOnly: true
{{- end }}
{{- if or .Values.auth.policy.existingConfigMap .Values.auth.policy.existingSecret }}
- name: auth-policy
  mountPath: /etc/election-agent/policy
  readOnly: true
{{- end }}
{{- end -}}
