{{/* Chart name, cut to 63 characters (the DNS label limit). */}}
{{- define "finetune-job.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name "<release>-<chart>" (just the release name when it already contains the chart
name), cut to 63 characters. It names Services too (several workers, TensorBoard, a JobSet's own), whose names
Kubernetes wants as DNS-1035 labels (a letter first, no dot), which Helm's release names need not be: `1flowers`
or `my.run` rendered Services the API server refuses, so then the render fails naming it. */}}
{{- define "finetune-job.fullname" -}}
{{- $full := "" }}
{{- if .Values.fullnameOverride }}
{{- $full = .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- $full = .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $full = printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- $services := or (gt (int .Values.workers) 1) .Values.tensorboard.enabled (eq .Values.workload.kind "JobSet") }}
{{- if and $services (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $full)) }}
{{- fail (printf "the resources' name %q (release %q) must start with a letter and hold only a-z, 0-9 and '-' (Kubernetes' Service names, DNS-1035): choose another release name or fullnameOverride" $full .Release.Name) }}
{{- end }}
{{- $full }}
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

{{/* A values key's extra labels, as YAML (list CONTEXT "where" LABELS): a key the chart sets on every resource is
refused, as it rendered twice (one silently lost, or the manifest refused for a duplicate key). */}}
{{- define "finetune-job.extraLabels" -}}
{{- $own := include "finetune-job.labels" (index . 0) | fromYaml }}
{{- $extra := index . 2 | default dict }}
{{- range $key, $_ := $extra }}
{{- if hasKey $own $key }}
{{- fail (printf "%s: %s is one of the chart's own labels, set on every resource it renders; choose another key" (index $ 1) $key) }}
{{- end }}
{{- end }}
{{- with $extra }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select this release's pods. */}}
{{- define "finetune-job.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-job.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Name of the Job or JobSet (and of the Job's headless Service). It changes with every revision
so that `helm upgrade` creates a new workload instead of patching immutable fields. Cut so that the
pod hostnames stay within 63 characters, for up to 1024 workers: "<job>-<index>" for an Indexed Job,
"<jobset>-worker-0-<index>" plus the 6-character random suffix of the pod name for a JobSet (its
webhook checks that). */}}
{{- define "finetune-job.jobName" -}}
{{- $suffix := printf "-%d" (int .Release.Revision) }}
{{- $keep := eq .Values.workload.kind "JobSet" | ternary (sub 43 (len $suffix)) 48 }}
{{- printf "%s%s" (include "finetune-job.cut" (list (include "finetune-job.fullname" .) (int $keep))) $suffix }}
{{- end }}

{{/* A name cut to at most N characters (list NAME N): where it is longer, its first characters and 6 of its
SHA-256, so that two long release names that share their first N characters do not make one resource name (the
second install failed on the first's Job, JobSet or TensorBoard). */}}
{{- define "finetune-job.cut" -}}
{{- $name := index . 0 }}
{{- $most := index . 1 | int }}
{{- if le (len $name) $most }}
{{- $name }}
{{- else }}
{{- printf "%s-%s" ($name | trunc (sub $most 7 | int) | trimSuffix "-") ($name | sha256sum | trunc 6) }}
{{- end }}
{{- end }}

{{/* The one replicated Job of the JobSet: all workers, as the indexes of one Indexed Job. */}}
{{- define "finetune-job.replicatedJob" -}}
worker
{{- end }}

{{/* Workers' hostname prefix: the pod of index i is "<prefix>-<i>", under the subdomain named after
the Job or JobSet (the chart's headless Service for a Job, the one JobSet makes for a JobSet). */}}
{{- define "finetune-job.workerHostPrefix" -}}
{{- if eq .Values.workload.kind "JobSet" }}
{{- printf "%s-%s-0" (include "finetune-job.jobName" .) (include "finetune-job.replicatedJob" .) }}
{{- else }}
{{- include "finetune-job.jobName" . }}
{{- end }}
{{- end }}

{{/* Kueue labels of the Job or JobSet: the LocalQueue and the WorkloadPriorityClass. */}}
{{- define "finetune-job.kueueLabels" -}}
{{- with .Values.kueue.queueName }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end }}
{{- with .Values.kueue.priorityClass }}
kueue.x-k8s.io/priority-class: {{ . }}
{{- end }}
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
{{ include "finetune-job.storageEnv" . }}
{{- end }}

