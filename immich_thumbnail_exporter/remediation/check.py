"""What ``regenerate`` and the ``remediation`` collection share: a targeted check of a few assets, a
read-only look at the thumbnail queue, a rate limiter and the submission of one batch.

The targeted check is the full scan's file rule applied to a handful of assets
(``scan.targeted.check_assets``): fetch their ``asset_file`` rows, map each path onto the media root
(``PathMapper``, refusing paths that escape it), and judge the file: missing, empty, corrupt (magic
bytes) or unreadable. Headers are always checked here, whatever ``checks.verify_headers`` says: an asset
is only called fixed on good evidence.

The queue is read with a few bounded, read-only commands (LRANGE, ZRANGE, HMGET, XREVRANGE): nothing here
writes to Redis, to Immich's database or to its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis

from immich_thumbnail_exporter.config import Config, RedisConfig
from immich_thumbnail_exporter.remediation.ledger import Ledger
from immich_thumbnail_exporter.scan.targeted import check_assets, media_mapper
from immich_thumbnail_exporter.scan.verdict import AssetVerdict
from immich_thumbnail_exporter.sources.bullmq import loads
from immich_thumbnail_exporter.sources.immich_api import ApiError, ImmichApi
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError, describe_error
from immich_thumbnail_exporter.sources.schema import Schema
from immich_thumbnail_exporter.vocabulary import THUMBNAIL_JOB_NAMES, THUMBNAIL_QUEUE

T = TypeVar("T")
log = logging.getLogger(__name__)

# Job ids read from the queue per lookup: bounded whatever the queue's length.
QUEUE_LOOKUP_LIMIT = 20_000
EVENTS_SAMPLE = 5_000

REASON_TEXT = {
    "original_missing": "the original file is missing: regeneration cannot work; restore it from a backup",
    "not_in_database": "asset not in the database",
    "not_eligible": "asset is trashed or hidden: Immich makes no thumbnails for it",
    "invalid_id": "not a valid asset id",
    "file_unreadable": "the exporter cannot read the file (permissions, or a symlink out of the media "
    "folder): regeneration would not change that",
    "queued": "already waiting in the thumbnail queue",
}


# -- the targeted check ----------------------------------------------------------------------------

# The file rule and the targeted check live in ``scan/`` (``verdict``, ``targeted``): one rule for the full
# scan, this check and job verification.
AssetCheck = AssetVerdict


def valid_asset_id(asset_id: str) -> bool:
    try:
        uuid.UUID(asset_id)
    except ValueError:
        return False
    return True


class Checker:
    """Targeted checks against one Immich: the schema and media mapping are looked up once."""

    def __init__(self, config: Config, pg: PostgresSource) -> None:
        if not config.media.root:
            raise ValueError("media.root is not set")
        self.config = config
        self.pg = pg
        self.schema: Schema | None = None
        self.mapper: PathMapper | None = None

    async def prepare(self) -> tuple[Schema, PathMapper]:
        if self.schema is None or self.mapper is None:
            self.schema, self.mapper = await self.pg.schema(), await media_mapper(self.pg, self.config.media)
        return self.schema, self.mapper

    async def check(self, asset_ids: Iterable[str]) -> dict[str, AssetCheck]:
        """Fetch the assets' rows and judge their files. Ids that are not UUIDs are reported as absent."""
        schema, mapper = await self.prepare()
        return await check_assets(self.pg, schema, mapper, asset_ids,
                                  timeout=self.config.database.statement_timeout)


# -- the thumbnail queue, read-only ----------------------------------------------------------------


def redis_client(cfg: RedisConfig) -> aioredis.Redis:
    common: dict[str, Any] = {
        "socket_timeout": cfg.timeout,
        "socket_connect_timeout": cfg.timeout,
        "decode_responses": True,
        "client_name": "immich-thumbnail-exporter",
    }
    if cfg.username:
        common["username"] = cfg.username
    if cfg.password:
        common["password"] = cfg.password.get()
    if cfg.url:
        return aioredis.Redis.from_url(cfg.url.get(), **common)
    if cfg.socket:
        return aioredis.Redis(unix_socket_path=cfg.socket, db=cfg.db, **common)
    return aioredis.Redis(host=cfg.host or "redis", port=cfg.port, db=cfg.db, **common)


