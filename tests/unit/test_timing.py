"""The one deadline, backoff and rate limiter: driven by a fake monotonic clock, no sleeping."""

from __future__ import annotations

import pytest

from immich_thumbnail_exporter import timing


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(timing.time, "monotonic", c)
    return c


def test_left_counts_down_and_never_goes_below_its_floor(clock: Clock) -> None:
    deadline = timing.deadline_in(10)
    clock.now += 4
    assert timing.left(deadline) == pytest.approx(6)
    clock.now += 20
    assert timing.left(deadline) == 0.0
    assert timing.left(deadline, floor=0.2) == 0.2


@pytest.mark.parametrize(
    ("initial", "cap", "delays"),
    [
        (1.0, 60.0, [1, 2, 4, 8, 16, 32, 60, 60]),
        (0.5, 3.0, [0.5, 1, 2, 3, 3]),
        (5.0, 2.0, [2, 2]),
    ],
)
def test_backoff_doubles_up_to_its_cap_and_starts_over(initial: float, cap: float, delays: list[float]) -> None:
    backoff = timing.Backoff(initial, cap)
    assert [backoff.failed() for _ in delays] == delays
    backoff.succeeded()
    assert backoff.failed() == delays[0]


def test_rate_limiter_spaces_requests_evenly(clock: Clock) -> None:
    limiter = timing.RateLimiter(rate=2)
    assert limiter.allow()
    assert not limiter.allow()
    assert limiter.delay() == pytest.approx(0.5)
    clock.now += 0.25
    assert not limiter.allow()
    clock.now += 0.25
    assert limiter.allow()


def test_rate_limiter_burst_then_refill(clock: Clock) -> None:
    limiter = timing.RateLimiter(rate=1, burst=3)
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    clock.now += 2
    assert [limiter.allow() for _ in range(3)] == [True, True, False]
    clock.now += 100
    assert sum(limiter.allow() for _ in range(10)) == 3


def test_rate_limiter_refuses_a_rate_of_zero() -> None:
    with pytest.raises(ValueError):
        timing.RateLimiter(rate=0)


@pytest.mark.asyncio
async def test_rate_limiter_acquire_queues_callers_one_interval_apart(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(timing.asyncio, "sleep", fake_sleep)
    limiter = timing.RateLimiter(rate=4)
    for _ in range(3):
        await limiter.acquire()
    assert slept == pytest.approx([0.25, 0.5])
