"""Why an asset is still broken after Immich accepted a request to regenerate it, as far as the exporter
can see: where its job is in the queue (waiting with no worker, paused, stalled, running), whether it
finished without writing the files, or whether there is no job at all.

``explain`` is pure (the words); ``diagnose`` reads the queue for a set of assets and explains each.
The codes are ``vocabulary.WHY``; the reports, the ledger and the logs all use these sentences.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from immich_thumbnail_exporter.remediation.jobwatch import JobSeen, JobWatch
from immich_thumbnail_exporter.remediation.ledger import AWAITING, Entry
from immich_thumbnail_exporter.scan.verdict import AssetVerdict
from immich_thumbnail_exporter.sources import bullmq_queue
from immich_thumbnail_exporter.sources.bullmq_queue import JobState, QueueHealth
from immich_thumbnail_exporter.sources.postgres import SourceError
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.vocabulary import THUMBNAIL_QUEUE

NOT_QUEUED = "Immich answered 204 but queued nothing"
# Why an asset is skipped rather than submitted.
SKIP_TEXT = {
    "original_missing": "the original file is missing: regeneration cannot work; restore it from a backup",
    "not_in_database": "asset not in the database",
    "not_eligible": "asset is trashed or hidden: Immich makes no thumbnails for it",
    "invalid_id": "not a valid asset id",
    "file_unreadable": "the exporter cannot read the file (permissions, or a symlink out of the media "
    "folder): regeneration would not change that",
    "queued": "already waiting in the thumbnail queue",
    "nothing_to_fix": "nothing to fix: checked again, all files present",
    "locked": "in Immich's locked folder: an API key cannot reach it (no PIN session); regenerate it from "
    "the locked folder in Immich, with the PIN",
    "other_owner": "owned by another Immich user: Immich lets an API key regenerate only its own user's "
    "assets (run again with that user's key)",
    "refused": "Immich refused it",
    "original_corrupt": "the original file is corrupt: regeneration cannot work; restore it from a backup",
    "original_unreadable": "the original file cannot be read: regeneration cannot work",
    "original_checksum_mismatch": "the original file is not the one Immich stored (its checksum differs): "
    "restore it from a backup",
    "no_face": "the person has no feature face: Immich has nothing to crop its thumbnail from",
}
# What the ledger keeps as the reason an attempt was given up.
GIVE_UP_TEXT = {
    "not_in_database": "asset not in the database",
    "original_missing": "original file is missing",
    "original_corrupt": "original file is corrupt",
    "original_unreadable": "original file cannot be read",
    "original_checksum_mismatch": "original file is not the one Immich stored",
    "no_face": "the person has no feature face",
}


def skip_text(reason: str, chk: AssetVerdict | None = None, *, short: bool = False) -> str:
    """The sentence for a decision's reason (``decision.REASONS``) about an asset checked as ``chk``."""
    if short:
        return GIVE_UP_TEXT.get(reason, reason)
    if reason == "original_missing" and chk is not None and chk.original_path:
        return f"{SKIP_TEXT['original_missing']} ({chk.original_path})"
    if reason == "reason_not_submitted":
        reasons = sorted({r for _, r, _ in chk.problems}) if chk is not None else []
        return "; ".join(SKIP_TEXT.get(r, f"{r} is not submitted (name it with --reason)") for r in reasons)
    return SKIP_TEXT.get(reason, reason)


@dataclass(frozen=True)
class Why:
    code: str  # one of vocabulary.WHY
    text: str


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def not_queued() -> Why:
    return Why("not_queued", NOT_QUEUED)


def _workers(health: QueueHealth) -> str:
    if health.workers is None:
        return "live workers unknown (the server refuses CLIENT LIST)"
    return f"{health.workers} live worker(s)"


