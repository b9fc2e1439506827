{{/* ------------------------------------------------------------------ names and labels */}}

{{- define "tdm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tdm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tdm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tdm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tdm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tdm.labels" -}}
helm.sh/chart: {{ include "tdm.chart" . }}
{{ include "tdm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tdm
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The ServiceAccount of a component (list root "distill"|"serve"|"mlflow"|"jobs"). */}}
{{- define "tdm.serviceAccountName" -}}
{{- $root := index . 0 -}}{{- $component := index . 1 -}}
{{- $sa := index $root.Values.serviceAccount $component -}}
{{- if $root.Values.serviceAccount.create -}}
{{- default (printf "%s-%s" (include "tdm.fullname" $root) $component | trunc 63 | trimSuffix "-") $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{/* KubeRay appends suffixes to RayJob/RayService names (RayCluster "<name>-<5 chars>",
     "<cluster>-head-svc", "<name>-serve-svc"), so it rejects names over 47 characters. */}}
{{- define "tdm.checkRayName" -}}
{{- $name := index . 0 -}}{{- $kind := index . 1 -}}{{- $value := index . 2 -}}
{{- if gt (len $name) 47 -}}
{{- fail (printf "%s name %q is %d characters; KubeRay allows at most 47: set %s, nameOverride or fullnameOverride shorter" $kind $name (len $name) $value) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "%s name %q is not a DNS-1035 label (lowercase letters, digits and '-', starting with a letter): set %s" $kind $name $value) -}}
{{- end -}}
{{- end -}}

{{- define "tdm.distill.jobName" -}}
{{- default (printf "%s-distill" (include "tdm.fullname" .)) .Values.distill.jobName -}}
{{- end -}}

{{- define "tdm.distill.runName" -}}
{{- default (include "tdm.distill.jobName" .) .Values.distill.runName -}}
{{- end -}}

{{- define "tdm.serve.name" -}}
{{- default (printf "%s-serve" (include "tdm.fullname" .)) .Values.serve.name -}}
{{- end -}}

{{- define "tdm.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "tdm.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tdm.runs.claimName" -}}
{{- default (printf "%s-runs" (include "tdm.fullname" .)) .Values.distill.storage.pvc.existingClaim -}}
{{- end -}}

{{/* ------------------------------------------------------------------ images */}}

{{- define "tdm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tdm.gpuImage" -}}
{{- printf "%s:%s" .Values.gpuImage.repository (default .Chart.AppVersion .Values.gpuImage.tag) -}}
{{- end -}}

{{- define "tdm.mlflow.image" -}}
{{- if .Values.mlflow.image.repository -}}
{{- printf "%s:%s" .Values.mlflow.image.repository (default .Chart.AppVersion .Values.mlflow.image.tag) -}}
{{- else -}}
{{- include "tdm.image" . -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ MLflow / S3 */}}

{{- define "tdm.mlflow.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc:%d" (include "tdm.mlflow.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- else -}}
{{- .Values.mlflow.externalUri -}}
{{- end -}}
{{- end -}}

{{/* The port of s3.endpointUrl, or "" when it has none. */}}
{{- define "tdm.s3.endpointPort" -}}
{{- if .Values.s3.endpointUrl -}}
{{- $host := (urlParse .Values.s3.endpointUrl).host -}}
{{- if contains ":" $host -}}{{- last (splitList ":" $host) -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/* NAME=the S3 endpoint: from the credentials Secret when endpointUrlKey is set, else s3.endpointUrl. */}}
{{- define "tdm.s3.endpointEnv" -}}
{{- $s3 := (index . 0).Values.s3 -}}
{{- if $s3.credentialsSecret.endpointUrlKey }}
- name: {{ index . 1 }}
  valueFrom:
    secretKeyRef:
      name: {{ $s3.credentialsSecret.name }}
      key: {{ $s3.credentialsSecret.endpointUrlKey }}
{{- else if $s3.endpointUrl }}
- name: {{ index . 1 }}
  value: {{ $s3.endpointUrl | quote }}
{{- end }}
{{- end -}}

{{/* AWS_* variables for pyarrow/boto3 (and MLflow's S3 client), the keys from s3.credentialsSecret.
     Credentials only by secretKeyRef. */}}
{{- define "tdm.s3.env" -}}
{{- include "tdm.s3.envWith" (list . .Values.s3.credentialsSecret) -}}
{{- end -}}

{{/* The same with the keys from another Secret (list root {name, accessKeyIdKey, secretAccessKeyKey}). */}}
{{- define "tdm.s3.envWith" -}}
{{- $root := index . 0 -}}{{- $secret := index . 1 -}}
- name: AWS_DEFAULT_REGION
  value: {{ $root.Values.s3.region | quote }}
{{- include "tdm.s3.endpointEnv" (list $root "AWS_ENDPOINT_URL") }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret.name }}
      key: {{ $secret.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret.name }}
      key: {{ $secret.secretAccessKeyKey }}
{{- end -}}

{{/* The Secret of the distill pods' S3 access: s3.checkpointsCredentialsSecret, else s3.credentialsSecret. */}}
{{- define "tdm.s3.checkpointsSecret" -}}
{{- $s3 := .Values.s3 -}}
{{- toJson (ternary $s3.checkpointsCredentialsSecret $s3.credentialsSecret (ne $s3.checkpointsCredentialsSecret.name "")) -}}
{{- end -}}

{{/* MLFLOW_TRACKING_USERNAME / _PASSWORD from mlflow.auth.<which> (list root "trainingSecret"|"servingSecret"),
     nothing when mlflow.auth.enabled is false. The MLflow client of tdm reads them. */}}
{{- define "tdm.mlflow.credentialsEnv" -}}
{{- $auth := (index . 0).Values.mlflow.auth -}}
{{- if $auth.enabled -}}
{{- $secret := index $auth (index . 1) }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $secret.name }}
      key: {{ $secret.usernameKey }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret.name }}
      key: {{ $secret.passwordKey }}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ network policy */}}

