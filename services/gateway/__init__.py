"""gRPC gateway: ingest inference events, read and follow gate decisions (a thin edge over the bus)."""