def explain(state: JobState | None, seen: JobSeen | None, health: QueueHealth | None, now: float) -> Why:
    """One asset's reason, from its job's state now (None: no job), what the stream showed of it, and
    its queue's health."""
    # Finished jobs say when (a clock time: the sentence is kept in the ledger and read later).
    if seen is not None and seen.finished_at is not None:
        if seen.outcome == "failed":
            why = f": {seen.failed_reason}" if seen.failed_reason else ""
            return Why("job_failed", f"its job failed at {clock(seen.finished_at)}{why}")
        return Why("no_effect", f"Immich ran its job (finished at {clock(seen.finished_at)}) and the files are "
                                "still missing")
    if state is None:
        return Why("no_job", f"no job names it in the {THUMBNAIL_QUEUE} queue")
    added = f"{ago(now - state.added_ms / 1000)}" if state.added_ms is not None else "an unknown time"
    where = f", position {state.position} of {state.of}" if state.position is not None else ""
    if state.state in ("waiting", "prioritized", "paused"):
        if (health is not None and health.paused) or state.state == "paused":
            return Why("queue_paused", f"the {THUMBNAIL_QUEUE} queue is paused: its job has waited {added}{where}")
        if health is not None and health.workers == 0:
            return Why("no_worker", f"its job has waited {added}{where} in {THUMBNAIL_QUEUE}, "
                                    "which has no live worker")
        detail = f", {_workers(health)}" if health is not None else ""
        return Why("job_waiting", f"its job has waited {added}{where} in {THUMBNAIL_QUEUE}{detail}")
    if state.state == "delayed":
        return Why("job_delayed", f"its job waits for a retry after an error (added {added} ago)")
    if state.state == "active":
        started = ago(now - state.started_ms / 1000) if state.started_ms is not None else "an unknown time"
        if state.locked is False and state.finished_ms is None:
            return Why("job_stalled", f"its job is active but stalled: no worker holds its lock "
                                      f"(started {started} ago)")
        return Why("job_active", f"its job is running (started {started} ago)")
    if state.state == "failed":
        reason = f": {state.failed_reason}" if state.failed_reason else ""
        when = f" at {clock(state.finished_ms / 1000)}" if state.finished_ms is not None else ""
        return Why("job_failed", f"its job failed{when}{reason}")
    if state.state == "completed" and state.finished_ms is not None:
        return Why("no_effect", f"Immich ran its job (finished at {clock(state.finished_ms / 1000)}) "
                                "and the files are still missing")
    return Why("no_effect", "its job has left the queue (Immich removes finished jobs) and the files are "
                            "still missing")


async def diagnose(
    source: RedisSource | None,
    prefix: str,
    jobs: Mapping[str, str | None],
    watch: JobWatch | None = None,
) -> dict[str, Why]:
    """Explain each asset (asset -> its latest known job id, or None) from the queue as it is now."""
    if not jobs:
        return {}
    if source is None:
        why = Why("queue_unknown", "Redis is not configured: the exporter cannot see Immich's queue")
        return dict.fromkeys(jobs, why)
    try:
        health = await bullmq_queue.queue_health(source, prefix)
        known = {a: j for a, j in jobs.items() if j}
        unknown = [a for a, j in jobs.items() if not j]
        if unknown:
            view = await bullmq_queue.queued_assets(source, prefix)
            for a in unknown:
                if a in view.assets:
                    known[a] = view.assets[a].job_id
        states = await bullmq_queue.job_states(source, prefix, known.values())
    except SourceError as exc:
        why = Why("queue_unknown", f"the queue could not be read: {exc}")
        return dict.fromkeys(jobs, why)
    now = time.time()
    out: dict[str, Why] = {}
    for a in jobs:
        job_id = known.get(a)
        seen = watch.job_of(a) if watch is not None else None
        if seen is not None and seen.job_id != job_id:
            seen = None
        state = states.get(job_id) if job_id else None
        out[a] = explain(state, seen, health, now)
    return out


def attempt_over(entry: Entry | None, watch: JobWatch | None) -> tuple[bool, Why | None]:
    """Is an asset's latest attempt known to be over before its window is: no job was queued for it, or
    its job finished? With the job's outcome as the reason (None when it is not over, or not queued)."""
    if entry is None:
        return False, None
    if entry.state == "not_queued":
        return True, None
    job = watch.job_of(entry.asset_id) if watch is not None else None
    # A job seen before this attempt's request belongs to an earlier attempt.
    if job is None or job.finished_at is None or job.added_at < (entry.last_submitted or 0.0) - 1.0:
        return False, None
    return True, explain(None, job, None, time.time())


async def attempt_reasons(
    broken: Sequence[Entry], watch: JobWatch | None, source: RedisSource | None, prefix: str, due: Collection[str]
) -> dict[str, tuple[bool, Why | None]]:
    """For assets verified still broken: is each one's attempt over, and why is it still broken?

    An attempt is over when its job finished (the watch says how) or once its window has passed (``due``:
    the assets whose window has, by ``decision.RetryClock``); for the latter the queue is read, once for
    all of them, to say where the job is.
    """
    out: dict[str, tuple[bool, Why | None]] = {}
    ask: dict[str, str | None] = {}
    for e in broken:
        over, why = attempt_over(e, watch)
        out[e.asset_id] = (over, why)
        if why is None and e.state in AWAITING and e.asset_id in due:
            ask[e.asset_id] = e.job_id
    if ask:
        for a, why in (await diagnose(source, prefix, ask, watch)).items():
            out[a] = (out[a][0], why)
    return out
