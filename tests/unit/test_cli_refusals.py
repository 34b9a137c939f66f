"""`access.Refusals`: what a short CLI connection hears of the server's permissions violations, and a request that
ends at the first of them rather than after its timeout (probe p11 F4)."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from lockgate.cli.access import Refusals

pytestmark = pytest.mark.timeout(10)


async def test_a_permissions_violation_keeps_its_subject_and_other_errors_are_dropped() -> None:
    refusals = Refusals()
    await refusals.record(nats.errors.Error('nats: permissions violation for publish to "lg.query.cli"'))
    await refusals.record(nats.errors.Error("nats: stale connection"))
    await refusals.record(nats.errors.Error('nats: permissions violation for subscription to "_inbox_app.x.*"'))
    assert refusals.subjects == ["lg.query.cli", "_inbox_app.x.*"]


async def test_a_refusal_ends_the_wait_for_an_answer_that_would_never_come() -> None:
    refusals = Refusals()
    never = asyncio.get_running_loop().create_future()  # a refused request's answer
    asked = asyncio.Event()

    async def ask() -> str:
        asked.set()
        return await never

    waiting = asyncio.ensure_future(refusals.first(ask(), lambda subject: LookupError(subject)))
    await asked.wait()
    await refusals.record(nats.errors.Error('nats: permissions violation for publish to "lg.query.cli"'))
    with pytest.raises(LookupError, match=r"^lg\.query\.cli$"):
        await waiting
    assert never.cancelled()  # the request was given up, not left waiting


async def test_an_answer_is_returned_and_one_refused_before_the_ask_fails_at_once() -> None:
    refusals = Refusals()

    async def answer() -> str:
        return "rows"

    assert await refusals.first(answer(), lambda subject: LookupError(subject)) == "rows"
    await refusals.record(nats.errors.Error('nats: permissions violation for subscription to "_inbox_app.>"'))

    async def hangs() -> str:
        await asyncio.Event().wait()
        return "never"

    with pytest.raises(LookupError, match="_inbox_app"):
        await refusals.first(hangs(), lambda subject: LookupError(subject))
