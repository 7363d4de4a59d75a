"""Asking Immich: one batch per request (never mixing owners), recorded in the ledger, then confirmed.

A 204 from ``POST /api/assets/jobs`` only says Immich accepted the request. ``Confirmer`` then watches
the thumbnail queue for a job naming each asset (``JobWatch``) and records the answer: the job's id, or
``not_queued``. Both ``regenerate`` and ``serve``'s remediation submit through here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from immich_thumbnail_exporter.remediation.jobwatch import Confirmation, JobWatch
from immich_thumbnail_exporter.remediation.ledger import Ledger
from immich_thumbnail_exporter.sources.immich_api import ApiError, ImmichApi
from immich_thumbnail_exporter.sources.postgres import SourceError

OTHER_OWNER = ("owned by another Immich user: Immich lets an API key regenerate only its own user's assets "
               "(run again with that user's key)")
# How often the watch is read while confirmation windows are open.
CONFIRM_POLL = 0.25


@dataclass
class Candidate:
    asset_id: str
    kinds: set[str]
    problems: str
    reset: bool = False
    owner: str | None = None


def by_owner(candidates: Sequence[Candidate], size: int) -> list[list[Candidate]]:
    """Batches that never mix owners: Immich refuses a whole request when one asset is not the key's."""
    groups: dict[str | None, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.owner, []).append(c)
    return [chunk for group in groups.values() for chunk in _chunks(group, size)]


def _chunks(items: Sequence[Candidate], n: int) -> Iterator[list[Candidate]]:
    for i in range(0, len(items), n):
        yield list(items[i : i + n])


def auth_hint(exc: ApiError) -> str:
    if exc.status == 401:
        return ": check immich.api_key (IMMICH_API_KEY)"
    if exc.status == 403:
        return ": the API key needs the job.create permission (or all permissions)"
    return ""


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


class Confirmer:
    """Did each accepted request queue a job per asset? Without Redis nothing can be confirmed.

    When Redis fails half-way, confirmation stops (``error`` says why) and the requests are still
    verified by their files: nothing is called ``not_queued`` on no evidence.
    """

    def __init__(self, watch: JobWatch | None, ledger: Ledger, window: float, max_attempts: int) -> None:
        self.watch = watch
        self.ledger = ledger
        self.window = window
        self.max_attempts = max_attempts
        self.error: str | None = None

    def _lost(self, exc: SourceError) -> None:
        if self.watch is not None:
            self.watch.forget_expected()  # windows nobody watched say nothing about a job
        self.error, self.watch = str(exc), None

    async def start(self) -> None:
        if self.watch is not None:
            try:
                await self.watch.start()
            except SourceError as exc:
                self._lost(exc)

    def accepted(self, asset_ids: Sequence[str]) -> None:
        if self.watch is not None:
            self.watch.expect(asset_ids, self.window)

    async def meanwhile(self, seconds: float) -> None:
        """Spend ``seconds`` (the rate limiter's pause) reading the watch rather than sleeping."""
        if self.watch is None or not self.watch.pending:
            if seconds > 0:
                await asyncio.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            try:
                await self.watch.poll(block=min(CONFIRM_POLL, left) if left > 0.001 else 0.0)
            except SourceError as exc:
                self._lost(exc)
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                return
            if time.monotonic() >= deadline:
                return

    async def settle(self) -> tuple[Confirmation, dict[str, str]]:
        """Wait until every accepted asset has its job or the last window ends, then record the answer.

        Returns the confirmation and, for the assets Immich queued nothing for, the ledger's outcome
        (``not_queued``, or ``gave_up`` when no attempts are left)."""
        if self.watch is None:
            return Confirmation(), {}
        try:
            while self.watch.pending:
                left = (self.watch.last_deadline() or 0.0) - time.monotonic()
                if left <= 0:
                    break
                await self.watch.poll(block=min(CONFIRM_POLL, left))
            confirmation = await self.watch.settle()  # one search of the queue for all that have no job yet
        except SourceError as exc:
            self._lost(exc)
            return Confirmation(), {}
        now = time.time()
        if confirmation.confirmed:
            self.ledger.queued(confirmation.confirmed, now)
        outcomes = self.ledger.not_queued(sorted(confirmation.not_queued), now, self.max_attempts)
        return confirmation, outcomes