{{/* Storage access and home directory, shared by every container of the chart (TensorBoard too):
S3 endpoint, region, credentials and extraEnv. */}}
{{- define "finetune-job.storageEnv" -}}
- name: HOME
  value: /tmp
- name: KERAS_HOME
  value: /tmp/.keras
{{- /* config.s3.endpoint_url reached the Job alone (its config file, which wins over this variable), not
TensorBoard: both take it here, first, as the job does */}}
{{- with dig "s3" "endpoint_url" "" (.Values.config | default dict) | default .Values.s3.endpointUrl }}
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
{{- $own := list "HOME" "KERAS_HOME" "AWS_ENDPOINT_URL_S3" "AWS_REGION" "AWS_DEFAULT_REGION" "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" "TF_CONFIG" "TF_CONFIG_CLUSTER" "FINETUNE_RUN_ID" "FINETUNE_DATA__CACHE_DIR" "FINETUNE_METRICS__PUSHGATEWAY" "FINETUNE_METRICS__PORT" "FINETUNE_METRICS__HOST" "FINETUNE_DISTRIBUTION__STRATEGY" "FINETUNE_DISTRIBUTION" "FINETUNE_METRICS" }}
{{- range .Values.extraEnv }}
{{- /* Appended after the chart's own, a duplicate won silently: FINETUNE_METRICS__PORT moved /metrics away from the
containerPort and the PodMonitor, FINETUNE_RUN_ID ran another run than NOTES named, and the render's guards
(strategy, ports) were bypassed */}}
{{- if has .name $own }}
{{- fail (printf "extraEnv: %s is set by the chart, or read by its checks (from config:, s3:, pushgateway: or workers): set it there" .name) }}
{{- end }}
{{- /* Credentials in a plain value are in the pod spec, readable by anyone who can read the Job: as the chart's own
URLs refuse user:password@, and its keys come from a Secret */}}
{{- if and (hasKey . "value") (regexMatch "(?i)(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?)(_|$)" .name) (not (hasPrefix "/" (toString .value))) }}
{{- fail (printf "extraEnv: %s holds a credential: take it from a Secret (valueFrom.secretKeyRef), not a plain value in the pod spec" .name) }}
{{- end }}
{{- if and (hasKey . "value") (regexMatch "[A-Za-z][A-Za-z0-9+.-]*://[^\\s]*@" (toString .value)) }}
{{- fail (printf "extraEnv: %s: a URL with user:password@ would be in the pod spec in plain text: take it from a Secret (valueFrom.secretKeyRef)" .name) }}
{{- end }}
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
{{- include "finetune-job.extraVolumes" . }}
{{- end }}

