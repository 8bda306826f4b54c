{{/* Chart name, cut to 63 characters (the DNS label limit). */}}
{{- define "finetune-job.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name "<release>-<chart>" (just the release name when it already contains the chart
name), cut to 63 characters. */}}
{{- define "finetune-job.fullname" -}}
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

{{/* "chart-version" for the helm.sh/chart label. */}}
{{- define "finetune-job.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "finetune-job.labels" -}}
helm.sh/chart: {{ include "finetune-job.chart" . }}
{{ include "finetune-job.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select this release's pods. */}}
{{- define "finetune-job.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-job.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Name of the Job (and of its headless Service). It changes with every revision so that
`helm upgrade` creates a new Job instead of patching a Job's immutable fields. Cut so that the
pod hostnames "<job>-<index>" of an Indexed Job stay within 63 characters. */}}
{{- define "finetune-job.jobName" -}}
{{- printf "%s-%d" (include "finetune-job.fullname" . | trunc 48 | trimSuffix "-") (int .Release.Revision) }}
{{- end }}

{{/* The run id: config.run_id, else "<release>-<revision>" (stable across pod retries of one
Job, new for every revision). */}}
{{- define "finetune-job.runId" -}}
{{- .Values.config.run_id | default (printf "%s-%d" .Release.Name (int .Release.Revision)) }}
{{- end }}

{{- define "finetune-job.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-job.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-job.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Port of /metrics, from the job config; 0 = disabled. */}}
{{- define "finetune-job.metricsPort" -}}
{{- dig "metrics" "port" 8000 .Values.config | int }}
{{- end }}

{{/* Secret holding the S3 credentials; empty when the pods use their service account's
identity (IRSA, workload identity) or the node's. */}}
{{- define "finetune-job.s3SecretName" -}}
{{- if and .Values.s3.existingSecret (or .Values.s3.accessKeyId .Values.s3.secretAccessKey) }}
{{- fail "s3: set either existingSecret or accessKeyId/secretAccessKey, not both" }}
{{- end }}
{{- if ne (empty .Values.s3.accessKeyId) (empty .Values.s3.secretAccessKey) }}
{{- fail "s3: accessKeyId and secretAccessKey go together" }}
{{- end }}
{{- if .Values.s3.existingSecret }}
{{- .Values.s3.existingSecret }}
{{- else if .Values.s3.accessKeyId }}
{{- printf "%s-s3" (include "finetune-job.fullname" .) }}
{{- end }}
{{- end }}

{{- define "finetune-job.cacheDir" -}}
/var/cache/finetune-job
{{- end }}

{{- define "finetune-job.configDir" -}}
/etc/finetune-job
{{- end }}

{{/* Environment of the job container (training and the helm test pod alike). */}}
{{- define "finetune-job.env" -}}
- name: FINETUNE_RUN_ID
  value: {{ include "finetune-job.runId" . | quote }}
- name: FINETUNE_DATA__CACHE_DIR
  value: {{ include "finetune-job.cacheDir" . | quote }}
{{- with .Values.pushgateway.url }}
- name: FINETUNE_METRICS__PUSHGATEWAY
  value: {{ . | quote }}
{{- end }}
- name: HOME
  value: /tmp
- name: KERAS_HOME
  value: /tmp/.keras
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with include "finetune-job.s3SecretName" . }}
{{- $keys := $.Values.s3.existingSecret | empty | ternary (dict "accessKeyId" "AWS_ACCESS_KEY_ID" "secretAccessKey" "AWS_SECRET_ACCESS_KEY") $.Values.s3.secretKeys }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $keys.accessKeyId }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $keys.secretAccessKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes shared by the Job and the helm test pod (the cache volume is not: see cacheVolume). */}}
{{- define "finetune-job.volumes" -}}
- name: config
  configMap:
    name: {{ include "finetune-job.fullname" . }}-config
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- end }}

{{/* The dataset cache of the training pods: an emptyDir or the persistent claim. */}}
{{- define "finetune-job.cacheVolume" -}}
- name: cache
{{- if .Values.cache.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.cache.persistence.existingClaim | default (printf "%s-cache" (include "finetune-job.fullname" .)) }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- end }}
{{- end }}

{{- define "finetune-job.volumeMounts" -}}
- name: config
  mountPath: {{ include "finetune-job.configDir" . }}
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: cache
  mountPath: {{ include "finetune-job.cacheDir" . }}
{{- end }}

{{/* Pod-level fields shared by the Job and the helm test pod. */}}
{{- define "finetune-job.podCommon" -}}
serviceAccountName: {{ include "finetune-job.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The "cluster" part of TF_CONFIG: every worker by its stable Indexed Job hostname under the
headless Service. */}}
{{- define "finetune-job.tfCluster" -}}
{{- $job := include "finetune-job.jobName" . }}
{{- $workers := list }}
{{- range $index := until (int .Values.workers) }}
{{- $workers = append $workers (printf "%s-%d.%s:%d" $job $index $job (int $.Values.multiWorker.port)) }}
{{- end }}
{{- dict "worker" $workers | toJson }}
{{- end }}
