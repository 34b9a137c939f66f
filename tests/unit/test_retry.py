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


class Broken:
    """A call that always fails, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        raise ConnectionError(f"down {self.calls}")


async def no_sleep(s: float) -> None:
    return None


@pytest.mark.parametrize(("attempts", "give_up_after", "calls"), [
    (3, None, 3),  # the attempts are spent
    (None, 40, 40),  # no limit: far beyond the default five, only give_up() ends it, asked after each failure
    (10, 1, 1),  # give_up() ends a limited policy early too
])
async def test_gives_up_when_the_attempts_are_spent_or_the_caller_says_so_and_raises_the_last_error(
        attempts: int | None, give_up_after: int | None, calls: int) -> None:
    broken = Broken()
    give_up = None if give_up_after is None else (lambda: broken.calls >= give_up_after)
    with pytest.raises(ConnectionError, match=f"down {calls}$"):
        await RetryPolicy(attempts=attempts).call(broken, retry_on=ConnectionError, sleep=no_sleep, give_up=give_up)
    assert broken.calls == calls


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
