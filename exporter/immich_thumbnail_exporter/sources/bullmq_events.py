"""BullMQ's per-queue event streams (``<prefix>:<queue>:events``), read in rounds, as plain entries.

BullMQ appends every state change to a Redis stream, trimmed to about 10,000 entries. ``EventStreams``
follows each stream from the last id it read (exclusive), in bounded batches, and hands the entries to
a sink (``collectors/job_events.py`` counts them), so every entry is delivered exactly once in the life
of the process.

**First start**: reading begins at the stream's current end; the history already in the stream is not
delivered (it would be counted again by every restart). A queue created while we watch is read from its
first entry (``begin_at_start``).

**Trimmed streams**: when the oldest entry still in the stream is newer than the last one read, entries
were trimmed before they were read. Valkey 7+/Redis 7+ report ``entries-added`` (every entry ever
added), so the gap is exact (``lost``). Older servers do not, and the loss is then logged but not
counted. Each batch is read as ``MULTI; XINFO STREAM; XRANGE; EXEC`` (reads only) so the stream's
length and the entries agree. A stream that was recreated (FLUSHALL, a restart without persistence) is
followed from its start; one that went back in time (restored from an older copy) from its end.

The blocking readers (``sources/bullmq_follow.py``, ``remediation/jobwatch.py``) share ``stream_ends``
and ``read_streams`` (XINFO STREAM, XREAD) below: one way to find where a stream ends and to read past it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from immich_thumbnail_exporter.sources.postgres import SourceError
from immich_thumbnail_exporter.sources.redis import SOURCE, RedisSource, describe_redis_error, is_permission_error

log = logging.getLogger(__name__)

BATCH = 1000  # entries per XRANGE
MAX_EVENTS_PER_ROUND = 20_000  # per queue; the rest is read next round

# One stream entry as redis-py gives it: (id, fields). Fields are whatever the writer put there.
Entry = tuple[str, Any]


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def valid_id(entry_id: Any) -> bool:
    try:
        parse_id(str(entry_id))
    except ValueError:
        return False
    return True


def next_id(entry_id: str) -> str:
    """The smallest id after ``entry_id``: XRANGE from here is exclusive of it (works on Redis < 6.2)."""
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq + 1}"


class EventSink(Protocol):
    """Where ``EventStreams.poll`` delivers what it reads."""

    async def entries(self, queue: str, entries: list[Entry], deadline: float) -> int:
        """Take a batch of new entries, in stream order; return how many were malformed."""
        ...

    def forget(self, queue: str) -> None:
        """The queue's stream was replaced: job ids restart, anything remembered about its jobs is void."""
        ...


@dataclass
class Cursor:
    last_id: str
    # Entries ever added to the stream up to and including ``last_id`` (None: the server does not say).
    seq: int | None


@dataclass
class PollStats:
    read: int = 0
    lost: int = 0
    malformed: int = 0
    behind: list[str] = field(default_factory=list)


