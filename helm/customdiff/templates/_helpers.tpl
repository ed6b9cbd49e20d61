{{/* Names: `helm create` conventions, truncated to the 63 characters of a DNS label. */}}
{{- define "customdiff.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "customdiff.fullname" -}}
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

{{/* Name of one component's resources; components end in at most 9 characters. */}}
{{- define "customdiff.componentName" -}}
{{- printf "%s-%s" (include "customdiff.fullname" .ctx | trunc 53 | trimSuffix "-") .component }}
{{- end }}

{{- define "customdiff.selectorLabels" -}}
app.kubernetes.io/name: {{ include "customdiff.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "customdiff.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "customdiff.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of the training pods the launcher creates (services/trainer/launchers/job_manifest.py). */}}
{{- define "customdiff.trainingPodLabels" -}}
app.kubernetes.io/name: customdiff
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: training-job
{{- end }}

{{/* `registry/repository:tag` of one of .Values.images; the tag defaults to the appVersion. */}}
{{- define "customdiff.image" -}}
{{- $image := index .ctx.Values.images .name }}
{{- $repository := $image.repository }}
{{- with .ctx.Values.images.registry }}{{ $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}{{ end }}
{{- printf "%s:%s" $repository (default .ctx.Chart.AppVersion $image.tag) }}
{{- end }}

{{- define "customdiff.serviceAccount" -}}
{{ include "customdiff.fullname" . }}
{{- end }}

{{- define "customdiff.dataClaim" -}}
{{- default (include "customdiff.componentName" (dict "ctx" . "component" "data")) .Values.persistence.existingClaim }}
{{- end }}

{{- define "customdiff.secretName" -}}
{{ include "customdiff.componentName" (dict "ctx" . "component" "secrets") }}
{{- end }}

{{- define "customdiff.sqlite" -}}
{{- if and (not .Values.database.url) (not .Values.database.existingSecret) }}true{{ end }}
{{- end }}

{{- define "customdiff.storeUrl" -}}
{{- default (printf "%s/store" .Values.persistence.mountPath) .Values.store.url }}
{{- end }}

{{/* The base model path every component uses; empty means the tiny base the services build. */}}
{{- define "customdiff.baseModel" -}}
{{- if .Values.baseModel.existingClaim }}
{{- trimSuffix "/" (printf "%s/%s" .Values.baseModel.mountPath .Values.baseModel.path) }}
{{- else }}
{{- printf "%s/tiny-base" .Values.persistence.mountPath }}
{{- end }}
{{- end }}

{{/* The port of each service's /metrics; 0 turns the endpoint off. */}}
{{- define "customdiff.metricsPort" -}}
{{- if .Values.metrics.enabled }}{{ .Values.metrics.port }}{{ else }}0{{ end }}
{{- end }}

{{/* The YAML file `Settings.load` reads (services/common/settings.py); keys are Settings fields. */}}
{{- define "customdiff.config" -}}
{{- $mount := .Values.persistence.mountPath }}
{{- $jobs := .Values.trainer.jobs }}
host: 0.0.0.0
trainer_port: {{ .Values.trainer.port }}
merger_port: {{ .Values.merger.port }}
inference_port: {{ .Values.inference.port }}
{{- if include "customdiff.sqlite" . }}
database_url: {{ printf "sqlite:///%s/registry.db" $mount | quote }}
{{- end }}
store_url: {{ include "customdiff.storeUrl" . | quote }}
work_dir: {{ default (printf "%s/jobs" $mount) .Values.store.workDirUrl | quote }}
{{- if .Values.baseModel.existingClaim }}
base_model: {{ include "customdiff.baseModel" . | quote }}
{{- end }}
api_keys_file: {{ printf "/etc/customdiff/api-keys/%s" .Values.apiKeys.secretKey | quote }}
{{- if .Values.tls.existingSecret }}
tls_cert_file: /etc/customdiff/tls/tls.crt
tls_key_file: /etc/customdiff/tls/tls.key
{{- end }}
{{- if .Values.tls.clientCaSecret }}
tls_client_ca_file: {{ printf "/etc/customdiff/client-ca/%s" .Values.tls.clientCaKey | quote }}
{{- end }}
triton_url: {{ printf "%s:8001" (include "customdiff.componentName" (dict "ctx" . "component" "triton")) | quote }}
triton_model: stable_diffusion
launcher: {{ .Values.trainer.launcher }}
max_message_bytes: {{ int64 .Values.config.maxMessageBytes }}
max_images_per_concept: {{ .Values.config.maxImagesPerConcept }}
max_image_bytes: {{ int64 .Values.config.maxImageBytes }}
max_image_pixels: {{ int64 .Values.config.maxImagePixels }}
shutdown_grace_s: {{ .Values.config.shutdownGraceSeconds }}
rpc_limits: {{ toJson .Values.config.rpcLimits }}
metrics_port: {{ include "customdiff.metricsPort" . }}
otlp_endpoint: {{ .Values.tracing.otlpEndpoint | quote }}
log_format: {{ .Values.logFormat }}
quotas:
  default: {{ include "customdiff.quota" .Values.config.quotas.default }}
  tenants:
    {{- range $tenant, $quota := .Values.config.quotas.tenants }}
    {{ $tenant | quote }}: {{ include "customdiff.quota" $quota }}
    {{- else }} {}
    {{- end }}
kubernetes:
  namespace: {{ .Release.Namespace | quote }}
  instance: {{ .Release.Name | quote }}
  image: {{ include "customdiff.image" (dict "ctx" . "name" "trainer") | quote }}
  image_pull_policy: {{ .Values.images.trainer.pullPolicy }}
  image_pull_secrets: {{ toJson .Values.imagePullSecrets }}
  service_account: {{ include "customdiff.serviceAccount" . | quote }}
  node_selector: {{ toJson $jobs.nodeSelector }}
  tolerations: {{ toJson $jobs.tolerations }}
  resources: {{ toJson $jobs.resources }}
  store_pvc: {{ if .Values.persistence.enabled }}{{ include "customdiff.dataClaim" . | quote }}{{ else }}""{{ end }}
  store_mount_path: {{ $mount | quote }}
  base_model_pvc: {{ .Values.baseModel.existingClaim | quote }}
  base_model_mount_path: {{ .Values.baseModel.mountPath | quote }}
  env_from_secrets: {{ if .Values.store.envFromSecret }}[{{ .Values.store.envFromSecret | quote }}]{{ else }}[]{{ end }}
  run_as_user: {{ .Values.podSecurityContext.runAsUser | default 1000 }}
  shm_size: {{ $jobs.shmSize | quote }}
  backoff_limit: {{ $jobs.backoffLimit }}
  active_deadline_seconds: {{ $jobs.activeDeadlineSeconds }}
  ttl_seconds_after_finished: {{ $jobs.ttlSecondsAfterFinished }}
  rendezvous_port: {{ $jobs.rendezvousPort }}
  watch_timeout_seconds: {{ $jobs.watchTimeoutSeconds }}
  queue_name: {{ $jobs.kueue.queueName | quote }}
  priority_class_name: {{ $jobs.priorityClassName | quote }}
  tenant_priority_classes: {{ toJson $jobs.tenantPriorityClasses }}
{{- end }}

{{/* Volumes every customdiff pod mounts: config, API keys, TLS (and the client CA), data (unless
     persistence is off), base model, /tmp. */}}
{{- define "customdiff.serviceVolumes" -}}
- name: config
  configMap:
    name: {{ include "customdiff.fullname" . }}
- name: api-keys
  secret:
    secretName: {{ default (include "customdiff.secretName" .) .Values.apiKeys.existingSecret }}
    items:
      - key: {{ .Values.apiKeys.secretKey }}
        path: {{ .Values.apiKeys.secretKey }}
{{- with .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .Values.tls.clientCaSecret }}
- name: client-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $.Values.tls.clientCaKey }}
        path: {{ $.Values.tls.clientCaKey }}
{{- end }}
{{- if .Values.persistence.enabled }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "customdiff.dataClaim" . }}
{{- end }}
{{- with .Values.baseModel.existingClaim }}
- name: base-model
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: true
{{- end }}
- name: tmp
  emptyDir: {}
{{- end }}

{{/* One message per broken rule, one `fail` for all of them (values.schema.json checks the types). */}}
{{- define "customdiff.validateValues" -}}
{{- $errors := list }}
{{- if include "customdiff.sqlite" . }}
{{- range $component := list "trainer" "merger" "inference" }}
{{- if gt (int (index $.Values $component).replicas) 1 }}
{{- $errors = append $errors (printf "%s.replicas: SQLite (database.url empty) allows 1 replica, got %v; set database.url to a PostgreSQL URL" $component (index $.Values $component).replicas) }}
{{- end }}
{{- end }}
{{- if .Values.inference.autoscaling.enabled }}
{{- $errors = append $errors "inference.autoscaling.enabled: SQLite (database.url empty) allows 1 replica; set database.url to a PostgreSQL URL" }}
{{- end }}
{{- end }}
{{- if not .Values.persistence.enabled }}
{{- if include "customdiff.sqlite" . }}
{{- $errors = append $errors "persistence.enabled: false leaves SQLite no volume; set database.url (or database.existingSecret) to a PostgreSQL URL" }}
{{- end }}
{{- if not (contains "://" .Values.store.url) }}
{{- $errors = append $errors (printf "persistence.enabled: false needs store.url to be an object-store URL such as s3://bucket/customdiff, got %q" .Values.store.url) }}
{{- end }}
{{- if not .Values.store.workDirUrl }}
{{- $errors = append $errors "persistence.enabled: false needs store.workDirUrl, an object-store URL for job directories such as s3://bucket/customdiff-jobs" }}
{{- end }}
{{- end }}
{{- if and .Values.store.workDirUrl (not .Values.baseModel.existingClaim) }}
{{- $errors = append $errors "store.workDirUrl: training pods must mount the base model; set baseModel.existingClaim (the tiny test base is built beside local job directories only)" }}
{{- end }}
{{- if and .Values.database.url .Values.database.existingSecret }}
{{- $errors = append $errors "database: set url or existingSecret, not both" }}
{{- end }}
{{- if and .Values.apiKeys.keys .Values.apiKeys.existingSecret }}
{{- $errors = append $errors "apiKeys: set keys or existingSecret, not both" }}
{{- end }}
{{- if .Values.baseModel.init.enabled }}
{{- if not .Values.baseModel.existingClaim }}
{{- $errors = append $errors "baseModel.init.enabled: needs baseModel.existingClaim, the claim the init step fills" }}
{{- end }}
{{- if or (not .Values.baseModel.init.image) (not .Values.baseModel.init.command) }}
{{- $errors = append $errors "baseModel.init.enabled: needs baseModel.init.image and baseModel.init.command" }}
{{- end }}
{{- end }}
{{- range $component := list "inference" "triton" }}
{{- with (index $.Values $component).autoscaling }}
{{- if and .enabled (gt (int .minReplicas) (int .maxReplicas)) }}
{{- $errors = append $errors (printf "%s.autoscaling: minReplicas %v is above maxReplicas %v" $component .minReplicas .maxReplicas) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.metrics.enabled }}
{{- range $component := list "trainer" "merger" "inference" }}
{{- if eq (int (index $.Values $component).port) (int $.Values.metrics.port) }}
{{- $errors = append $errors (printf "metrics.port: %v is also %s.port; give /metrics its own port" $.Values.metrics.port $component) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.tls.clientCaSecret (not .Values.tls.existingSecret) }}
{{- $errors = append $errors "tls.clientCaSecret: mTLS needs the services' own key pair; set tls.existingSecret too" }}
{{- end }}
{{- $selectorKeys := keys (fromYaml (include "customdiff.selectorLabels" (dict "ctx" . "component" "x"))) | sortAlpha }}
{{- $chartVolumes := list "config" "api-keys" "tls" "client-ca" "data" "base-model" "base-model-rw" "dshm" "tmp" }}
{{- range $component := list "trainer" "merger" "inference" "triton" }}
{{- $values := index $.Values $component }}
{{- range $key := keys $values.podLabels | sortAlpha }}
{{- if has $key $selectorKeys }}
{{- $errors = append $errors (printf "%s.podLabels: %s is one of the chart's selector labels; pick another key" $component $key) }}
{{- end }}
{{- end }}
{{- range $values.extraVolumes }}
{{- if has .name $chartVolumes }}
{{- $errors = append $errors (printf "%s.extraVolumes: the chart names a volume %s already; rename yours" $component .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.triton.modelRepository "onnx") (not .Values.baseModel.existingClaim) }}
{{- $errors = append $errors "triton.modelRepository: onnx reads the exported repository from baseModel.existingClaim; set it" }}
{{- end }}
{{- if and (eq .Values.triton.modelRepository "onnx") (eq .Values.triton.compose "merge") }}
{{- $errors = append $errors "triton.compose: merge runs the torch text encoder, which the onnx repository replaces; use sum or the torch repository" }}
{{- end }}
{{- if and .Values.gatewayApi.enabled (not .Values.gatewayApi.parentRefs) }}
{{- $errors = append $errors "gatewayApi.enabled: needs gatewayApi.parentRefs, the Gateway the GRPCRoute attaches to" }}
{{- end }}
{{- if and .Values.ingress.enabled .Values.tls.existingSecret (eq (index .Values.ingress.annotations "nginx.ingress.kubernetes.io/backend-protocol" | default "") "GRPC") }}
{{- $errors = append $errors "ingress.annotations: the services serve TLS (tls.existingSecret); set nginx.ingress.kubernetes.io/backend-protocol to GRPCS (or null for another controller)" }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\ninvalid values:\n- %s" (join "\n- " $errors)) }}
{{- end }}
{{- end }}

{{/* One tenant's quota values (camelCase) as the config's snake_case keys, in one JSON line. */}}
{{- define "customdiff.quota" -}}
{{- $out := dict }}
{{- range $key, $value := . }}
{{- $_ := set $out ($key | snakecase) (int64 $value) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The pod template's metadata of component .component: the chart's labels, then podLabels, then
     the selector labels again, so that podLabels cannot change what the Deployment, its Service,
     PDB and network policies select (validateValues names any such key); podAnnotations, then
     .annotations (the checksums), which they cannot override. */}}
{{- define "customdiff.podMetadata" -}}
{{- $values := index .ctx.Values .component }}
{{- $labels := mergeOverwrite (fromYaml (include "customdiff.labels" .)) (deepCopy $values.podLabels) (fromYaml (include "customdiff.selectorLabels" .)) }}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with mergeOverwrite (deepCopy $values.podAnnotations) (default (dict) .annotations) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Where and how component .component's pod runs. A topology spread constraint without a
     labelSelector counts this component's pods (without one it would count none). */}}
{{- define "customdiff.podScheduling" -}}
{{- $values := index .ctx.Values .component }}
{{- with $values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $own := dict "matchLabels" (fromYaml (include "customdiff.selectorLabels" .)) }}
{{- $constraints := list }}
{{- range $values.topologySpreadConstraints }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" $own }}
{{- end }}
{{- $constraints = append $constraints $constraint }}
{{- end }}
{{- with $constraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The envFrom of component .component's main container: store.envFromSecret, then extraEnvFrom. */}}
{{- define "customdiff.envFrom" -}}
{{- $sources := list }}
{{- with .ctx.Values.store.envFromSecret }}
{{- $sources = append $sources (dict "secretRef" (dict "name" .)) }}
{{- end }}
{{- with concat $sources (index .ctx.Values .component).extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The gRPC services clients call from outside the cluster and the component serving each, for the
     Ingress and the GRPCRoute. ConceptService is on every server; the inference front, which scales
     out, takes it. Health and reflection answer per server, so they stay inside the cluster. */}}
{{- define "customdiff.grpcRoutes" -}}
- {service: customdiffusion.v1.TrainerService, component: trainer}
- {service: customdiffusion.v1.MergerService, component: merger}
- {service: customdiffusion.v1.InferenceService, component: inference}
- {service: customdiffusion.v1.ConceptService, component: inference}
{{- end }}
