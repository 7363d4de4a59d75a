"""The ``remediation`` collection: ``serve``'s opt-in regeneration (``remediation.enabled``), its counters.

The work is ``remediation/rounds.py``; this module turns a round into an ``Outcome``:
``immich_regeneration_requests_total{result}`` and ``immich_regeneration_verified_total{result}``.

A ledger that cannot be written (a full disk: "database or disk is full") fails the collection on every
round until a write succeeds, the short follow-up rounds included: each round that writes nothing tries
one small write while the last one failed (``Ledger.probe``).
"""

from __future__ import annotations

import logging

from prometheus_client.core import Metric

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import ProblemFeed
from immich_thumbnail_exporter.metrics import counter
from immich_thumbnail_exporter.remediation.ledger import Ledger, LedgerError
from immich_thumbnail_exporter.remediation.rounds import FOLLOW_UP, Remediator, RoundResult
from immich_thumbnail_exporter.sources.health import SourceStates
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.sources.schema import SchemaError
from immich_thumbnail_exporter.store import Part
from immich_thumbnail_exporter.vocabulary import REQUEST_RESULTS, VERIFIED_RESULTS

log = logging.getLogger(__name__)


class RemediationCollection:
    name = "remediation"
    # Its counters are shown while these are up.
    needs = frozenset({"immich_api", "postgres"})

    def __init__(self, config: Config, pg: PostgresSource, feed: ProblemFeed | None = None) -> None:
        """``feed``: the files collection's problems; None when there is none (a scan of its own then)."""
        self.config = config
        # The targeted check reads the database and the media folder; the queue when Redis is configured.
        self.sources = frozenset({"postgres", "immich_api", "filesystem", *(["redis"] if config.redis.enabled else [])})
        self.remediator = Remediator(config, pg, feed)
        self.last: RoundResult | None = None
        rem = config.remediation
        submit_time = rem.max_per_round / rem.batch_size / rem.requests_per_second
        own_scan = float(config.intervals.files) if feed is None else 0.0
        self.timeout = max(float(rem.interval), own_scan) + submit_time + float(rem.confirm_within) + 60.0
        self.interval = float(rem.interval)
        self.states = SourceStates(log, "remediation")
        self.rounds = 0  # rounds finished, whatever their outcome (tests wait on it)

    def _pace(self) -> None:
        """Every few seconds while requests await verification, else ``remediation.interval``."""
        every = float(self.config.remediation.interval)
        self.interval = min(every, FOLLOW_UP) if self.remediator.in_flight else every

    @property
    def requests(self) -> dict[str, int]:
        return dict(self.remediator.requests)

    @property
    def verified(self) -> dict[str, int]:
        return dict(self.remediator.verified)

    def families(self) -> tuple[Metric, ...]:
        requests, verified = self.remediator.requests, self.remediator.verified
        return (
            counter("immich_regeneration_requests", [((r,), float(requests[r])) for r in REQUEST_RESULTS]),
            counter("immich_regeneration_verified", [((r,), float(verified[r])) for r in VERIFIED_RESULTS]),
        )

    @property
    def ledger(self) -> Ledger | None:
        return self.remediator.ledger

    async def collect(self) -> Outcome:
        sources: dict[str, bool | str] = {}
        error: str | None = None
        try:
            self.last = await self.remediator.round()
            sources, error = self.last.sources, self.last.error
        except (SourceError, SchemaError) as exc:
            failure = self.states.failed(exc)
            if failure.source is not None and failure.state is not None:
                sources[failure.source] = failure.state
            elif isinstance(exc, SchemaError):
                sources["postgres"] = str(exc)
            error = failure.error
        except LedgerError as exc:
            error = str(exc)
        self._pace()
        self.rounds += 1
        return Outcome((Part(self.needs, self.families()),), sources, error)

    async def close(self) -> None:
        await self.remediator.close()
