{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "devmig.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the prefix of every object. Kept short enough that
"<fullname>-operator-metrics" still fits a Service name (63). */}}
{{- define "devmig.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "devmig.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "devmig.labels" -}}
helm.sh/chart: {{ include "devmig.chart" . }}
app.kubernetes.io/name: {{ include "devmig.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: devmig
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "operator"). */}}
{{- define "devmig.selectorLabels" -}}
app.kubernetes.io/name: {{ include "devmig.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "devmig.componentLabels" -}}
{{ include "devmig.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "devmig.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "devmig.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "devmig.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "devmig.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (printf "%s-agent" (include "devmig.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The headless Service of the agents; its DNS name is the name in the
agents' certificate that the operator and peer agents verify. */}}
{{- define "devmig.agent.serviceName" -}}
{{- printf "%s-agent" (include "devmig.fullname" .) -}}
{{- end -}}

{{- define "devmig.agent.tlsServerName" -}}
{{- printf "%s.%s.svc" (include "devmig.agent.serviceName" .) .Release.Namespace -}}
{{- end -}}

{{- define "devmig.leaderLease" -}}
{{- default (printf "%s-operator-leader" (include "devmig.fullname" .)) .Values.operator.leaderElection.leaseName -}}
{{- end -}}

{{/* TLS Secret names; the same whether the chart or cert-manager fills them. */}}
{{- define "devmig.tls.caSecret" -}}{{ include "devmig.fullname" . }}-ca{{- end -}}
{{- define "devmig.tls.operatorSecret" -}}{{ include "devmig.fullname" . }}-operator-tls{{- end -}}
{{- define "devmig.tls.agentSecret" -}}{{ include "devmig.fullname" . }}-agent-tls{{- end -}}

{{- define "devmig.podSecurityContext" -}}
seccompProfile:
  type: RuntimeDefault
{{- end -}}