{{/* The NetworkPolicyPeers admitted to the serve port (networkPolicy.serve, allowAll aside), a YAML list;
     none renders no rule at all (a rule with an empty `from` would admit everyone). */}}
{{- define "tdm.networkPolicy.serveFrom" -}}
{{- $n := .Values.networkPolicy.serve -}}
{{- $peers := list -}}
{{- if $n.sameNamespace -}}
{{- $peers = append $peers (dict "podSelector" dict) -}}
{{- end -}}
{{- $ic := $n.ingressController -}}
{{- if $ic.enabled -}}
{{- $peers = append $peers (dict "namespaceSelector" (default dict $ic.namespaceSelector) "podSelector" (default dict $ic.podSelector)) -}}
{{- end -}}
{{- $peers = concat $peers (default list $n.extraFrom) -}}
{{- toYaml $peers -}}
{{- end -}}

{{/* ------------------------------------------------------------------ security */}}

{{- define "tdm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.securityContext.runAsUser }}
runAsGroup: {{ int .Values.securityContext.runAsGroup }}
fsGroup: {{ int .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tdm.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.securityContext.runAsUser }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* ------------------------------------------------------------------ writable space */}}

{{/* Every container's root filesystem is read-only. What may be written goes to emptyDirs of a set
     size (the components' `scratch` values): /tmp in every pod, and TDM_HOME in the Ray pods. */}}
{{- define "tdm.tmpDir" -}}/tmp{{- end -}}
{{- define "tdm.tdmHome" -}}/var/lib/tdm{{- end -}}

{{/* Env of a container with a read-only root filesystem: HOME and every cache a library keeps under it
     (XDG, matplotlib; pip, torch and triton follow HOME/XDG_CACHE_HOME) go to the /tmp emptyDir.
     TMPDIR=/tmp keeps Ray's temp dir at /tmp/ray ($RAY_TMPDIR, else $TMPDIR, else /tmp; + /ray), so the
     one /tmp emptyDir holds Ray's sessions, logs and spilled objects too. */}}
{{- define "tdm.scratchEnv" -}}
- {name: HOME, value: {{ include "tdm.tmpDir" . }}}
- {name: TMPDIR, value: {{ include "tdm.tmpDir" . }}}
- {name: XDG_CACHE_HOME, value: {{ include "tdm.tmpDir" . }}/.cache}
- {name: XDG_CONFIG_HOME, value: {{ include "tdm.tmpDir" . }}/.config}
- {name: MPLCONFIGDIR, value: {{ include "tdm.tmpDir" . }}/matplotlib}
- {name: PYTHONDONTWRITEBYTECODE, value: "1"}
{{- end -}}

{{/* TDM_HOME (tdm's caches: downloads, the model cache, text embeddings) on its own emptyDir, and the
     Hugging Face cache (hub teachers, CLIP models, decoders) under it rather than in /tmp. */}}
{{- define "tdm.tdmHomeEnv" -}}
- {name: TDM_HOME, value: {{ include "tdm.tdmHome" . }}}
- {name: HF_HOME, value: {{ include "tdm.tdmHome" . }}/cache/huggingface}
{{- end -}}

{{/* The /tmp emptyDir of a pod (argument: its sizeLimit), one flow-style volume. */}}
{{- define "tdm.tmpVolume" -}}
{name: tmp, emptyDir: {sizeLimit: {{ . }}}}
{{- end -}}

{{/* ------------------------------------------------------------------ distill command line */}}

{{/* A shell word: bare when it is made of safe characters, else single-quoted. */}}
{{- define "tdm.shellword" -}}
{{- $s := toString . -}}
{{- if regexMatch "^[A-Za-z0-9_./:@%+=,-]+$" $s -}}
{{- $s -}}
{{- else -}}
{{- printf "'%s'" (replace "'" "'\"'\"'" $s) -}}
{{- end -}}
{{- end -}}

{{/* A flag value: lists become a,b,c; numbers and booleans their plain form. */}}
{{- define "tdm.flagValue" -}}
{{- if kindIs "slice" . -}}
{{- $parts := list -}}
{{- range . }}{{- $parts = append $parts (include "tdm.flagValue" .) -}}{{- end -}}
{{- join "," $parts -}}
{{- else if kindIs "float64" . -}}
{{- if eq . (floor .) -}}{{- printf "%d" (int64 .) -}}{{- else -}}{{- toString . -}}{{- end -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{- define "tdm.distill.storagePath" -}}
{{- $st := .Values.distill.storage -}}
{{- if eq $st.type "s3" -}}
{{- printf "s3://%s/%s" .Values.s3.bucket (trimAll "/" $st.s3Prefix) | trimSuffix "/" -}}
{{- else -}}
{{- printf "%s/runs" (trimSuffix "/" $st.pvc.mountPath) -}}
{{- end -}}
{{- end -}}

{{/* [[flag, value], ...] of pipelines/distill.py, in a fixed order. */}}
{{- define "tdm.distill.flags" -}}
{{- $d := .Values.distill -}}
{{- $f := list -}}
{{- $f = append $f (list "name" (include "tdm.distill.runName" .)) -}}
{{- if $d.preset -}}
{{- $f = append $f (list "preset" $d.preset) -}}
{{- end -}}
{{- $f = append $f (list "teacher.uri" $d.teacher.uri) -}}
{{- range $k := list "frames" "height" "width" "fps" -}}
{{- if not (kindIs "invalid" (index $d.video $k)) -}}
{{- $f = append $f (list (printf "video.%s" $k) (index $d.video $k)) -}}
{{- end -}}
{{- end -}}
{{- if $d.prompts.source -}}
{{- $f = append $f (list "data.prompt_source" $d.prompts.source) -}}
{{- $f = append $f (list "data.prompt_column" $d.prompts.column) -}}
{{- end -}}
{{- if not (kindIs "invalid" $d.prompts.maxPrompts) -}}
{{- $f = append $f (list "data.max_prompts" $d.prompts.maxPrompts) -}}
{{- end -}}
{{- $f = append $f (list "student.finetune" $d.student.finetune) -}}
{{- $f = append $f (list "student.num_steps" $d.student.numSteps) -}}
{{- if $d.student.stepSet -}}
{{- $f = append $f (list "student.step_set" $d.student.stepSet) -}}
{{- end -}}
{{- if not (kindIs "invalid" $d.loss.guidanceScale) -}}
{{- $f = append $f (list "loss.guidance_scale" $d.loss.guidanceScale) -}}
{{- end -}}
{{- $t := $d.train -}}
{{- $f = append $f (list "train.max_steps" $t.maxSteps) -}}
{{- $f = append $f (list "train.batch_size" $t.batchSize) -}}
{{- $f = append $f (list "train.grad_accum_steps" $t.gradAccumSteps) -}}
{{- $f = append $f (list "train.num_workers" $t.numWorkers) -}}
{{- $f = append $f (list "train.use_gpu" $t.useGpu) -}}
{{- $f = append $f (list "train.mixed_precision" $t.mixedPrecision) -}}
{{- $f = append $f (list "train.gradient_checkpointing" $t.gradientCheckpointing) -}}
{{- $f = append $f (list "train.gradient_checkpointing_every" $t.gradientCheckpointingEvery) -}}
{{- $f = append $f (list "train.strategy" $t.strategy) -}}
{{- $f = append $f (list "train.fsdp_cpu_offload" $t.fsdpCpuOffload) -}}
{{- $f = append $f (list "train.placement_strategy" $t.placementStrategy) -}}
{{- if not (kindIs "invalid" $t.gpuMemoryGb) -}}
{{- $f = append $f (list "train.gpu_memory_gb" $t.gpuMemoryGb) -}}
{{- end -}}
{{- if not (kindIs "invalid" $t.cpusPerWorker) -}}
{{- $f = append $f (list "train.cpus_per_worker" $t.cpusPerWorker) -}}
{{- end -}}
{{- $f = append $f (list "train.max_failures" $t.maxFailures) -}}
{{- $f = append $f (list "train.checkpoint_every" $t.checkpointEvery) -}}
{{- $f = append $f (list "train.keep_checkpoints" $t.keepCheckpoints) -}}
{{- $f = append $f (list "train.storage_path" (include "tdm.distill.storagePath" .)) -}}
{{- $f = append $f (list "eval.enabled" $d.eval.enabled) -}}
{{- if $d.eval.clipModel -}}
{{- $f = append $f (list "eval.clip_model" $d.eval.clipModel) -}}
{{- end -}}
{{- $f = append $f (list "registry.experiment" $d.registry.experiment) -}}
{{- $f = append $f (list "registry.model_name" $d.registry.modelName) -}}
{{- $f = append $f (list "registry.alias" $d.registry.alias) -}}
{{- range $k := keys $d.extraArgs | sortAlpha -}}
{{- $f = append $f (list $k (index $d.extraArgs $k)) -}}
{{- end -}}
{{- toJson $f -}}
{{- end -}}

{{- define "tdm.distill.entrypoint" -}}
{{- $words := list "python" "pipelines/distill.py" -}}
{{- range $pair := include "tdm.distill.flags" . | fromJsonArray -}}
{{- $words = append $words (printf "--%s" (index $pair 0)) -}}
{{- $words = append $words (include "tdm.shellword" (include "tdm.flagValue" (index $pair 1))) -}}
{{- end -}}
{{- join " " $words -}}
{{- end -}}

{{/* ------------------------------------------------------------------ serve config */}}

{{/* Where the serve pods mount serve.auth.existingSecret, and the file (its key secretKey) tdm reads. */}}
{{- define "tdm.serve.apiKeysDir" -}}/etc/tdm/api-keys{{- end -}}
{{- define "tdm.serve.apiKeysFile" -}}{{ include "tdm.serve.apiKeysDir" . }}/keys{{- end -}}

{{/* The Serve config of serveConfigV2: the structure tdm.serve.serve_config(args, name, route_prefix,
     working_dir) builds, plus applications[0].deployments for autoscaling. */}}
{{- define "tdm.serve.config" -}}
{{- $s := .Values.serve -}}
{{- $factors := list -}}
{{- range $s.upscaleFactors }}{{- $factors = append $factors (int .) -}}{{- end -}}
{{- $args := dict
    "model_uri" (printf "models:/%s@%s" $s.modelName $s.modelAlias)
    "tracking_uri" (include "tdm.mlflow.trackingUri" .)
    "poll_interval_s" $s.pollIntervalS
    "max_batch_size" (int $s.maxBatchSize)
    "batch_wait_timeout_s" $s.batchWaitTimeoutS
    "max_images_per_request" (int $s.maxImagesPerRequest)
    "max_prompt_chars" (int $s.maxPromptChars)
    "max_body_bytes" (int $s.maxBodyBytes)
    "request_timeout_s" $s.requestTimeoutS
    "body_timeout_s" $s.bodyTimeoutS
    "batch_invariant" $s.batchInvariant
    "dtype" $s.dtype
    "model_cache_versions" (int $s.modelCacheVersions)
    "enable_docs" $s.enableDocs
    "load_retry_initial_s" $s.loadRetry.initialS
    "load_retry_max_s" $s.loadRetry.maxS
    "upscale_factors" $factors
    "num_gpus" $s.gpusPerReplica
    "num_cpus" $s.cpusPerReplica
    "max_queued_requests" (int $s.maxQueuedRequests) -}}
{{- if $s.auth.existingSecret -}}
{{- $_ := set $args "api_keys_file" (include "tdm.serve.apiKeysFile" .) -}}
{{- $_ := set $args "require_api_key" true -}}
{{- end -}}
{{- if not $s.autoscaling.enabled -}}
{{- $_ := set $args "num_replicas" (int $s.numReplicas) -}}
{{- end -}}
{{- if $s.decoder -}}
{{- $_ := set $args "decoder" $s.decoder -}}
{{- end -}}
{{- if $s.videoStore.uri -}}
{{- $_ := set $args "video_store" $s.videoStore.uri -}}
{{- end -}}
{{- $_ := set $args "video_store_max_jobs" (int $s.videoStore.maxJobs) -}}
{{- $_ := set $args "video_store_ttl_s" $s.videoStore.ttlS -}}
{{- $_ := set $args "video_job_timeout_s" $s.videoStore.jobTimeoutS -}}
{{- $app := dict "name" $s.appName "route_prefix" $s.routePrefix "import_path" "tdm.serve:build_app" "args" $args -}}
{{- if $s.workingDir -}}
{{- $_ := set $app "runtime_env" (dict "working_dir" $s.workingDir) -}}
{{- end -}}
{{- if $s.autoscaling.enabled -}}
{{- $a := $s.autoscaling -}}
{{- $_ := set $app "deployments" (list (dict "name" "TDMGenerator" "autoscaling_config" (dict
      "min_replicas" (int $a.minReplicas)
      "max_replicas" (int $a.maxReplicas)
      "target_ongoing_requests" $a.targetOngoingRequests))) -}}
{{- end -}}
{{- toYaml (dict "applications" (list $app)) -}}
{{- end -}}

{{/* ------------------------------------------------------------------ Ray cluster spec */}}

{{/* A RayClusterSpec. Arguments (dict):
     root       the top-level context
     component  "distill" or "serve" (pod label app.kubernetes.io/component: ray-<component>)
     cfg        .Values.distill or .Values.serve (head, workers, env)
     gpus       GPUs per worker pod (0 = CPU)
     replicas, minReplicas, maxReplicas   of the worker group
     autoscaling  KubeRay in-tree autoscaler (then autoscalerResources: its sidecar's resources)
     env        extra EnvVar list for every Ray container
     volumes, volumeMounts  extra ones for every Ray pod
     ports      extra container ports (list of ContainerPort) for every Ray container
     workerReadinessProbe  a readinessProbe for the worker containers, or nil for KubeRay's own
     Every Ray pod runs as the component's ServiceAccount, with /tmp and TDM_HOME emptyDirs sized by
     cfg.scratch (the root filesystem is read-only). */}}
{{- define "tdm.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $cfg := .cfg -}}
{{- $gpus := .gpus -}}
{{- $image := ternary (include "tdm.gpuImage" $root) (include "tdm.image" $root) (gt (float64 $gpus) 0.0) -}}
{{- $labels := merge (dict "app.kubernetes.io/component" (printf "ray-%s" .component)) (fromYaml (include "tdm.selectorLabels" $root)) -}}
{{- $tmp := include "tdm.tmpDir" $root -}}
{{- $volumes := concat (list
      (dict "name" "dshm" "emptyDir" (dict "medium" "Memory" "sizeLimit" $root.Values.ray.shmSize))
      (dict "name" "tmp" "emptyDir" (dict "sizeLimit" $cfg.scratch.tmp))
      (dict "name" "tdm-home" "emptyDir" (dict "sizeLimit" $cfg.scratch.tdmHome))) .volumes -}}
{{- $mounts := concat (list
      (dict "name" "dshm" "mountPath" "/dev/shm")
      (dict "name" "tmp" "mountPath" $tmp)
      (dict "name" "tdm-home" "mountPath" (include "tdm.tdmHome" $root))) .volumeMounts -}}
{{- /* With the autoscaler, KubeRay shares Ray's log dir /tmp/ray between the head and its sidecar: unless
       the head container already mounts something there, it adds an emptyDir "ray-logs" of no size limit
       at /tmp/ray to both. Mounting the "ray" directory of the /tmp emptyDir there (and in the sidecar,
       autoscalerOptions.volumeMounts) keeps one sized volume: the same files as /tmp/ray without it. */ -}}
{{- $rayLogs := dict "name" "tmp" "mountPath" (printf "%s/ray" $tmp) "subPath" "ray" -}}
{{- $headMounts := ternary (append $mounts $rayLogs) $mounts (eq (toString .autoscaling) "true") -}}
{{- $env := concat (fromYamlArray (include "tdm.scratchEnv" $root)) (fromYamlArray (include "tdm.tdmHomeEnv" $root)) .env $cfg.env -}}
{{- $sa := include "tdm.serviceAccountName" (list $root .component) -}}
{{- $workerResources := deepCopy (default dict $cfg.workers.resources) -}}
{{- $nodeSelector := $cfg.workers.nodeSelector -}}
{{- $tolerations := $cfg.workers.tolerations -}}
{{- if gt (float64 $gpus) 0.0 -}}
{{- $gpuKey := $root.Values.ray.gpuResourceName -}}
{{- $limits := deepCopy (default dict $workerResources.limits) -}}
{{- $requests := deepCopy (default dict $workerResources.requests) -}}
{{- $_ := set $limits $gpuKey (int (ceil $gpus)) -}}
{{- $_ := set $requests $gpuKey (int (ceil $gpus)) -}}
{{- $_ := set $workerResources "limits" $limits -}}
{{- $_ := set $workerResources "requests" $requests -}}
{{- $nodeSelector = merge (deepCopy $cfg.workers.gpuNodeSelector) $cfg.workers.nodeSelector -}}
{{- $tolerations = concat $cfg.workers.tolerations $cfg.workers.gpuTolerations -}}
{{- end -}}
rayVersion: {{ $root.Values.ray.version | quote }}
{{- with $root.Values.ray.authMode }}
authOptions:
  mode: {{ . }}
{{- end }}
enableInTreeAutoscaling: {{ .autoscaling }}
{{- if .autoscaling }}
autoscalerOptions:
  upscalingMode: Default
  idleTimeoutSeconds: {{ int .idleTimeoutSeconds }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  securityContext:
    {{- include "tdm.containerSecurityContext" $root | nindent 4 }}
  env:
    {{- include "tdm.scratchEnv" $root | nindent 4 }}
  volumeMounts:
    - {name: tmp, mountPath: {{ $tmp }}}
    {{- toYaml (list $rayLogs) | nindent 4 }}
  resources:
    {{- toYaml .autoscalerResources | nindent 4 }}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- range $k, $v := mergeOverwrite (dict "dashboard-host" "0.0.0.0" "num-cpus" "0") $cfg.head.rayStartParams }}
    {{ $k }}: {{ toString $v | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- toYaml $labels | nindent 8 }}
    spec:
      serviceAccountName: {{ $sa }}
      # The in-tree autoscaler sidecar needs the API token (KubeRay binds its Role to this
      # ServiceAccount); nothing else in the pod does.
      automountServiceAccountToken: {{ .autoscaling }}
      securityContext:
        {{- include "tdm.podSecurityContext" $root | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $cfg.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $cfg.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $cfg.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ $image }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          securityContext:
            {{- include "tdm.containerSecurityContext" $root | nindent 12 }}
          ports:
            - {containerPort: 6379, name: gcs-server}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
            - {containerPort: 8080, name: metrics}
            {{- with .ports }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with $env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $cfg.head.resources | nindent 12 }}
          # Probes: KubeRay injects its own (raylet and GCS health), and for the head readiness must stay
          # that: KubeRay sends the Serve config only once the head is ready.
          volumeMounts:
            {{- toYaml $headMounts | nindent 12 }}
      volumes:
        {{- toYaml $volumes | nindent 8 }}
workerGroupSpecs:
  - groupName: {{ ternary "gpu-workers" "cpu-workers" (gt (float64 $gpus) 0.0) }}
    replicas: {{ int .replicas }}
    minReplicas: {{ int .minReplicas }}
    maxReplicas: {{ int .maxReplicas }}
    {{- with $cfg.workers.rayStartParams }}
    rayStartParams:
      {{- range $k, $v := . }}
      {{ $k }}: {{ toString $v | quote }}
      {{- end }}
    {{- end }}
    template:
      metadata:
        labels:
          {{- toYaml $labels | nindent 10 }}
      spec:
        serviceAccountName: {{ $sa }}
        automountServiceAccountToken: false
        securityContext:
          {{- include "tdm.podSecurityContext" $root | nindent 10 }}
        {{- with $root.Values.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $cfg.workers.affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ $image }}
            imagePullPolicy: {{ $root.Values.image.pullPolicy }}
            securityContext:
              {{- include "tdm.containerSecurityContext" $root | nindent 14 }}
            ports:
              - {containerPort: 8080, name: metrics}
              {{- with .ports }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
            {{- with $env }}
            env:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            resources:
              {{- toYaml $workerResources | nindent 14 }}
            {{- with .workerReadinessProbe }}
            readinessProbe:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            volumeMounts:
              {{- toYaml $mounts | nindent 14 }}
        volumes:
          {{- toYaml $volumes | nindent 10 }}
{{- end -}}

{{/* ------------------------------------------------------------------ cross-field checks */}}

{{/* Rules the values schema cannot express. Each names the value to change. */}}
{{- define "tdm.validate" -}}
{{- $v := .Values -}}
{{- if $v.distill.enabled -}}
{{- include "tdm.checkRayName" (list (include "tdm.distill.jobName" .) "RayJob" "distill.jobName") -}}
{{- $t := $v.distill.train -}}
{{- if and $t.useGpu (not $v.gpuImage.repository) -}}
{{- fail "distill.train.useGpu is true but gpuImage.repository is empty: GPU workers need a CUDA build of the tdm image (set gpuImage.repository)" -}}
{{- end -}}
{{- if and (ne $t.mixedPrecision "no") (not $t.useGpu) -}}
{{- fail (printf "distill.train.mixedPrecision=%s needs distill.train.useGpu=true (CPU runs in fp32)" $t.mixedPrecision) -}}
{{- end -}}
{{- $split := mul (int $t.numWorkers) (int $t.gradAccumSteps) -}}
{{- if ne (mod (int $t.batchSize) $split) 0 -}}
{{- fail (printf "distill.train.batchSize (%d) must be divisible by distill.train.numWorkers x distill.train.gradAccumSteps (%d x %d)" (int $t.batchSize) (int $t.numWorkers) (int $t.gradAccumSteps)) -}}
{{- end -}}
{{- if and $v.distill.eval.enabled (not (has $v.distill.teacher.uri (list "toy" "toy-video"))) (not $v.distill.eval.clipModel) (not $v.distill.preset) -}}
{{- fail "distill.eval.clipModel is required to evaluate a non-toy teacher (a CLIP hub id or directory), or set distill.eval.enabled=false" -}}
{{- end -}}
{{- range $uri := list $v.distill.teacher.uri $v.distill.prompts.source $v.distill.eval.clipModel -}}
{{- if and (hasPrefix "s3://" $uri) (not $v.s3.credentialsSecret.name) -}}
{{- fail (printf "%s is on S3 but s3.credentialsSecret.name is empty: name the Secret with the S3 credentials" $uri) -}}
{{- end -}}
{{- end -}}
{{- range $k, $_ := $v.distill.extraArgs -}}
{{- if has $k (list "name" "train.storage_path" "train.ray_address") -}}
{{- fail (printf "distill.extraArgs.%s is set by the chart; use the dedicated value instead" $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.serve.enabled -}}
{{- include "tdm.checkRayName" (list (include "tdm.serve.name" .) "RayService" "serve.name") -}}
{{- if and (gt (float64 $v.serve.gpusPerReplica) 0.0) (not $v.gpuImage.repository) -}}
{{- fail (printf "serve.gpusPerReplica is %v but gpuImage.repository is empty: GPU workers need a CUDA build of the tdm image (set gpuImage.repository)" $v.serve.gpusPerReplica) -}}
{{- end -}}
{{- if hasPrefix "models:/" $v.serve.decoder -}}
{{- fail (printf "serve.decoder %s is a registered model; a decoder is a hub id, an s3:// prefix or a path holding an AutoencoderTiny or AutoencoderKL" $v.serve.decoder) -}}
{{- end -}}
{{- if and (hasPrefix "s3://" $v.serve.decoder) (not $v.s3.credentialsSecret.name) -}}
{{- fail (printf "serve.decoder %s is on S3 but s3.credentialsSecret.name is empty: name the Secret with the S3 credentials" $v.serve.decoder) -}}
{{- end -}}
{{- $a := $v.serve.autoscaling -}}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "serve.autoscaling.minReplicas (%d) must not exceed serve.autoscaling.maxReplicas (%d)" (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- end -}}
{{- $api := $v.networkPolicy.egress.kubernetesApi -}}
{{- if and $a.enabled $v.networkPolicy.enabled (not $api.cidrs) (not $api.extraTo) -}}
{{- fail "serve.autoscaling.enabled: the KubeRay autoscaler sidecar talks to the Kubernetes API, which the network policy denies until you name it: set networkPolicy.egress.kubernetesApi.cidrs to the API server's addresses (kubectl get endpoints kubernetes), or networkPolicy.enabled=false" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One egress rule to networkPolicy.egress.<target> (list root target extraPorts): `to` = its cidrs as
     ipBlocks plus its extraTo peers, on its ports (TCP) plus extraPorts. Nothing at all when the target
     names no destination: a rule without `to` would allow every destination. */}}
{{- define "tdm.networkPolicy.egressRule" -}}
{{- $root := index . 0 -}}
{{- $t := index $root.Values.networkPolicy.egress (index . 1) -}}
{{- $to := list -}}
{{- range $t.cidrs }}{{ $to = append $to (dict "ipBlock" (dict "cidr" .)) }}{{ end -}}
{{- $to = concat $to (default list $t.extraTo) -}}
{{- if $to -}}
{{- $nums := list -}}
{{- range (concat $t.ports (index . 2)) }}{{ $nums = append $nums (int .) }}{{ end -}}
{{- $ports := list -}}
{{- range ($nums | uniq) }}{{ $ports = append $ports (dict "port" . "protocol" "TCP") }}{{ end -}}
{{- toYaml (list (dict "to" $to "ports" $ports)) -}}
{{- end -}}
{{- end -}}
