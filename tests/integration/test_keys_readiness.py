"""A router, gRPC gateway and OTLP receiver whose key store holds no key (a pod of deploy/k8s without the key store
mounted) are not ready: the router's `/healthz` and the process's `/readyz` answer 503 naming the file and what to do,
and every request is still refused (401); once a key is in the file they are ready, without a restart.

Before (probe p86 F1), such a router said `{"status": "ok", "ready": true}` at `/healthz`, so the readiness probe
admitted it, and it answered 401 `invalid_api_key` to every key.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lockgate.config import Settings
from lockgate.server.apikeys import KeyStore
from lockgate.server.runtime import Runtime

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _get(http: aiohttp.ClientSession, url: str, key: str = "") -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_a_router_gateway_and_otlp_receiver_without_keys_are_not_ready_until_a_key_file_appears(
        settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "pod-home"  # a pod's own home: no apikeys.json
    s = settings.replace(home=str(home), health_port=_free_port())
    runtime = Runtime(s, services=["router", "gateway", "otlp"], embedded_nats=False)
    await runtime.start()
    try:
        path = home / "apikeys.json"
        healthz, readyz = runtime.endpoints["router"] + "/healthz", runtime.health_url + "/readyz"
        async with aiohttp.ClientSession() as http:
            code, body = await _get(http, healthz)
            assert (code, body["ready"]) == (503, False), body
            assert body["problems"] == [f"no API keys in {path}: create one with `lockgate keys create`, or mount "
                                        "the key store there (LOCKGATE_API_KEYS_FILE names another file)"], body
            code, body = await _get(http, readyz)
            assert code == 503 and body["status"] == "not ready", body
            assert sorted(p.partition(":")[0] for p in body["problems"]) == ["gateway", "otlp", "router"], body
            # Said once at start, by each service that checks keys.
            said = [r.name for r in caplog.records if f"no API keys in {path}" in r.getMessage()]
            assert sorted(said) == ["lockgate.gateway", "lockgate.otlp", "lockgate.router"], said
            # Still refused, as before.
            code, body = await _get(http, runtime.endpoints["router"] + "/v1/models", "lg-anything")
            assert (code, body["error"]["code"]) == (401, "invalid_api_key"), body

            plain, _ = KeyStore(home).create("acme", "shop")  # what `lockgate keys create` writes
            code, body = await _get(http, healthz)
            assert (code, body["ready"], body["problems"]) == (200, True, []), body
            code, body = await _get(http, readyz)
            assert (code, body["problems"]) == (200, []), body
            code, _ = await _get(http, runtime.endpoints["router"] + "/v1/models", plain)
            assert code == 200
    finally:
        await runtime.stop()
