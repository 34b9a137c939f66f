"""A connection attempt never outlives its task's cancellation (probe p11: `lockgate serve` whose NATS never
answered ignored SIGINT and SIGTERM). On Python 3.11, `asyncio.wait_for`, nats-py's connect timeout, answers a
cancellation that comes as the attempt fails with the attempt's own error, and nats-py's retry loop took it for one
more refused attempt and retried for ever."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lockgate import natsclient


@pytest.mark.timeout(30)
async def test_a_cancellation_that_comes_as_an_attempt_fails_ends_the_connect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = 0
    connecting: asyncio.Future[Any] | None = None

    async def refused(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        assert connecting is not None
        # The signal's cancellation arrives while this attempt fails: wait_for sees the attempt done and returns
        # its error instead of the CancelledError.
        connecting.cancel()
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(asyncio, "open_connection", refused)  # what nats-py's TCP transport calls
    connecting = asyncio.ensure_future(natsclient.connect(
        "nats://127.0.0.1:4222", max_reconnect_attempts=-1, reconnect_time_wait=0.01, allow_reconnect=True))
    try:
        await asyncio.wait({connecting}, timeout=5)
        assert connecting.cancelled(), f"still connecting after {attempts} attempts: the cancellation was lost"
        assert attempts == 1
    finally:
        connecting.cancel()  # a lost cancellation leaves the retry loop running: the next one ends it at its sleep
        await asyncio.wait({connecting}, timeout=5)
