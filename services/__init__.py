"""The six lockgate services and the sink. Each imports only `lockgate`, never another service."""
