"""Router replicas across a short nats-server restart (probe p19 F1): the server drops their routes watch (an
ephemeral consumer), which nats-py makes again only 10 to 20 s later. Back on the bus, each replica watches its
routes anew and reads them again at once, so a change another replica makes just after the restart reaches it
then. On a real nats-server with auth on, each replica as the router identity."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from lockgate.errors import Retryable
from lockgate.retry import RetryPolicy
from lockgate.server.natsserver import NatsServer
from lockgate.store import Store
from tests.helpers import admin_headers
from tests.integration.test_router_drift_replay import Stack, _rollout, own_server_stack

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def restartable(tmp_path: Path, unique: str, store: Store) -> AsyncIterator[tuple[Stack, NatsServer]]:
    """The drift-replay suite's stack on a nats-server of this test's own, which it restarts."""
    async with own_server_stack(tmp_path, unique, store) as pair:
        yield pair


async def test_a_change_made_just_after_a_bus_restart_reaches_the_other_replica_at_once(
        restartable: tuple[Stack, NatsServer]) -> None:
    # Before: router-a aborted the canary 0.2 s after nats-server came back; router-b, connected and "serving all",
    # kept the aborted canary at 50% for 15 s, until nats-py noticed the dead watch and made it again.
    stack, server = restartable
    a = await stack.replica("router-a")
    b = await stack.replica("router-b")
    await _rollout(stack, a)  # r2 at 50% against r1
    await b.rollouts.wait_for(lambda r: "chat" in r and r["chat"].weight == 50.0, timeout=10)
    caught_up = b.rollouts.caught_up.count

    server.kill()  # a crash; back at once on its port and store, well within router_cut_off_s
    await server.start()
    for name in ("router-a", "router-b"):
        await stack.named[name].wait_state("connected", timeout_s=20)
    async with aiohttp.ClientSession(headers=admin_headers(stack.settings.home)) as http:
        async with http.post(f"{a.url}/lockgate/v1/deployments/chat/abort") as resp:
            assert resp.status == 200, await resp.text()
    assert not b.rollouts.cut_off
    # router-a answers once the abort is in its outbox; it persists it to KV as soon as the restarted server's
    # JetStream takes it (retried while it does not): what router-b is to hear begins there.
    await RetryPolicy(attempts=60, initial_s=0.1, max_s=0.5).call(a.rollouts.flush, retry_on=Retryable,
                                                                  what="router-a persisting the abort")
    # Back on the bus, router-b watches its routes anew and reads them again: retried while the restarted server's
    # JetStream is not ready yet, which on a loaded machine takes seconds. Once it has, the abort is applied (read
    # then, or heard on the new watch) at once; nats-py's own remaking of the old watch takes 10 to 20 s.
    await b.rollouts.caught_up.wait_for(caught_up + 1, timeout_s=30)
    await b.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=5)
    assert b.rollouts.route("chat").weight == 0.0
