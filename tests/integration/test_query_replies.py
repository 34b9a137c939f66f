"""The query service answers a requester's inbox only, on a real nats-server with the real permissions.

A request names its reply subject, and every stack role may ask queries. Before, the query service answered whatever
subject the requester named (nats-server's `allow_responses` let it): a NATS viewer aiming its request at
`$KV.<routes>.<deployment>` had the answer (`{"rows": [...]}`) stored as that deployment's route, and its chat then
answered 503 `route_unreadable`; aimed at the router's served subject, the answer was stored in the inference stream
that only the router publishes to (canary evidence)."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

from lockgate.queryclient import NoQueryService, ask
from lockgate.retry import RetryPolicy
from lockgate.server.service import ServiceContext
from lockgate.services.query.app import QueryService
from lockgate.services.router.domain import Route, Target
from lockgate.services.router.rollouts import _route_decoder
from lockgate.store import Store
from lockgate.subjects import token
from lockgate.telemetry import Telemetry
from tests.integration.test_nats_auth import _bus, secured  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(60)

REQUEST = b'{"query": "dead_letter_counts", "args": {}}'


async def _stored(admin: Any, stream: str, subject: str) -> int:
    info = await admin.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_a_viewer_cannot_have_the_query_service_answer_onto_a_kv_key_or_a_stream(
        secured: Any, store: Store, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    _, settings, admin = secured
    s = admin.subjects
    routes = await admin.kv(s.kv_routes)
    key, unset = token("shop-web"), token("other-dep")
    route = msgspec.json.encode(Route(deployment="shop-web", stable=Target(release="shop-v1")))
    revision = await routes.put(key, route)
    inference = s.streams["inference"].name
    served = s.served("shop", "acme")  # the router's alone: canary evidence
    query_bus, viewer = await _bus(settings, "query"), await _bus(settings, "viewer")
    service = QueryService(ServiceContext(bus=query_bus, store=store, telemetry=Telemetry(), settings=settings))
    await service.start()
    await query_bus.nc.flush()  # its subscription is the server's before anyone asks
    assert service.handlers is not None
    try:
        # The service answers the viewer before the stray requests: what follows is judged on a service that is there.
        await RetryPolicy(attempts=5).call(lambda: ask(viewer, "dead_letter_counts"), retry_on=NoQueryService,
                                           what="the query service's first answer")
        with caplog.at_level(logging.WARNING, logger="lockgate.query"):
            for target in (f"$KV.{s.kv_routes}.{key}", served, f"$KV.{s.kv_routes}.{unset}"):
                await viewer.nc.publish(s.query_cli, REQUEST, reply=target)
            # An ordinary request after them on the same connection, answered on the viewer's own inbox once they
            # were handled (the subscription's messages are handled one after the other).
            assert await ask(viewer, "dead_letter_counts") == []
        # Whatever the query service published before its answer is stored by the time a later publish on the same
        # stream is acknowledged (JetStream stores one stream's messages in order).
        await routes.put(token("barrier"), b"{}")
        await admin.js.publish(s.inference("shop", "acme"), b"{}")
        entry = await routes.get(key)
        assert (entry.revision, entry.value) == (revision, route)
        assert _route_decoder.decode(entry.value).stable.release == "shop-v1"  # still the router's to read
        with pytest.raises(KeyNotFoundError):
            await routes.get(unset)
        assert await _stored(admin, inference, served) == 0
        assert service.handlers.refused.count == 3
        refusals = [r.getMessage() for r in caplog.records if "not a requester's inbox" in r.getMessage()]
        assert len(refusals) == 1 and f"$KV.{s.kv_routes}.{key}" in refusals[0], refusals  # once, not a flood
    finally:
        await service.stop()
        await viewer.close()
        await query_bus.close()
