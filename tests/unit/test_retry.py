"""The one retry policy: retries, gives up, and jitters within its cap."""

from __future__ import annotations

import random

import pytest

from lockgate.retry import RetryPolicy


async def test_retries_until_success_with_growing_capped_waits() -> None:
    waits: list[float] = []
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise ConnectionError("down")
        return "ok"

    async def fake_sleep(s: float) -> None:
        waits.append(s)

    policy = RetryPolicy(attempts=5, initial_s=0.1, max_s=0.25, jitter=False)
    assert await policy.call(flaky, retry_on=ConnectionError, sleep=fake_sleep) == "ok"
    assert calls == 4
    assert waits == [0.1, 0.2, 0.25]


async def test_gives_up_after_attempts_and_raises_the_last_error() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"down {calls}")

    async def no_sleep(s: float) -> None:
        return None

    with pytest.raises(ConnectionError, match="down 3"):
        await RetryPolicy(attempts=3).call(broken, retry_on=ConnectionError, sleep=no_sleep)
    assert calls == 3


async def test_without_an_attempt_limit_it_retries_until_the_caller_gives_up() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"down {calls}")

    async def no_sleep(s: float) -> None:
        return None

    # Far beyond the default five attempts: only give_up() ends it, asked after each failure.
    with pytest.raises(ConnectionError, match="down 40"):
        await RetryPolicy(attempts=None).call(broken, retry_on=ConnectionError, sleep=no_sleep,
                                              give_up=lambda: calls >= 40)
    assert calls == 40


async def test_give_up_also_ends_a_limited_policy_early() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    async def no_sleep(s: float) -> None:
        return None

    with pytest.raises(ConnectionError):
        await RetryPolicy(attempts=10).call(broken, retry_on=ConnectionError, sleep=no_sleep, give_up=lambda: True)
    assert calls == 1


async def test_does_not_retry_other_errors() -> None:
    calls = 0

    async def bug() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("x")

    with pytest.raises(KeyError):
        await RetryPolicy(attempts=5).call(bug, retry_on=ConnectionError)
    assert calls == 1


@pytest.mark.parametrize("attempt", [1, 2, 5, 12])
def test_full_jitter_stays_within_the_cap_and_varies(attempt: int) -> None:
    policy = RetryPolicy(initial_s=0.05, max_s=2.0, rng=random.Random(7))
    cap = min(2.0, 0.05 * 2 ** (attempt - 1))
    delays = [policy.delay(attempt) for _ in range(200)]
    assert all(0 <= d <= cap for d in delays)
    assert len(set(delays)) > 150  # jittered, not in lockstep
