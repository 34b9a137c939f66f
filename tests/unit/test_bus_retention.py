"""What the bus does with a stream a server will not change to interest retention (nats-server before 2.10)."""

from __future__ import annotations

import logging

import nats.js.errors
import pytest
from nats.js.api import RetentionPolicy, StreamConfig

from lockgate.bus import Bus, stream_full


class _OldServer:
    """Refuses a change of retention, as nats-server 2.9 does; records the configs it accepted."""

    def __init__(self) -> None:
        self.accepted: list[StreamConfig] = []

    async def update_stream(self, config: StreamConfig) -> None:
        if config.retention == RetentionPolicy.INTEREST:
            raise nats.js.errors.BadRequestError(code=400, err_code=10052,
                                                 description="stream configuration update can not change retention")
        self.accepted.append(config)


async def test_a_stream_the_server_keeps_under_limits_is_kept_with_a_warning_naming_the_migration(
        caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus("nats://127.0.0.1:1")
    bus.js = server = _OldServer()
    cfg = StreamConfig(name="LG_INFERENCE", subjects=["lg.inference.>"], retention=RetentionPolicy.INTEREST)
    with caplog.at_level(logging.WARNING, logger="lockgate.bus"):
        await bus._update_stream(cfg)
    # Its other settings still applied; not recreated, which would drop the events not consumed yet.
    assert [c.retention for c in server.accepted] == [RetentionPolicy.LIMITS]
    assert "nats stream rm LG_INFERENCE" in caplog.text and "limits retention" in caplog.text


def test_a_stream_is_full_when_less_than_one_large_message_fits() -> None:
    gib = 1 << 30
    assert stream_full(2 * gib - 91, 2 * gib, 1 << 20)  # the probe's stream: 91 bytes free
    assert not stream_full(gib, 2 * gib, 1 << 20)
    assert stream_full(60_000, 65_536, 1 << 20) and not stream_full(50_000, 65_536, 1 << 20)