def _redis_target(cfg: RedisConfig) -> str:
    if cfg.url:
        return "redis.url"
    if cfg.socket:
        return cfg.socket
    return f"{cfg.host or 'redis'}:{cfg.port}"


@dataclass
class QueueView:
    """Assets named by per-asset jobs waiting or running in the thumbnail queue."""

    assets: dict[str, str]  # asset id -> state (waiting, prioritized, active, paused, delayed)
    jobs: int  # jobs in those states
    checked: int  # job ids actually looked at (bounded)

    @property
    def complete(self) -> bool:
        return self.checked >= self.jobs


async def _queue_view(client: aioredis.Redis, prefix: str, limit: int) -> QueueView:
    q = f"{prefix}:{THUMBNAIL_QUEUE}"
    lists = (("active", "list"), ("prioritized", "zset"), ("wait", "list"), ("paused", "list"), ("delayed", "zset"))
    pipe = client.pipeline(transaction=False)
    for name, kind in lists:
        if kind == "list":
            pipe.llen(f"{q}:{name}")
        else:
            pipe.zcard(f"{q}:{name}")
    sizes = [int(n or 0) for n in await pipe.execute()]
    total = sum(sizes)
    pipe = client.pipeline(transaction=False)
    budget = limit
    wanted: list[str] = []
    for (name, kind), size in zip(lists, sizes, strict=True):
        n = min(size, budget)
        if n <= 0:
            continue
        budget -= n
        wanted.append(name)
        # Newest first: BullMQ pushes new jobs on the left of ``wait``; workers take from the right.
        if kind == "list":
            pipe.lrange(f"{q}:{name}", 0, n - 1)
        else:
            pipe.zrange(f"{q}:{name}", 0, n - 1)
    id_lists = await pipe.execute() if wanted else []
    job_state: list[tuple[str, str]] = []
    for name, ids in zip(wanted, id_lists, strict=True):
        state = "waiting" if name == "wait" else name
        job_state.extend((str(j), state) for j in ids)
    assets: dict[str, str] = {}
    for i in range(0, len(job_state), 500):
        chunk = job_state[i : i + 500]
        pipe = client.pipeline(transaction=False)
        for job_id, _ in chunk:
            pipe.hmget(f"{q}:{job_id}", "name", "data")
        for (_, state), (name, data) in zip(chunk, await pipe.execute(), strict=True):
            if name not in THUMBNAIL_JOB_NAMES or not data:
                continue
            try:
                doc = loads(data)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                assets.setdefault(doc["id"], state)
    return QueueView(assets, total, len(job_state))


async def _read_queue(cfg: RedisConfig, read: Callable[[aioredis.Redis], Awaitable[T]], timeout: float) -> T:
    """Run one read-only lookup on a short-lived client; Redis trouble becomes SourceError("redis")."""
    client = redis_client(cfg)
    try:
        return await asyncio.wait_for(read(client), timeout)
    except TimeoutError:
        raise SourceError("redis", f"{_redis_target(cfg)} did not answer in time") from None
    except aioredis.RedisError as exc:
        raise SourceError("redis", f"cannot read the thumbnail queue at {_redis_target(cfg)}: "
                                   f"{describe_error(exc)}") from None
    finally:
        with contextlib.suppress(Exception):  # closing a broken connection: nothing left to do
            await asyncio.wait_for(client.aclose(), 2)


async def queued_assets(cfg: RedisConfig, limit: int = QUEUE_LOOKUP_LIMIT) -> QueueView:
    """The per-asset thumbnail jobs waiting or running now. Raises SourceError("redis") when unreachable."""
    return await _read_queue(cfg, lambda c: _queue_view(c, cfg.prefix, limit), cfg.timeout * 4 + 5)


