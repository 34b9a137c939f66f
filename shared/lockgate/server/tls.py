"""Server TLS for lockgate's own listeners (the gRPC API, the OTLP receiver) from one certificate and
key in the settings (`grpc_tls_cert`, `grpc_tls_key`): both or neither; plaintext when neither."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from lockgate.config import Settings
from lockgate.errors import ConfigError


def _pair(settings: Settings) -> tuple[bytes, bytes] | None:
    if bool(settings.grpc_tls_cert) != bool(settings.grpc_tls_key):
        raise ConfigError("TLS needs both grpc_tls_cert and grpc_tls_key (PEM files)")
    if not settings.grpc_tls_cert:
        return None
    try:
        return Path(settings.grpc_tls_key).read_bytes(), Path(settings.grpc_tls_cert).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS certificate or key: {exc}") from None


def grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """gRPC server credentials, or None for plaintext."""
    pair = _pair(settings)
    return None if pair is None else grpc.ssl_server_credentials([pair])


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """An HTTPS server context, or None for plaintext."""
    if _pair(settings) is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.grpc_tls_cert, settings.grpc_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate and key: {exc}") from None
    return context
