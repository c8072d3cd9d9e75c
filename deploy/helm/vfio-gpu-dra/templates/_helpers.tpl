{{/* The namespace of the namespaced objects. */}}
{{- define "vfio-gpu-dra.namespace" -}}
{{- required "namespace.name is required" .Values.namespace.name -}}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is set (it wins). */}}
{{- define "vfio-gpu-dra.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" $img.digest) -}}
{{- fail (printf "image.digest %q: expected sha256:<hex>" $img.digest) -}}
{{- end -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (required "image.tag or image.digest is required" $img.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* The kubelet root directory, without a trailing slash. */}}
{{- define "vfio-gpu-dra.kubeletRoot" -}}
{{- $root := trimSuffix "/" (required "kubeletRootDir is required" .Values.kubeletRootDir) -}}
{{- if not (hasPrefix "/" $root) -}}
{{- fail (printf "kubeletRootDir %q: expected an absolute path" .Values.kubeletRootDir) -}}
{{- end -}}
{{- $root -}}
{{- end -}}

{{/* "host:port" for serve --metrics-addr. */}}
{{- define "vfio-gpu-dra.metricsAddr" -}}
{{- printf "%s:%v" .Values.metrics.address .Values.metrics.port -}}
{{- end -}}
