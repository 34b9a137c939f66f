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


class _Bucket:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def get(self, key: str) -> Any:
        raise self.exc


def _bus(*, kv_fails: BaseException | None = None, get_fails: BaseException | None = None) -> Any:
    async def kv(bucket: str) -> _Bucket:
        if kv_fails is not None:
            raise kv_fails
        assert get_fails is not None
        return _Bucket(get_fails)

    return SimpleNamespace(subjects=Subjects(), kv=kv)


@pytest.mark.parametrize("bus", [
    _bus(kv_fails=nats.errors.ConnectionClosedError()),  # the bucket handle itself
    _bus(get_fails=nats.errors.TimeoutError()),
    _bus(get_fails=nats.errors.NoRespondersError()),
])
async def test_an_unreadable_release_bucket_is_retryable_never_not_registered(bus: Any) -> None:
    with pytest.raises(BusUnavailable) as err:
        await artifacts.release_of(bus, "r1")
    assert isinstance(err.value, Retryable) and "cannot read release 'r1'" in err.value.message


@pytest.mark.parametrize("exc", [nats.js.errors.KeyNotFoundError(), nats.js.errors.KeyDeletedError()])
async def test_a_missing_or_deleted_binding_is_not_registered(exc: BaseException) -> None:
    with pytest.raises(NotFound, match="release 'r1' is not registered"):
        await artifacts.release_of(_bus(get_fails=exc), "r1")
