"""Queue depth from Immich's API: v2.4+ (``GET /api/queues``), older servers (``GET /api/jobs``), bad keys."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer as AiohttpServer

from immich_thumbnail_exporter.collectors.queues import QueueCollection
from immich_thumbnail_exporter.config import Config, load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.sources.connections import check_connections
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError, ImmichApi, QueueStats
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.store import Result, Store
from tests.test_queues import Samples, flat, jobs, value

ADMIN_KEY = "admin-key"
LIMITED_KEY = "user-key"  # a valid key without the queue.read permission
NO_DB = "postgresql://nobody@127.0.0.1:1/none"

# What the fake server reports, in BullMQ's terms.
QUEUES: dict[str, dict[str, Any]] = {
    "thumbnailGeneration": {"paused": True, "counts": {"active": 1, "completed": 0, "failed": 2, "delayed": 0,
                                                        "waiting": 5, "paused": 0}},
    "metadataExtraction": {"paused": False, "counts": {"active": 0, "completed": 0, "failed": 0, "delayed": 0,
                                                        "waiting": 0, "paused": 0}},
}


def _error(status: int, message: str, error: str) -> web.Response:
    return web.json_response({"message": message, "error": error, "statusCode": status}, status=status)


class FakeImmich:
    """Answers like Immich: ``v2.4`` has ``/api/queues``; ``v1.13x`` only ``/api/jobs`` (404 on the other)."""

    def __init__(self, era: str) -> None:
        self.era = era
        self.hits: Counter[str] = Counter()
        self.keys = {ADMIN_KEY: "admin", LIMITED_KEY: "user"}
        self.delay = 0.0  # seconds every queue answer takes
        self.version_doc: Any = None  # what /api/server/version answers, when a test sets it
        app = web.Application()
        app.router.add_get("/api/server/ping", self.ping)
        app.router.add_get("/api/server/version", self.version)
        app.router.add_get("/api/jobs", self.jobs)
        if era == "v2.4":
            app.router.add_get("/api/queues", self.queues)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        self.server = AiohttpServer(app, host="127.0.0.1", port=0)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/")).rstrip("/")

    def _auth(self, request: web.Request) -> web.Response | None:
        role = self.keys.get(request.headers.get("x-api-key", ""))
        if role is None:
            return _error(401, "Invalid API key", "Unauthorized")
        if role != "admin":
            return _error(403, "Missing required permission: queue.read", "Forbidden")
        return None

    async def not_found(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        return _error(404, f"Cannot {request.method} {request.path}", "Not Found")

    async def ping(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        return web.json_response({"res": "pong"})

    async def version(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if self.version_doc is not None:
            return web.json_response(self.version_doc)
        major, minor, patch = (2, 4, 1) if self.era == "v2.4" else (1, 132, 3)
        return web.json_response({"major": major, "minor": minor, "patch": patch})

    async def queues(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        await asyncio.sleep(self.delay)
        denied = self._auth(request)
        if denied is not None:
            return denied
        return web.json_response([
            {"name": name, "isPaused": q["paused"], "statistics": q["counts"]} for name, q in QUEUES.items()
        ])

    async def jobs(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        await asyncio.sleep(self.delay)
        denied = self._auth(request)
        if denied is not None:
            return denied
        return web.json_response({
            name: {"jobCounts": q["counts"], "queueStatus": {"isActive": q["counts"]["active"] > 0,
                                                              "isPaused": q["paused"]}}
            for name, q in QUEUES.items()
        })


@pytest_asyncio.fixture(params=["v1.13x", "v2.4"])
async def immich(request: pytest.FixtureRequest) -> AsyncIterator[FakeImmich]:
    fake = FakeImmich(str(request.param))
    await fake.server.start_server()
    try:
        yield fake
    finally:
        await fake.server.close()


def api_config(fake: FakeImmich, key: str = ADMIN_KEY, redis_url: str | None = None) -> Config:
    env = {"DB_URL": NO_DB, "IMMICH_URL": fake.url, "IMMICH_API_KEY": key}
    if redis_url:
        env["REDIS_URL"] = redis_url
    return load_config(None, environ=env, overrides={"intervals.queues": "2s", "immich.timeout": "3s"})


def expected_stats() -> list[QueueStats]:
    return sorted(
        (QueueStats(name, q["paused"], dict(q["counts"])) for name, q in QUEUES.items()), key=lambda s: s.name
    )


@pytest.mark.asyncio
async def test_queues_endpoint_and_fallback(immich: FakeImmich) -> None:
    api = ImmichApi(api_config(immich).immich)
    try:
        for _ in range(2):
            stats = sorted(await api.queues(), key=lambda s: s.name)
            assert stats == expected_stats()
    finally:
        await api.close()
    if immich.era == "v2.4":
        assert api.queues_endpoint == "queues"
        assert immich.hits["/api/queues"] == 2 and immich.hits["/api/jobs"] == 0
    else:
        # One 404 on /api/queues, remembered: the second round goes straight to /api/jobs.
        assert api.queues_endpoint == "jobs"
        assert immich.hits["/api/queues"] == 1 and immich.hits["/api/jobs"] == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(("key", "status"), [("wrong-key", 401), (LIMITED_KEY, 403)])
async def test_auth_errors_are_auth_errors(immich: FakeImmich, key: str, status: int) -> None:
    api = ImmichApi(api_config(immich, key).immich)
    try:
        with pytest.raises(ApiAuthError) as info:
            await api.queues()
    finally:
        await api.close()
    assert info.value.status == status
    assert key not in str(info.value)
    assert ("Invalid API key" if status == 401 else "queue.read") in str(info.value)


async def api_collection(config: Config) -> QueueCollection:
    return QueueCollection(config, PostgresSource(config.database))


def _same_labels(s: Samples) -> None:
    assert jobs(s, "waiting") == 5
    assert jobs(s, "active") == 1
    assert jobs(s, "failed") == 2
    assert jobs(s, "waiting", queue="metadataExtraction") == 0
    assert value(s, "immich_queue_paused", queue="thumbnailGeneration") == 1
    assert value(s, "immich_queue_paused", queue="metadataExtraction") == 0


@pytest.mark.asyncio
async def test_api_only_depth(immich: FakeImmich, caplog: pytest.LogCaptureFixture) -> None:
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
    assert col._api_version == ("v2.4.1" if immich.era == "v2.4" else "v1.132.3")
    from_api = [r for r in caplog.records if "come from Immich's API" in r.getMessage()]
    assert len(from_api) == 1  # said once, in the logs; the labels are the same as from Redis


@pytest.mark.asyncio
async def test_api_stands_in_while_redis_is_down(immich: FakeImmich, valkey: EmbeddedValkey) -> None:
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
@pytest.mark.parametrize("key", ["wrong-key", LIMITED_KEY])
async def test_bad_key_is_logged_once_and_polled_slowly(
    immich: FakeImmich, key: str, caplog: pytest.LogCaptureFixture
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
        immich.keys[key] = "admin"
        col._api_next_poll = 0.0
        outcome = await col.collect()
        assert outcome.sources["immich_api"] is True
        assert any("works again" in r.getMessage() for r in caplog.records)
        _same_labels(flat(outcome))
    finally:
        await col.close()


@pytest.mark.asyncio
async def test_slow_api_does_not_hold_the_round(immich: FakeImmich) -> None:
    immich.delay = 30.0
    config = load_config(None, environ={"DB_URL": NO_DB, "IMMICH_URL": immich.url, "IMMICH_API_KEY": ADMIN_KEY},
                         overrides={"intervals.queues": "3s", "immich.timeout": "1s"})
    col = await api_collection(config)
    try:
        for _ in range(2):
            t0 = time.monotonic()
            outcome = await col.collect()
            assert time.monotonic() - t0 < col.timeout + 0.5
            assert isinstance(outcome.sources["immich_api"], str)
            assert outcome.parts == ()
        immich.delay = 0.0
        outcome = await col.collect()
        assert outcome.sources["immich_api"] is True
    finally:
        await col.close()


@pytest.mark.asyncio
async def test_check_connections_api(immich: FakeImmich, capsys: pytest.CaptureFixture[str]) -> None:
    assert await check_connections(api_config(immich)) == []
    out = capsys.readouterr().out
    assert "ok: immich API" in out and "2 queues readable" in out
    endpoint = "/api/queues" if immich.era == "v2.4" else "/api/jobs"
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
async def test_server_version_with_prerelease(immich: FakeImmich, answer: dict[str, Any], shown: str | None) -> None:
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
