"""Query service: answers named read-only queries over NATS request/reply; with the sink, the only
process that opens ClickHouse."""
