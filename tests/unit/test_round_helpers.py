"""``tests.helpers.rounds`` and ``Calls``: what tests wait on instead of sleeping a few rounds."""

from __future__ import annotations

import asyncio

import pytest

from immich_thumbnail_exporter.store import Result, Store
from tests.helpers import Calls, rounds


async def _publish(store: Store, n: int) -> None:
    for i in range(n):
        await asyncio.sleep(0.02)
        store.publish(Result("files", True, 0.0, float(i)))


@pytest.mark.asyncio
async def test_rounds_counts_results_published_after_the_call() -> None:
    store = Store(["files"], [])
    store.publish(Result("files", True, 0.0, -1.0))  # before the call: not counted
    publisher = asyncio.create_task(_publish(store, 3))
    last = await rounds(store, "files", 3, timeout=5)
    assert last.finished_at == 2.0
    await publisher


@pytest.mark.asyncio
async def test_rounds_fails_when_the_rounds_do_not_come() -> None:
    store = Store(["files"], [])
    publisher = asyncio.create_task(_publish(store, 1))
    with pytest.raises(AssertionError, match=r"files: 1 of 2 rounds within 0\.3s"):
        await rounds(store, "files", 2, timeout=0.3)
    await publisher


class Probe:
    def __init__(self) -> None:
        self.done = 0

    async def probe(self) -> None:
        self.done += 1


@pytest.mark.asyncio
async def test_calls_counts_finished_calls_and_unwraps() -> None:
    p = Probe()

    async def loop() -> None:
        for _ in range(3):
            await asyncio.sleep(0.01)
            await p.probe()

    async with Calls(p, "probe") as probes:
        task = asyncio.create_task(loop())
        await probes.wait(3, timeout=5)
        assert probes.count == 3 and p.done == 3
        await task
    assert "probe" not in vars(p)
    with pytest.raises(TimeoutError):
        async with Calls(p, "probe") as probes:
            await probes.wait(1, timeout=0.05)
