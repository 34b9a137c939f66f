"""OTLP receiver: OpenTelemetry spans in (gRPC and HTTP), `otel_traces` rows and inference events out."""
