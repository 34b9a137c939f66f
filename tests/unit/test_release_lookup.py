"""`artifacts.release_of` tells "not registered" (the gate blocks) from "cannot tell now" (the gate retries)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import nats.errors
import nats.js.errors
import pytest

from lockgate import artifacts
from lockgate.errors import BusUnavailable, NotFound, Retryable
from lockgate.subjects import Subjects

pytestmark = pytest.mark.timeout(10)


def _bus(*, fails: BaseException | None = None, headers: dict[str, str] | None = None, data: bytes = b"") -> Any:
    """A bus whose releases bucket answers a message get with `fails`, or a message of `headers` and `data`."""
    async def get_msg(stream: str, subject: str) -> Any:
        if fails is not None:
            raise fails
        return SimpleNamespace(headers=headers, data=data, time=None)

    return SimpleNamespace(subjects=Subjects(), js=SimpleNamespace(get_msg=get_msg))


@pytest.mark.parametrize("bus", [
    _bus(fails=nats.errors.ConnectionClosedError()),
    _bus(fails=nats.errors.TimeoutError()),
    _bus(fails=nats.errors.NoRespondersError()),
])
async def test_an_unreadable_release_bucket_is_retryable_never_not_registered(bus: Any) -> None:
    with pytest.raises(BusUnavailable) as err:
        await artifacts.release_of(bus, "r1")
    assert isinstance(err.value, Retryable) and "cannot read release 'r1'" in err.value.message


@pytest.mark.parametrize("bus", [
    _bus(fails=nats.js.errors.NotFoundError()),  # no message under the key
    _bus(headers={"KV-Operation": "DEL"}),  # a delete marker
])
async def test_a_missing_or_deleted_binding_is_not_registered(bus: Any) -> None:
    with pytest.raises(NotFound, match="release 'r1' is not registered"):
        await artifacts.release_of(bus, "r1")


async def test_a_binding_written_to_expire_binds_nothing() -> None:
    bundle = b'{"release": "r1", "app": "shop", "artifacts": {}}'
    assert (await artifacts.release_of(_bus(data=bundle), "r1"))["app"] == "shop"
    with pytest.raises(artifacts.TakenUnbound, match=r"written to expire \(Nats-TTL\)"):
        await artifacts.release_of(_bus(headers={"Nats-TTL": "1h"}, data=bundle), "r1")