{{/* extraVolumes (after the chart's own volumes), each extraVolumeMounts' volume checked to be there: a mount of a
volume the pod lacks, or a name the chart's own volumes use, rendered a pod the API server refuses. */}}
{{- define "finetune-job.extraVolumes" -}}
{{- $names := list }}
{{- range .Values.extraVolumes }}
{{- if or (has .name $names) (has .name (list "config" "tmp" "dshm" "cache")) }}
{{- fail (printf "extraVolumes: %q is a volume of the chart's own (config, tmp, dshm, cache) or named twice; choose another name" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- end }}
{{- $taken := list "/tmp" "/dev/shm" (include "finetune-job.configDir" .) (include "finetune-job.cacheDir" .) }}
{{- range .Values.extraVolumeMounts }}
{{- if not (has .name $names) }}
{{- fail (printf "extraVolumeMounts: %q is none of extraVolumes; add it there" .name) }}
{{- end }}
{{- $path := trimSuffix "/" .mountPath }}
{{- if has $path $taken }}
{{- fail (printf "extraVolumeMounts: %q mounts at %s, where the chart mounts a volume of its own or another of extraVolumeMounts; choose another path" .name .mountPath) }}
{{- end }}
{{- if hasPrefix (printf "%s/" (include "finetune-job.configDir" $)) $path }}
{{- fail (printf "extraVolumeMounts: %q mounts at %s, inside the chart's read-only config volume; choose another path" .name .mountPath) }}
{{- end }}
{{- $taken = append $taken $path }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
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
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Identity and pod security context of every pod of the chart (TensorBoard too): the service
account without its token, pull secrets, the "restricted" pod security context. */}}
{{- define "finetune-job.podIdentity" -}}
serviceAccountName: {{ include "finetune-job.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Pod-level fields shared by the Job and the helm test pod. */}}
{{- define "finetune-job.podCommon" -}}
{{ include "finetune-job.podIdentity" . }}
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

{{/* The "cluster" part of TF_CONFIG: every worker by its stable hostname, "<prefix>-<index>.<subdomain>"
(see workerHostPrefix). */}}
{{- define "finetune-job.tfCluster" -}}
{{- $prefix := include "finetune-job.workerHostPrefix" . }}
{{- $subdomain := include "finetune-job.jobName" . }}
{{- $workers := list }}
{{- range $index := until (int .Values.workers) }}
{{- $workers = append $workers (printf "%s-%d.%s:%d" $prefix $index $subdomain (int $.Values.multiWorker.port)) }}
{{- end }}
{{- dict "worker" $workers | toJson }}
{{- end }}

{{/* podFailurePolicy of the training Job (and of the JobSet's Job). Exit codes 2 (bad config) and
3 (bad data): a retry cannot help, fail the Job at once. A disruption (preemption, eviction, node
drain): in a plain Job the replacement pod resumes from the last checkpoint and the disruption does
not use up backoffLimit; in a JobSet the Job fails, and the JobSet's failure policy restarts all
workers together without counting it. Exit code 143 is a stop asked for (SIGTERM), after a checkpoint: the
workers share a stop through their gradients' all-reduce, so when one is evicted all the others exit 143 too,
without the DisruptionTarget condition (only the evicted pod has it); counted, each eviction of one worker
used up workers - 1 of backoffLimit. */}}
{{- define "finetune-job.podFailurePolicy" -}}
{{- $onDisruption := eq .Values.workload.kind "JobSet" | ternary "FailJob" "Ignore" }}
rules:
  - action: FailJob
    onExitCodes:
      containerName: train
      operator: In
      values: [2, 3]
  - action: {{ $onDisruption }}
    onPodConditions:
      - type: DisruptionTarget
        status: "True"
  - action: {{ $onDisruption }}
    onExitCodes:
      containerName: train
      operator: In
      values: [143]
{{- end }}

{{/* Pod template of the training workers, for the Job and the JobSet alike. With workers > 1 a
shell wrapper builds TF_CONFIG from the workers' stable hostnames (tfCluster) and the pod's
completion index. */}}
{{- define "finetune-job.trainPod" -}}
{{- $workers := int .Values.workers }}
{{- $strategy := dig "distribution" "strategy" "auto" .Values.config }}
{{- if and (gt $workers 1) (has $strategy (list "one_device" "mirrored")) }}
{{- /* each worker trained alone (mirrored: the chief exported its own model) or failed with exit 1, retried */}}
{{- fail (printf "config.distribution.strategy %s trains on one node, but workers is %d: set it to auto or multi_worker" $strategy $workers) }}
{{- end }}
{{- if and (eq $workers 1) (eq $strategy "multi_worker") }}
{{- fail "config.distribution.strategy multi_worker needs several workers, but workers is 1: set workers, or the strategy to auto" }}
{{- end }}
{{- $metricsPort := include "finetune-job.metricsPort" . | int }}
{{- $configFile := printf "%s/config.yaml" (include "finetune-job.configDir" .) }}
metadata:
  labels:
    {{- include "finetune-job.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/component: train
    {{- range $key, $_ := .Values.podLabels }}
    {{- if has $key (list "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/component") }}
    {{- /* written twice in the pod, one was lost: the worker Service and the PodMonitor lost their pods */}}
    {{- fail (printf "podLabels: %s is one of the chart's own labels, which its Services and PodMonitor select by" $key) }}
    {{- end }}
    {{- end }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds | int64 }}
  {{- include "finetune-job.podCommon" . | nindent 2 }}
  {{- if and (gt $workers 1) (ne .Values.workload.kind "JobSet") }}
  subdomain: {{ include "finetune-job.jobName" . }}
  {{- end }}
  containers:
    - name: train
      image: {{ include "finetune-job.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      {{- if gt $workers 1 }}
      command: ["/bin/sh", "-c"]
      args:
        - |
          # TF_CONFIG for MultiWorkerMirroredStrategy: the cluster is rendered by the chart,
          # the task index comes from the Indexed Job; worker 0 is the chief.
          TF_CONFIG="{\"cluster\":${TF_CONFIG_CLUSTER},\"task\":{\"type\":\"worker\",\"index\":${JOB_COMPLETION_INDEX:?}}}"
          export TF_CONFIG
          exec finetune-job train --config {{ $configFile }}
      {{- else }}
      command: ["finetune-job"]
      args: ["train", "--config", {{ $configFile | quote }}]
      {{- end }}
      env:
        {{- include "finetune-job.env" . | nindent 8 }}
        {{- if gt $workers 1 }}
        - name: TF_CONFIG_CLUSTER
          value: {{ include "finetune-job.tfCluster" . | quote }}
        {{- end }}
      {{- if and (gt $workers 1) (eq $metricsPort (int .Values.multiWorker.port)) }}
      {{- /* both servers would bind it: the second to start failed, after the pods were scheduled */}}
      {{- fail (printf "config.metrics.port %d is multiWorker.port too: TensorFlow's worker server and the metrics server cannot share it; change one" $metricsPort) }}
      {{- end }}
      {{- if or (gt $metricsPort 0) (gt $workers 1) }}
      ports:
        {{- if gt $metricsPort 0 }}
        - name: metrics
          containerPort: {{ $metricsPort }}
          protocol: TCP
        {{- end }}
        {{- if gt $workers 1 }}
        - name: worker
          containerPort: {{ .Values.multiWorker.port }}
          protocol: TCP
        {{- end }}
      {{- end }}
      {{- $limits := .Values.resources.limits | default dict }}
      {{- range $name, $count := .Values.resources.requests | default dict }}
      {{- /* an extended resource (nvidia.com/gpu) is requested through its limit: a request alone, or one unlike
      the limit, rendered a pod the API server refuses */}}
      {{- if and (contains "/" $name) (ne (toString $count) (toString (get $limits $name))) }}
      {{- fail (printf "resources.requests.%s: %v, but resources.limits.%s is %v; Kubernetes takes an extended resource as a limit (the request may only repeat it): set limits.%s: %v" $name $count $name (get $limits $name | default "not set") $name $count) }}
      {{- end }}
      {{- end }}
      {{- include "finetune-job.checkRequests" (list "resources" .Values.resources) }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        {{- include "finetune-job.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "finetune-job.volumes" . | nindent 4 }}
    {{- include "finetune-job.cacheVolume" . | nindent 4 }}
{{- end }}

{{/* A Kubernetes quantity (2, 500m, 8Gi, .5, 1e9) as a number of its unit, for comparisons. */}}
{{- define "finetune-job.quantity" -}}
{{- $q := toString . -}}
{{- $number := regexFind "^([0-9]+(\\.[0-9]*)?|\\.[0-9]+)" $q -}}
{{- $suffix := trimPrefix $number $q -}}
{{- $scale := dict "" 1.0 "n" 1e-9 "u" 1e-6 "m" 1e-3 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- if hasKey $scale $suffix -}}
{{- mulf (float64 $number) (get $scale $suffix) -}}
{{- else -}}
{{- float64 $q -}}
{{- end -}}
{{- end }}

{{/* (list "resources" .Values.resources): a request above its limit rendered a pod the API server refuses ("must be
less than or equal to ... limit"): the Job then created no pod, and `helm install` had said nothing. */}}
{{- define "finetune-job.checkRequests" -}}
{{- $where := index . 0 -}}
{{- $resources := index . 1 | default dict -}}
{{- $limits := $resources.limits | default dict -}}
{{- range $name, $request := $resources.requests | default dict -}}
{{- if and (hasKey $limits $name) (not (contains "/" $name)) -}}
{{- $limit := get $limits $name -}}
{{- if gt (float64 (include "finetune-job.quantity" $request)) (float64 (include "finetune-job.quantity" $limit)) -}}
{{- fail (printf "%s.requests.%s: %v is more than %s.limits.%s: %v, which the API server refuses; raise the limit or lower the request" $where $name $request $where $name $limit) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}
