"""Server TLS for lockgate's own listeners (the gRPC API, the OTLP receiver) from one certificate and
key in the settings (`grpc_tls_cert`, `grpc_tls_key`): both or neither; plaintext when neither."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from pathlib import Path

import grpc

from lockgate.config import Settings
from lockgate.errors import ConfigError

log = logging.getLogger("lockgate.tls")


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


def bind_grpc(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Bind a gRPC server to host:port, with TLS when `credentials` are given; the port bound, 0 if none.

    The one plaintext listener in lockgate: only without a certificate, on 127.0.0.1 unless the
    operator asks for another host (said in the log), and every call still needs an API key."""
    address = f"{host}:{port}"
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        if not _loopback(host):
            log.warning("gRPC on %s without TLS: set grpc_tls_cert and grpc_tls_key to encrypt it", address)
        return server.add_insecure_port(address)
    except RuntimeError:  # grpc raises it when the port is taken
        return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
