"""The store's freshness rule: a result is shown only while its sources are up and it was published after
each came back. Decided by the store's own event order, never a clock: driven here with a fake monotonic
clock and a wall clock stepped back and forward, as NTP does."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client.core import GaugeMetricFamily

from immich_thumbnail_exporter import store as store_mod
from immich_thumbnail_exporter.store import Part, Result, Store


class Clocks:
    """``time`` as the store sees it: a monotonic clock that only goes forward, a wall clock that steps."""

    def __init__(self) -> None:
        self.mono = 5000.0
        self.wall = 1_800_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def tick(self, seconds: float = 1.0) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> Clocks:
    c = Clocks()
    monkeypatch.setattr(store_mod, "time", c)
    return c


PART = Part(frozenset({"postgres"}), (GaugeMetricFamily("immich_assets", "", labels=[]),))


def publish(s: Store, clocks: Clocks, success: bool = True) -> None:
    s.publish(Result("inventory", success, 0.1, clocks.time(), (PART,) if success else ()))


def shown(s: Store) -> bool:
    return any(f.name == "immich_assets" for f in s.families())


Step = Callable[[Store, Clocks], None]


def up(s: Store, c: Clocks) -> None:
    s.set_source("postgres", True)


def down(s: Store, c: Clocks) -> None:
    s.set_source("postgres", False, "connection refused")


def result(s: Store, c: Clocks) -> None:
    publish(s, c)


def failed(s: Store, c: Clocks) -> None:
    publish(s, c, success=False)


def back_10_min(s: Store, c: Clocks) -> None:
    c.wall -= 600


def forward_10_min(s: Store, c: Clocks) -> None:
    c.wall += 600


def down_in_result(s: Store, c: Clocks) -> None:
    s.publish(Result("inventory", False, 0.1, c.time()), {"postgres": "connection refused"})


@pytest.mark.parametrize(
    ("steps", "visible"),
    [
        pytest.param([up, result], True, id="fresh result, source up"),
        pytest.param([up, result, down], False, id="source down hides it"),
        pytest.param([up, result, down, up], False, id="result from before the outage stays hidden"),
        pytest.param([up, result, down, up, result], True, id="a new result after recovery shows"),
        pytest.param([up, back_10_min, result], True, id="wall clock stepped back before the result"),
        pytest.param([up, result, back_10_min, result], True, id="stepped back between two results"),
        pytest.param([up, result, down, up, back_10_min, result], True, id="stepped back across an outage"),
        pytest.param([up, result, down, forward_10_min, up], False,
                     id="stepped forward: a result from before the outage is still stale"),
        pytest.param([up, result, forward_10_min, down, up, back_10_min], False,
                     id="any steps: recovery without a new result shows nothing"),
        pytest.param([up, result, down_in_result], False, id="a round that found the source down"),
        pytest.param([up, result, failed], False, id="a failed round publishes no parts"),
        pytest.param([result, up], False, id="published before the source was ever up"),
    ],
)
def test_freshness_follows_events_not_clocks(clocks: Clocks, steps: list[Step], visible: bool) -> None:
    s = Store(["inventory"], ["postgres"])
    for step in steps:
        step(s, clocks)
        clocks.tick()
    assert shown(s) is visible


def test_wall_clock_moves_only_the_timestamps(clocks: Clocks) -> None:
    s = Store(["inventory"], ["postgres"])
    s.set_source("postgres", True)
    publish(s, clocks)
    before = {f.name for f in s.families()}
    stamp = s.last_success("inventory")
    back_10_min(s, clocks)
    publish(s, clocks)
    after = s.families()
    assert {f.name for f in after} == before
    assert s.last_success("inventory") == pytest.approx((stamp or 0) - 600)
    assert all(sample.value >= 0 for f in after for sample in f.samples)
