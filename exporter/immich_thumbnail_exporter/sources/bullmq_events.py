"""BullMQ's event streams (``<prefix>:<queue>:events``): stream ids, cursors, and what a stream's
``XINFO STREAM`` says about the entries between two reads.

BullMQ appends every state change to a Redis stream, trimmed to about 10,000 entries. The one reader
(``sources/bullmq_reader.py``) follows each stream from the last id it read (exclusive); this module
holds the pure parts it relies on, so there is one parse of a stream id and one continuity rule:

**Trimmed streams**: when the oldest entry still in the stream is newer than the last one read, entries
were trimmed before they were read. Valkey 7+/Redis 7+ report ``entries-added`` (every entry ever
added), so the gap is exact (``lost``). Older servers do not, and the loss is then logged but not
counted. Each batch is read as ``MULTI; XINFO STREAM; XRANGE; EXEC`` (reads only) so the stream's
length and the entries agree.

**Replaced streams**: a stream that was recreated (FLUSHALL, a restart without persistence: fewer
entries ever added than we already read) is followed from its start; one that went back in time
(restored from an older copy: its newest id below our cursor) from its current end. Either way every
job id learned from the old stream is void.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# One stream entry as redis-py gives it: (id, fields). Fields are whatever the writer put there.
Entry = tuple[str, Any]

START = "0-0"


def parse_id(entry_id: str) -> tuple[int, int]:
    """A stream id ``<ms>-<seq>`` as a pair; raises ValueError when it is not one."""
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


def at_or_after(entry_id: str, other: str) -> bool:
    return parse_id(entry_id) >= parse_id(other)


@dataclass
class Cursor:
    last_id: str
    # Entries ever added to the stream up to and including ``last_id`` (None: the server does not say).
    seq: int | None


def cursor_at_end(info: Any) -> Cursor:
    """Where a stream ends now (``XINFO STREAM``'s answer; an error or None: no stream yet, all of it new)."""
    if not isinstance(info, dict):
        return Cursor(START, 0)
    last = info.get("last-generated-id")
    added = info.get("entries-added")
    return Cursor(str(last) if last and valid_id(last) else START, int(added) if added is not None else None)


# What ``continuity`` tells the reader to do with the entries read alongside the info.
OK, REREAD, STOP = "ok", "reread", "stop"


@dataclass(frozen=True)
class Continuity:
    verdict: str  # OK: use the entries; REREAD: the cursor moved, read again; STOP: nothing more now
    lost: int = 0  # entries trimmed before they were read (counted only when the server says)
    replaced: bool = False  # the stream is a new one: job ids learned from the old one are void


def continuity(key: str, cursor: Cursor, info: Mapping[str, Any], warned: set[str]) -> Continuity:
    """Compare a stream's ``XINFO STREAM`` with our cursor, move the cursor where needed, and say what
    happened. ``warned``: keys already warned about a server that does not count entries."""
    added_raw = info.get("entries-added")
    added = int(added_raw) if added_raw is not None else None
    length = int(info.get("length") or 0)
    last_generated = str(info.get("last-generated-id") or START)
    first = info.get("first-entry")
    first_id = str(first[0]) if first else None
    last = parse_id(cursor.last_id)

    if added is not None and cursor.seq is not None and added < cursor.seq:
        if parse_id(last_generated) < last:
            log.warning("event stream %s went back in time (restored from an older copy?): continuing from its "
                        "current end; events in between are not counted", key)
            cursor.last_id, cursor.seq = last_generated, added
            return Continuity(STOP, replaced=True)
        log.info("event stream %s was recreated: following it from its start", key)
        cursor.last_id, cursor.seq = START, 0
        return Continuity(REREAD, replaced=True)
    if added is None and parse_id(last_generated) < last:
        log.warning("event stream %s went back in time: continuing from its current end", key)
        cursor.last_id = last_generated
        return Continuity(STOP, replaced=True)

    # Everything before ``first_id`` is gone; were some of those entries unread?
    gone_past_us = (first_id is None and parse_id(last_generated) > last) or (
        first_id is not None and parse_id(first_id) > last
    )
    if not gone_past_us:
        return Continuity(OK)
    lost = 0
    if added is not None and cursor.seq is not None:
        before_first = added - length
        lost = max(0, before_first - cursor.seq)
        if lost:
            log.warning("%d events were trimmed from %s before the exporter read them: job counters undercount",
                        lost, key)
        cursor.seq = before_first
    elif cursor.last_id != START and key not in warned:
        warned.add(key)
        log.warning("event stream %s was trimmed past the last entry read; this server does not report "
                    "entries-added (Redis < 7), so lost events cannot be counted", key)
    if first_id is None:
        cursor.last_id = last_generated
    return Continuity(OK, lost=lost)


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