class EventStreams:
    """Cursors into every queue's stream, and the entries lost to trimming (for the life of the process)."""

    def __init__(self, source: RedisSource, prefix: str) -> None:
        self.source = source
        self.prefix = prefix
        self.cursors: dict[str, Cursor] = {}
        self.lost: dict[str, int] = {}
        self._transaction = True
        self._warned_no_entries_added: set[str] = set()
        self._warned_wrong_type: set[str] = set()

    def key(self, queue: str) -> str:
        return f"{self.prefix}:{queue}:events"

    async def poll(self, queues: Sequence[str], deadline: float, sink: EventSink) -> PollStats:
        """Read new entries of every queue's stream, up to the per-round caps and the deadline."""
        stats = PollStats()
        for queue in queues:
            if time.monotonic() >= deadline:
                stats.behind.append(queue)
                continue
            self.lost.setdefault(queue, 0)
            cursor = self.cursors.get(queue)
            if cursor is None:
                self.cursors[queue] = await self._start(queue, deadline)
                continue
            await self._read_queue(queue, cursor, deadline, stats, sink)
        return stats

    def begin_at_start(self, queue: str) -> None:
        """Deliver this queue's stream from its first entry (a queue created while we were watching)."""
        if queue not in self.cursors:
            self.cursors[queue] = Cursor("0-0", 0)

    async def _start(self, queue: str, deadline: float) -> Cursor:
        """Begin at the stream's current end: history is not delivered."""
        key = self.key(queue)

        async def _xinfo(client: aioredis.Redis) -> dict[str, Any] | None:
            try:
                return dict(await client.xinfo_stream(key))
            except ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return None
                raise

        info = await self.source.run(f"XINFO STREAM {key}", _xinfo, _left(deadline))
        if info is None:
            # No stream yet: everything that appears in it from now on is new.
            return Cursor("0-0", 0)
        added = info.get("entries-added")
        return Cursor(str(info.get("last-generated-id") or "0-0"), int(added) if added is not None else None)

    async def _batch(self, queue: str, start: str, deadline: float) -> tuple[dict[str, Any] | None, list[Entry]]:
        key = self.key(queue)

        async def _read(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=self._transaction) as pipe:
                pipe.xinfo_stream(key)
                pipe.xrange(key, min=start, max="+", count=BATCH)
                return list(await pipe.execute(raise_on_error=False))

        try:
            info_res, entries_res = await self.source.run(f"XRANGE {key}", _read, _left(deadline))
        except ResponseError as exc:
            if self._transaction and is_permission_error(exc):
                log.warning("the Redis server refuses MULTI/EXEC (%s): reading event streams without it", exc)
                self._transaction = False
                return await self._batch(queue, start, deadline)
            raise SourceError(SOURCE, f"reading {key}: {describe_redis_error(exc)}") from None
        if isinstance(info_res, ResponseError):
            text = str(info_res).lower()
            if "no such key" in text:
                return None, []
            if "wrongtype" in text:
                if queue not in self._warned_wrong_type:
                    self._warned_wrong_type.add(queue)
                    log.warning("%s is not a stream: no job events for queue %s", key, queue)
                return None, []
            raise SourceError(SOURCE, f"XINFO STREAM {key}: {describe_redis_error(info_res)}")
        if isinstance(entries_res, Exception):
            raise SourceError(SOURCE, f"XRANGE {key}: {describe_redis_error(entries_res)}")
        return dict(info_res), list(entries_res or [])

    async def _read_queue(self, queue: str, cursor: Cursor, deadline: float, stats: PollStats, sink: EventSink) -> None:
        read = 0
        rereads = 0
        while read < MAX_EVENTS_PER_ROUND:
            if time.monotonic() >= deadline:
                stats.behind.append(queue)
                break
            info, entries = await self._batch(queue, next_id(cursor.last_id), deadline)
            if info is None:
                if cursor.last_id != "0-0":
                    # The stream is gone (queue obliterated, server flushed or restarted without
                    # persistence): anything written to a new stream is new.
                    log.info("event stream %s disappeared: following it again from its start", self.key(queue))
                    sink.forget(queue)
                    cursor.last_id, cursor.seq = "0-0", 0
                break
            verdict = self._check_continuity(queue, cursor, info, stats, sink)
            if verdict == "stop":
                break
            if verdict == "reread":
                rereads += 1
                if rereads > 1:
                    break
                continue
            if entries:
                stats.malformed += await sink.entries(queue, entries, deadline)
                cursor.last_id = str(entries[-1][0])
                if cursor.seq is not None:
                    cursor.seq += len(entries)
                read += len(entries)
                stats.read += len(entries)
            if len(entries) < BATCH:
                break
        else:
            stats.behind.append(queue)

    def _check_continuity(
        self, queue: str, cursor: Cursor, info: dict[str, Any], stats: PollStats, sink: EventSink
    ) -> str:
        """Count entries trimmed before we read them; detect a stream that was replaced.

        Returns "ok" (use the entries read with this info), "reread" (the cursor moved: read again) or
        "stop" (nothing more to read this round)."""
        added_raw = info.get("entries-added")
        added = int(added_raw) if added_raw is not None else None
        length = int(info.get("length") or 0)
        last_generated = str(info.get("last-generated-id") or "0-0")
        first = info.get("first-entry")
        first_id = str(first[0]) if first else None
        last = parse_id(cursor.last_id)

        if added is not None and cursor.seq is not None and added < cursor.seq:
            sink.forget(queue)
            if parse_id(last_generated) < last:
                log.warning(
                    "event stream %s went back in time (restored from an older copy?): continuing from its "
                    "current end; events in between are not counted", self.key(queue),
                )
                cursor.last_id, cursor.seq = last_generated, added
                return "stop"
            log.info("event stream %s was recreated: following it from its start", self.key(queue))
            cursor.last_id, cursor.seq = "0-0", 0
            return "reread"
        if added is None and parse_id(last_generated) < last:
            sink.forget(queue)
            log.warning("event stream %s went back in time: continuing from its current end", self.key(queue))
            cursor.last_id = last_generated
            return "stop"

        # Everything before ``first_id`` is gone; were some of those entries unread?
        gone_past_us = (first_id is None and parse_id(last_generated) > last) or (
            first_id is not None and parse_id(first_id) > last
        )
        if not gone_past_us:
            return "ok"
        if added is not None and cursor.seq is not None:
            before_first = added - length
            lost = before_first - cursor.seq
            if lost > 0:
                self.lost[queue] = self.lost.get(queue, 0) + lost
                stats.lost += lost
                log.warning(
                    "%d events on queue %s were trimmed from %s before the exporter read them: job "
                    "counters undercount", lost, queue, self.key(queue),
                )
            cursor.seq = before_first
        elif cursor.last_id != "0-0" and queue not in self._warned_no_entries_added:
            self._warned_no_entries_added.add(queue)
            log.warning(
                "event stream %s was trimmed past the last entry read; this server does not report "
                "entries-added (Redis < 7), so lost events cannot be counted", self.key(queue),
            )
        if first_id is None:
            cursor.last_id = last_generated
        return "ok"


