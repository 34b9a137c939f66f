"""The server side: the runtime that hosts services, the service base and the service registry."""
