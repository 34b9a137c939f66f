"""Sink: persists inference events, spans and dead letters into ClickHouse."""