@dataclass
class Throughput:
    """How fast Immich's workers finished thumbnail jobs recently, from the queue's event stream."""

    completed: int  # completed events in the sample
    window_seconds: float  # from the first to the last of them
    last_completed_age: float | None  # seconds since the newest one
    backlog: int  # jobs waiting, prioritized, paused or active now

    @property
    def rate(self) -> float | None:
        """Jobs per second, or None when fewer than two jobs finished in the sample."""
        if self.completed < 2 or self.window_seconds <= 0:
            return None
        return (self.completed - 1) / self.window_seconds


async def _throughput(client: aioredis.Redis, prefix: str, sample: int) -> Throughput:
    q = f"{prefix}:{THUMBNAIL_QUEUE}"
    entries: Any = await client.xrevrange(f"{q}:events", "+", "-", count=sample)
    stamps = []
    for entry_id, fields in entries or []:
        if fields and fields.get("event") == "completed":
            stamps.append(int(str(entry_id).split("-", 1)[0]))
    pipe = client.pipeline(transaction=False)
    pipe.llen(f"{q}:wait")
    pipe.zcard(f"{q}:prioritized")
    pipe.llen(f"{q}:paused")
    pipe.llen(f"{q}:active")
    backlog = sum(int(n or 0) for n in await pipe.execute())
    if not stamps:
        return Throughput(0, 0.0, None, backlog)
    newest, oldest = max(stamps), min(stamps)
    return Throughput(len(stamps), (newest - oldest) / 1000.0, max(0.0, time.time() - newest / 1000.0), backlog)


async def thumbnail_throughput(cfg: RedisConfig, sample: int = EVENTS_SAMPLE) -> Throughput:
    return await _read_queue(cfg, lambda c: _throughput(c, cfg.prefix, sample), cfg.timeout * 2 + 5)


# -- submission ------------------------------------------------------------------------------------


class RateLimiter:
    """At most ``per_second`` requests per second, spaced evenly (no bursts)."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self._next = 0.0

    async def acquire(self) -> None:
        now = time.monotonic()
        delay = self._next - now
        if delay > 0:
            await asyncio.sleep(delay)
        self._next = max(now, self._next) + self.interval


def request_result(exc: ApiError) -> str:
    """``rejected`` when Immich answered no (4xx), ``error`` when it could not answer (5xx, network)."""
    return "rejected" if exc.status is not None and 400 <= exc.status < 500 else "error"


@dataclass
class BatchOutcome:
    result: str  # accepted, rejected, error, none (nothing claimed)
    submitted: list[str]
    error: ApiError | None = None


async def submit_batch(
    api: ImmichApi,
    ledger: Ledger,
    kinds: Mapping[str, Iterable[str]],
    *,
    retry_after: float,
    max_attempts: int,
    reset: Iterable[str] = (),
) -> BatchOutcome:
    """Claim the assets in the ledger, ask Immich once, and record the answer.

    The claim is written before the request: an interruption leaves the assets "submitting", which the
    next run treats as submitted (verified later, never resubmitted early). A refused or failed request
    is rolled back and does not count as an attempt.
    """
    claims = ledger.claim(kinds, time.time(), retry_after, max_attempts, reset)
    if not claims:
        return BatchOutcome("none", [])
    ids = [c.asset_id for c in claims]
    try:
        await asyncio.wait_for(api.regenerate_thumbnails(ids), api.config.timeout + 5)
    except ApiError as exc:
        result = request_result(exc)
        ledger.release(claims, result, str(exc), time.time())
        return BatchOutcome(result, [], exc)
    except TimeoutError:
        exc2 = ApiError(f"POST /api/assets/jobs: no answer within {api.config.timeout:.0f}s")
        ledger.release(claims, "error", str(exc2), time.time())
        return BatchOutcome("error", [], exc2)
    ledger.accepted(ids, time.time())
    return BatchOutcome("accepted", ids)
