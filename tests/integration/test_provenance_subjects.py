"""The provenance stream's subjects listed whole, past nats-server's page of 100,000 (probe p32: junk subjects sorting
first hid every genuine one from a gatekeeper's start, and a sunset past was never enforced)."""

from __future__ import annotations

import pytest

from lockgate.bus import Bus
from lockgate.provenance import ledger

pytestmark = pytest.mark.timeout(300)

PAGE = 100_000  # the most subjects nats-server lists in one stream info answer


async def test_every_subject_is_listed_past_the_servers_page(bus: Bus) -> None:
    prefix = bus.subjects.lifecycle_any.removesuffix("*")
    for i in range(PAGE + 5):  # core publishes, in order on one connection: stored before the acknowledged one below
        await bus.nc.publish(f"{prefix}0junk{i:07d}", b"{}")
    genuine = f"{prefix}zz-genuine"  # sorts after every junk subject: on the second page
    await bus.js.publish(genuine, b"{}")
    listed = await ledger.subjects(bus, bus.subjects.lifecycle_any)
    assert len(listed) == PAGE + 6 and listed[genuine] == 1