def _left(deadline: float) -> float:
    return max(0.05, deadline - time.monotonic())


# -- blocking readers ----------------------------------------------------------------------------------


async def stream_ends(source: RedisSource, keys: Sequence[str]) -> list[str]:
    """Each stream's last generated id now ("0-0" for a key that does not exist yet, or is not a stream:
    everything that appears in it from now on is new). One pipeline of XINFO STREAM."""
    if not keys:
        return []

    async def _info(client: aioredis.Redis) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xinfo_stream(key)
            return list(await pipe.execute(raise_on_error=False))

    infos = await source.run("XINFO STREAM", _info)
    return [_last_id(info) for info in infos]


async def read_streams(
    source: RedisSource, cursors: Mapping[str, str], count: int, block_ms: int = 0
) -> dict[str, list[Entry]]:
    """Entries after each stream's cursor (exclusive), oldest first, at most ``count`` per stream, by key.

    With ``block_ms`` one XREAD waits up to that long for a first entry; the block is kept under half
    the socket timeout, or a quiet stream would look like a dead server. Raises SourceError."""
    if not cursors:
        return {}
    block = min(block_ms, int(source.timeout * 500)) if block_ms > 0 else None
    streams: dict[Any, Any] = dict(cursors)

    async def _xread(client: aioredis.Redis) -> Any:
        return await client.xread(streams, count=count, block=block)

    try:
        answer = await source.run("XREAD", _xread, (block or 0) / 1000 + source.timeout)
    except ResponseError as exc:
        raise SourceError(SOURCE, f"XREAD refused: {describe_redis_error(exc)}") from None
    return by_stream(answer, cursors)


def by_stream(answer: Any, keys: Mapping[str, Any]) -> dict[str, list[Entry]]:
    """XREAD's answer (a list of [stream, entries], or a dict under RESP3) by stream key, for the keys
    asked for; entries whose id is not a stream id are left out."""
    pairs: Sequence[Any]
    if isinstance(answer, dict):
        pairs = list(answer.items())
    elif isinstance(answer, list):
        pairs = answer
    else:
        return {}
    out: dict[str, list[Entry]] = {}
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            continue
        stream, entries = pair
        key = str(stream)
        if key not in keys or not isinstance(entries, list):
            continue
        good = [e for e in entries if isinstance(e, list | tuple) and len(e) == 2 and valid_id(e[0])]
        if good:
            out[key] = [(str(e[0]), e[1]) for e in good]
    return out


def _last_id(info: Any) -> str:
    if isinstance(info, dict):
        last = info.get("last-generated-id")
        if last and valid_id(last):
            return str(last)
    return "0-0"  # no such key (yet), or not a stream
