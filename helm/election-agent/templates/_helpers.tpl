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
{{- with .Values.redis.tls.caSecret }}
- name: EA_REDIS_TLS_CA_FILE
  value: {{ printf "/etc/election-agent/redis-tls-ca/%s" $.Values.redis.tls.caKey | quote }}
{{- end }}
{{- with .Values.redis.tls.clientSecret }}
- name: EA_REDIS_TLS_CERT_FILE
  value: {{ printf "/etc/election-agent/redis-tls-client/%s" $.Values.redis.tls.clientCertKey | quote }}
- name: EA_REDIS_TLS_KEY_FILE
  value: {{ printf "/etc/election-agent/redis-tls-client/%s" $.Values.redis.tls.clientKeyKey | quote }}
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
{{- with .Values.tls.existingSecret }}
- name: EA_TLS_CERT_FILE
  value: {{ printf "/etc/election-agent/tls/%s" $.Values.tls.certKey | quote }}
- name: EA_TLS_KEY_FILE
  value: {{ printf "/etc/election-agent/tls/%s" $.Values.tls.keyKey | quote }}
{{- end }}
{{- if include "election-agent.clientCertificates" . }}
- name: EA_TLS_CLIENT_CA_FILE
  value: {{ printf "/etc/election-agent/tls-client-ca/%s" .Values.tls.clientCA.key | quote }}
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

{{/*
Whether clients must present certificates (tls.clientCA): "true", else empty. The values schema
refuses a client CA without tls.existingSecret.
*/}}
{{- define "election-agent.clientCertificates" -}}
{{- if or .Values.tls.clientCA.existingSecret .Values.tls.clientCA.existingConfigMap -}}
true
{{- end -}}
{{- end -}}

{{/*
The probes' handlers. The kubelet's grpc probe cannot speak TLS, and its httpGet probe can
(scheme HTTPS, without verifying) but cannot present a client certificate: with client
certificates required the probes only open a TCP connection.
*/}}
{{- define "election-agent.livenessHandler" -}}
{{- if include "election-agent.clientCertificates" . -}}
tcpSocket:
  port: http
{{- else -}}
httpGet:
  path: /livez
  port: http
{{- if .Values.tls.existingSecret }}
  scheme: HTTPS
{{- end }}
{{- end -}}
{{- end -}}

{{- define "election-agent.readinessHandler" -}}
{{- if include "election-agent.clientCertificates" . -}}
tcpSocket:
  port: grpc
{{- else if .Values.tls.existingSecret -}}
httpGet:
  path: /readyz
  port: http
  scheme: HTTPS
{{- else -}}
grpc:
  port: {{ .Values.grpc.port }}
{{- end -}}
{{- end -}}

{{/*
Every volume the agent reads files from: authentication's, then TLS's. Secret volumes, never
subPath mounts, so that the kubelet's updates of a renewed Secret reach the files.
*/}}
{{- define "election-agent.volumes" -}}
{{- include "election-agent.authVolumes" . }}
{{- include "election-agent.tlsVolumes" . }}
{{- end -}}

{{- define "election-agent.volumeMounts" -}}
{{- include "election-agent.authVolumeMounts" . }}
{{- include "election-agent.tlsVolumeMounts" . }}
{{- end -}}

{{/*
The TLS files: the agent's certificate and key, the CA of client certificates, and Redis' CA and
client certificate; each volume holds only the keys the agent reads.
*/}}
{{- define "election-agent.tlsVolumes" -}}
{{- with .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ . | quote }}
    items:
      - key: {{ $.Values.tls.certKey | quote }}
        path: {{ $.Values.tls.certKey | quote }}
      - key: {{ $.Values.tls.keyKey | quote }}
        path: {{ $.Values.tls.keyKey | quote }}
{{- end }}
{{- if .Values.tls.clientCA.existingSecret }}
- name: tls-client-ca
  secret:
    secretName: {{ .Values.tls.clientCA.existingSecret | quote }}
    items:
      - key: {{ .Values.tls.clientCA.key | quote }}
        path: {{ .Values.tls.clientCA.key | quote }}
{{- else if .Values.tls.clientCA.existingConfigMap }}
- name: tls-client-ca
  configMap:
    name: {{ .Values.tls.clientCA.existingConfigMap | quote }}
    items:
      - key: {{ .Values.tls.clientCA.key | quote }}
        path: {{ .Values.tls.clientCA.key | quote }}
{{- end }}
{{- with .Values.redis.tls.caSecret }}
- name: redis-tls-ca
  secret:
    secretName: {{ . | quote }}
    items:
      - key: {{ $.Values.redis.tls.caKey | quote }}
        path: {{ $.Values.redis.tls.caKey | quote }}
{{- end }}
{{- with .Values.redis.tls.clientSecret }}
- name: redis-tls-client
  secret:
    secretName: {{ . | quote }}
    items:
      - key: {{ $.Values.redis.tls.clientCertKey | quote }}
        path: {{ $.Values.redis.tls.clientCertKey | quote }}
      - key: {{ $.Values.redis.tls.clientKeyKey | quote }}
        path: {{ $.Values.redis.tls.clientKeyKey | quote }}
{{- end }}
{{- end -}}

{{- define "election-agent.tlsVolumeMounts" -}}
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: /etc/election-agent/tls
  readOnly: true
{{- end }}
{{- if include "election-agent.clientCertificates" . }}
- name: tls-client-ca
  mountPath: /etc/election-agent/tls-client-ca
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-tls-ca
  mountPath: /etc/election-agent/redis-tls-ca
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.clientSecret }}
- name: redis-tls-client
  mountPath: /etc/election-agent/redis-tls-client
  readOnly: true
{{- end }}
{{- end -}}

{{/*
The ServiceMonitor's tlsConfig with tls.existingSecret: trust the CA in that Secret for the
Service's name; the fields of serviceMonitor.tlsConfig replace these. With client certificates
required, Prometheus needs one of its own.
*/}}
{{- define "election-agent.serviceMonitorTlsConfig" -}}
{{- $config := dict "serverName" (printf "%s.%s.svc" (include "election-agent.fullname" .) .Release.Namespace) -}}
{{- with .Values.tls.caKey -}}
{{- $_ := set $config "ca" (dict "secret" (dict "name" $.Values.tls.existingSecret "key" .)) -}}
{{- end -}}
{{- range $field, $value := .Values.serviceMonitor.tlsConfig -}}
{{- $_ := set $config $field $value -}}
{{- end -}}
{{- if and (include "election-agent.clientCertificates" .) (not (and (or $config.cert $config.certFile) (or $config.keySecret $config.keyFile))) -}}
{{- fail "serviceMonitor.enabled with tls.clientCA: the agent requires a client certificate, so Prometheus needs one that CA signed — set serviceMonitor.tlsConfig.cert and serviceMonitor.tlsConfig.keySecret" -}}
{{- end -}}
{{- toYaml $config -}}
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
