"""Asking Immich: one batch per request (never mixing owners), recorded in the ledger, then confirmed.

A 204 from ``POST /api/assets/jobs`` only says Immich accepted the request. ``Confirmer`` then watches
the thumbnail queue for a job naming each asset (``JobWatch``) and records the answer: the job's id, or
``not_queued``. Both ``regenerate`` and ``serve``'s remediation submit through here.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from immich_thumbnail_exporter.remediation.jobwatch import Confirmation, JobWatch
from immich_thumbnail_exporter.remediation.ledger import Claim, Ledger, LedgerError
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError, ApiError, ImmichApi
from immich_thumbnail_exporter.sources.postgres import SourceError

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
    """What one batch came to. ``result``: ``none`` (nothing could be claimed), else ``sent``."""

    result: str
    submitted: list[str]
    # What stopped the batch: a rejected key (401/403), an API that could not answer (5xx, network).
    error: ApiError | None = None
    # Assets Immich refused on their own (400 once isolated) -> Immich's message.
    refused: dict[str, str] = field(default_factory=dict)
    # Requests sent, by ``immich_regeneration_requests_total{result}``.
    requests: Counter[str] = field(default_factory=Counter)
    # The ledger could not record an answer (disk full): the requests sent so far are in ``submitted``.
    ledger_error: str | None = None
    # When the claim was recorded (wall clock, as the ledger keeps it).
    claimed_at: float = 0.0
    # The asset ids of each request Immich accepted, in order.
    accepted_requests: list[list[str]] = field(default_factory=list)

    def merge(self, later: BatchOutcome) -> BatchOutcome:
        """This outcome followed by ``later`` (the same batch, retried after an error)."""
        return BatchOutcome(
            later.result if later.result != "none" else self.result,
            [*self.submitted, *later.submitted],
            later.error,
            {**self.refused, **later.refused},
            self.requests + later.requests,
            later.ledger_error,
            later.claimed_at or self.claimed_at,
            [*self.accepted_requests, *later.accepted_requests],
        )


def immich_message(exc: ApiError) -> str:
    """Immich's own words in an API error (``Not found or no asset.update access``)."""
    text = str(exc)
    marker = f"HTTP {exc.status}: "
    return text.split(marker, 1)[1] if exc.status is not None and marker in text else text


def _refusal(exc: ApiError) -> bool:
    """A 400 that names the request's assets: Immich refuses the whole request for one of them."""
    return exc.status == 400 and not isinstance(exc, ApiAuthError)


async def submit_batch(
    api: ImmichApi,
    ledger: Ledger,
    kinds: Mapping[str, Iterable[str]],
    *,
    max_attempts: int,
    reset: Iterable[str] = (),
    pace: Callable[[], Awaitable[None]] | None = None,
) -> BatchOutcome:
    """Claim the assets in the ledger, ask Immich, and record the answer.

    The claim is written before the first request: an interruption leaves the assets "submitting",
    which the next run treats as submitted (verified later, never resubmitted early). A request Immich
    refuses with 400 (one asset it will not touch sinks the whole request) is split in halves, again and
    again, until each refused asset stands alone: the others are accepted as usual, each refused one is
    released with Immich's message. A request refused or failed for any other reason stops the batch;
    what it named is released and does not count as an attempt. No asset is named in two accepted
    requests: a refused request queued nothing. ``pace`` is awaited before every request (the rate
    limit).
    """
    now = time.time()
    claims = ledger.claim(kinds, now, max_attempts, reset)
    out = BatchOutcome("none", [], claimed_at=now)
    if not claims:
        return out
    out.result = "sent"
    try:
        await _send(api, ledger, {c.asset_id: c for c in claims}, out, pace)
    except LedgerError as exc:
        # What was sent is in ``submitted``; its claims are recorded (verified later, never resent early).
        out.ledger_error = str(exc)
    return out


async def _send(
    api: ImmichApi,
    ledger: Ledger,
    by_id: dict[str, Claim],
    out: BatchOutcome,
    pace: Callable[[], Awaitable[None]] | None,
) -> None:
    groups: list[list[str]] = [list(by_id)]
    while groups:
        group = groups.pop(0)
        if pace is not None:
            await pace()
        try:
            await asyncio.wait_for(api.regenerate_thumbnails(group), api.config.timeout + 5)
        except ApiError as exc:
            out.requests[request_result(exc)] += 1
            if _refusal(exc) and len(group) > 1:
                half = len(group) // 2
                groups[:0] = [group[:half], group[half:]]
                continue
            if _refusal(exc):
                out.refused[group[0]] = immich_message(exc)
                ledger.release([by_id[group[0]]], "refused", immich_message(exc), time.time())
                continue
            out.error = exc
        except TimeoutError:
            out.requests["error"] += 1
            out.error = ApiError(f"POST /api/assets/jobs: no answer within {api.config.timeout:.0f}s")
        else:
            out.requests["accepted"] += 1
            out.submitted.extend(group)
            out.accepted_requests.append(list(group))
            ledger.accepted(group, time.time())
            continue
        # Stopped: release what this request and the rest of the batch named.
        rest = [a for g in (group, *groups) for a in g]
        assert out.error is not None
        result = request_result(out.error)
        ledger.release([by_id[a] for a in rest], result, str(out.error), time.time())
        return


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
