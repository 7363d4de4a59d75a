"""The media pool (sources/media.py): one thread; a call that does not return in time makes the pool
stuck, every later call fails at once instead of borrowing another thread, and all is well again once
the stuck call returns. Blocking is simulated with an event (no file system)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from immich_thumbnail_exporter.sources.media import MediaPool, MediaStuck
from immich_thumbnail_exporter.sources.postgres import SourceError


def test_a_stuck_call_refuses_the_next_without_a_second_thread() -> None:
    pool = MediaPool()
    release = threading.Event()

    async def scenario() -> None:
        assert await pool.call(lambda: 41 + 1, timeout=1) == 42
        with pytest.raises(MediaStuck) as first:
            await pool.call(release.wait, timeout=0.2)
        assert isinstance(first.value, SourceError) and first.value.source == "filesystem"
        assert "did not answer within" in str(first.value)
        assert pool.stuck() is not None
        before = threading.active_count()
        for _ in range(5):  # refused at once, no thread borrowed
            with pytest.raises(MediaStuck):
                await asyncio.wait_for(pool.call(lambda: None, timeout=5), 0.5)
        assert threading.active_count() == before and pool.threads == 1
        release.set()
        for _ in range(500):  # the released call returns within moments
            if pool.stuck() is None:
                break
            await asyncio.sleep(0.01)
        assert pool.stuck() is None
        assert await pool.call(lambda: "back", timeout=1) == "back"

    asyncio.run(scenario())


def test_a_call_queued_behind_a_stuck_one_fails_when_it_becomes_stuck() -> None:
    pool = MediaPool()
    release = threading.Event()

    async def scenario() -> None:
        stuck = asyncio.ensure_future(pool.call(release.wait, timeout=0.3))
        await asyncio.sleep(0.05)
        behind = asyncio.ensure_future(pool.call(lambda: "never", timeout=5))
        for task in (stuck, behind):
            with pytest.raises(MediaStuck):
                await asyncio.wait_for(task, 2)
        release.set()

    asyncio.run(scenario())


def test_errors_of_the_call_come_back_as_they_are() -> None:
    pool = MediaPool()

    def boom() -> None:
        raise FileNotFoundError("gone")

    async def scenario() -> None:
        with pytest.raises(FileNotFoundError):
            await pool.call(boom, timeout=1)
        assert pool.stuck() is None

    asyncio.run(scenario())


def test_held_work_counts_as_stuck_until_released_or_gone() -> None:
    pool = MediaPool()
    alive = [True]
    pool.hold(1, "file walker pid 1 does not exit", lambda: alive[0])
    assert pool.stuck() == "file walker pid 1 does not exit"
    alive[0] = False
    assert pool.stuck() is None
    pool.hold(2, "another", lambda: True)
    pool.release(2)
    assert pool.stuck() is None
