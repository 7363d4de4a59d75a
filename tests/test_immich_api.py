"""Queue depth from Immich's API: v2.4+ (``GET /api/queues``), older servers (``GET /api/jobs``), bad keys.

Immich here is the one simulated Immich (``demo/simulation/``) of each release, over real BullMQ queues in
a real Valkey."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from bullmq import Queue, Worker

from immich_thumbnail_exporter.collectors.queues import QueueCollection
from immich_thumbnail_exporter.config import Config, load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.simulation.api import PREFIX, QUEUE, ApiKey, SimulatedApi
from immich_thumbnail_exporter.sources.connections import check_connections
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError, ImmichApi, QueueStats
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.store import Result, Store
from tests.conftest import wait_for
from tests.test_queues import Samples, flat, jobs, value

ADMIN_KEY = "admin-key"
NON_ADMIN_KEY = "user-key"  # a valid key with "all", of a user who is not an admin
LIMITED_KEY = "narrow-key"  # an admin's key without queue.read (v2.4+; before, GET /api/jobs declares none)
NO_DB = "postgresql://nobody@127.0.0.1:1/none"
HELD = 1  # active jobs, held by a worker until the test ends
FAILED = 2
WAITING = 5  # added while the queue is paused


@pytest_asyncio.fixture(params=["v1.132", "v2.4"])
async def immich(request: pytest.FixtureRequest, valkey: EmbeddedValkey) -> AsyncIterator[SimulatedApi]:
    """The simulated Immich of that release, over real BullMQ queues: thumbnailGeneration paused with
    jobs failed, one held active by a live worker, and some waiting; every other queue empty."""
    queue = Queue(QUEUE, {"prefix": PREFIX, "connection": valkey.url})
    release = asyncio.Event()

    async def process(job: Any, token: str) -> None:
        if job.name == "fail":
            raise RuntimeError("boom")
        await release.wait()

    for _ in range(FAILED):
        await queue.add("fail", {}, {"attempts": 1, "removeOnFail": False})
    for _ in range(HELD):
        await queue.add("hold", {}, {"attempts": 1})
    worker = Worker(QUEUE, process, {"prefix": PREFIX, "connection": valkey.url, "concurrency": FAILED + HELD})

    async def settled() -> bool:
        counts = await queue.getJobCounts("active", "failed")
        return counts == {"active": HELD, "failed": FAILED}

    fake = SimulatedApi(None, valkey.url, {
        ADMIN_KEY: ApiKey(None, ("all",), admin=True),
        NON_ADMIN_KEY: ApiKey(None, ("all",), admin=False),
        LIMITED_KEY: ApiKey(None, ("asset.read",), admin=True),
    }, release=str(request.param))
    try:
        await wait_for(settled, timeout=30)
        await queue.pause()
        for _ in range(WAITING):
            await queue.add("wait", {}, {"attempts": 1})
        await fake.start()
        yield fake
    finally:
        release.set()
        await fake.stop()
        await asyncio.wait_for(worker.close(), 15)
        await asyncio.wait_for(queue.close(), 10)


def api_config(fake: SimulatedApi, key: str = ADMIN_KEY, redis_url: str | None = None) -> Config:
    env = {"DB_URL": NO_DB, "IMMICH_URL": fake.url, "IMMICH_API_KEY": key}
    if redis_url:
        env["REDIS_URL"] = redis_url
    return load_config(None, environ=env, overrides={"intervals.queues": "2s", "immich.timeout": "3s"})


def check_thumbnail_queue(stats: list[QueueStats], fake: SimulatedApi) -> None:
    by_name = {q.name: q for q in stats}
    assert sorted(by_name) == sorted(fake.release.queues)
    thumbs = by_name[QUEUE]
    assert thumbs.paused is True
    assert (thumbs.counts["active"], thumbs.counts["failed"]) == (HELD, FAILED)
    # BullMQ puts jobs added to a paused queue in its paused list (older) or its wait list (newer).
    assert thumbs.counts["waiting"] + thumbs.counts["paused"] == WAITING
    assert all(not any(q.counts.values()) and not q.paused for name, q in by_name.items() if name != QUEUE)


@pytest.mark.asyncio
async def test_queues_endpoint_and_fallback(immich: SimulatedApi) -> None:
    api = ImmichApi(api_config(immich).immich)
    try:
        for _ in range(2):
            check_thumbnail_queue(await api.queues(), immich)
    finally:
        await api.close()
    if immich.release.queues_route:
        assert api.queues_endpoint == "queues"
        assert immich.hits["/api/queues"] == 2 and immich.hits["/api/jobs"] == 0
    else:
        # One 404 on /api/queues, remembered: the second round goes straight to /api/jobs.
        assert api.queues_endpoint == "jobs"
        assert immich.hits["/api/queues"] == 1 and immich.hits["/api/jobs"] == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(("key", "status", "text"), [
    ("wrong-key", 401, "Invalid API key"),
    (NON_ADMIN_KEY, 403, "Forbidden"),  # the admin check comes before the permission check
    (LIMITED_KEY, 403, "Missing required permission: queue.read"),
])
async def test_auth_errors_are_auth_errors(immich: SimulatedApi, key: str, status: int, text: str) -> None:
    api = ImmichApi(api_config(immich, key).immich)
    try:
        if key == LIMITED_KEY and not immich.release.queues_route:
            # Before v2.4 GET /api/jobs declares no permission (v1.132-v1.135): an admin's key reads it.
            check_thumbnail_queue(await api.queues(), immich)
            return
        with pytest.raises(ApiAuthError) as info:
            await api.queues()
    finally:
        await api.close()
    assert info.value.status == status
    assert key not in str(info.value)
    assert text in str(info.value)


async def api_collection(config: Config) -> QueueCollection:
    return QueueCollection(config, PostgresSource(config.database))


def _same_labels(s: Samples) -> None:
    assert (jobs(s, "waiting") or 0) + (jobs(s, "paused") or 0) == WAITING
    assert jobs(s, "active") == HELD
    assert jobs(s, "failed") == FAILED
    assert jobs(s, "waiting", queue="metadataExtraction") == 0
    assert value(s, "immich_queue_paused", queue="thumbnailGeneration") == 1
    assert value(s, "immich_queue_paused", queue="metadataExtraction") == 0


@pytest.mark.asyncio
async def test_api_only_depth(immich: SimulatedApi, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="immich_thumbnail_exporter")
    col = await api_collection(api_config(immich))
    try:
        outcome = await col.collect()
        await col.collect()
    finally:
        await col.close()
    assert outcome.sources == {"immich_api": True}
    assert outcome.error is None
    assert all(part.needs == {"immich_api"} for part in outcome.parts)
    s = flat(outcome)
    _same_labels(s)
    # The API knows nothing of workers, ages, stalled or orphaned jobs: those are left out, not zero.
    assert not any(k[0] in ("immich_queue_workers", "immich_queue_stalled_jobs") for k in s)
    assert col._api_version == immich.release.tag
    from_api = [r for r in caplog.records if "come from Immich's API" in r.getMessage()]
    assert len(from_api) == 1  # said once, in the logs; the labels are the same as from Redis


@pytest.mark.asyncio
async def test_api_stands_in_while_redis_is_down(immich: SimulatedApi, valkey: EmbeddedValkey) -> None:
    col = await api_collection(api_config(immich, redis_url="redis://127.0.0.1:1/0"))
    try:
        outcome = await col.collect()
    finally:
        await col.close()
    assert isinstance(outcome.sources["redis"], str)
    assert outcome.sources["immich_api"] is True
    assert outcome.error and outcome.error.startswith("redis:")
    _same_labels(flat(outcome))

    # With Redis up, the API does not feed depth (it would duplicate the series), but it is still checked.
    col = await api_collection(api_config(immich, redis_url=valkey.url))
    try:
        outcome = await col.collect()
    finally:
        await col.close()
    assert outcome.sources["redis"] is True and outcome.sources["immich_api"] is True
    assert not any(part.needs == {"immich_api"} for part in outcome.parts)


@pytest.mark.asyncio
@pytest.mark.parametrize("key", ["wrong-key", NON_ADMIN_KEY])
async def test_bad_key_is_logged_once_and_polled_slowly(
    immich: SimulatedApi, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="immich_thumbnail_exporter")
    col = await api_collection(api_config(immich, key))
    store = Store(["queues"], ["immich_api"])
    try:
        outcomes = [await col.collect() for _ in range(4)]
        queue_hits = immich.hits["/api/queues"] + immich.hits["/api/jobs"]
        for outcome in outcomes:
            state = outcome.sources["immich_api"]
            assert isinstance(state, str) and ("HTTP 401" in state or "HTTP 403" in state)
            assert outcome.parts == ()
        store.publish(Result("queues", False, 0.1, time.time()), outcomes[-1].sources)
        up = next(f for f in store.families() if f.name == "immich_exporter_source_up")
        assert [s.value for s in up.samples if s.labels["source"] == "immich_api"] == [0.0]
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert key not in errors[0].getMessage()
        # Four rounds, one attempt (two requests at most: /api/queues' 404 then /api/jobs on old servers).
        assert queue_hits <= 2

        # The key is fixed: the next slow poll finds it working.
        immich.keys[key] = ApiKey(None, ("all",), admin=True)
        col._api_next_poll = 0.0
        outcome = await col.collect()
        assert outcome.sources["immich_api"] is True
        assert any("works again" in r.getMessage() for r in caplog.records)
        _same_labels(flat(outcome))
    finally:
        await col.close()


@pytest.mark.asyncio
async def test_slow_api_does_not_hold_the_round(immich: SimulatedApi) -> None:
    immich.delay = 30.0
    config = load_config(None, environ={"DB_URL": NO_DB, "IMMICH_URL": immich.url, "IMMICH_API_KEY": ADMIN_KEY},
                         overrides={"intervals.queues": "3s", "immich.timeout": "1s"})
    col = await api_collection(config)
    try:
        for _ in range(2):
            t0 = time.monotonic()
            outcome = await col.collect()
            # The deadline the collection promises (it plans every call to end within its timeout), plus
            # a margin for a busy machine; not a comparison of two timings.
            assert time.monotonic() - t0 < col.timeout + 0.5, (time.monotonic() - t0, col.timeout)
            assert isinstance(outcome.sources["immich_api"], str)
            assert outcome.parts == ()
        immich.delay = 0.0
        outcome = await col.collect()
        assert outcome.sources["immich_api"] is True
    finally:
        await col.close()


@pytest.mark.asyncio
async def test_check_connections_api(immich: SimulatedApi, capsys: pytest.CaptureFixture[str]) -> None:
    assert await check_connections(api_config(immich)) == []
    out = capsys.readouterr().out
    assert "ok: immich API" in out and f"{len(immich.release.queues)} queues readable" in out
    endpoint = "/api/queues" if immich.release.queues_route else "/api/jobs"
    assert endpoint in out

    problems = await check_connections(api_config(immich, "wrong-key"))
    assert len(problems) == 1 and problems[0].startswith("immich: ") and "401" in problems[0]
    assert "wrong-key" not in problems[0]


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        ({"major": 3, "minor": 2, "patch": 0, "prerelease": 1}, "v3.2.0-rc.1"),  # a v3 release candidate
        ({"major": 3, "minor": 1, "patch": 0, "prerelease": None}, "v3.1.0"),  # a v3 release
        ({"major": 2, "minor": 4, "patch": 1}, "v2.4.1"),  # before v3: no prerelease field
        ({"major": 3, "minor": 1, "patch": "0"}, None),  # not Immich's answer
    ],
)
@pytest.mark.asyncio
async def test_server_version_with_prerelease(immich: SimulatedApi, answer: dict[str, Any], shown: str | None) -> None:
    """v3's ``prerelease`` is shown as Immich's web UI shows it (``v3.2.0-rc.1``), which is also how the
    database's version_history renders in ``immich_server_info{version}``."""
    from immich_thumbnail_exporter.sources.immich_api import ApiError

    immich.version_doc = answer
    api = ImmichApi(api_config(immich).immich)
    try:
        if shown is None:
            with pytest.raises(ApiError, match="unexpected answer"):
                await api.version()
        else:
            assert await api.version() == shown
    finally:
        await api.close()
