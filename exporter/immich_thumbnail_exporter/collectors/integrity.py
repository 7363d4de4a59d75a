"""Immich v3's integrity report as metric families, read in the inventory round.

The families ride in the inventory's part (source ``postgres``), so they vanish with it when PostgreSQL
is down. Where the table does not exist they are never produced. Where it exists but cannot be read (a
missing ``GRANT SELECT ON integrity_report``, a statement timeout) one warning is logged, not one per
round, and the rest of the inventory is still published; the warning comes back if the problem returns
after a successful read.
"""

from __future__ import annotations

import logging

from prometheus_client.core import Metric

from immich_thumbnail_exporter.metrics import gauge
from immich_thumbnail_exporter.sources import integrity
from immich_thumbnail_exporter.sources.integrity import IntegrityReport
from immich_thumbnail_exporter.sources.postgres import PostgresSource, QueryError
from immich_thumbnail_exporter.sources.schema import has_integrity_report
from immich_thumbnail_exporter.vocabulary import INTEGRITY_SERIES

log = logging.getLogger(__name__)


def integrity_families(report: IntegrityReport) -> list[Metric]:
    """
    immich_integrity_report_entries{type="missing_file",kind="preview"} 2
    immich_integrity_report_entries{type="untracked_file",kind="unknown"} 5
    immich_integrity_report_newest_timestamp_seconds 1.7854e+09

    Every type Immich writes has its usual kinds shown, at 0 when none was reported, so that "Immich
    found none" and "no report here" look different; kinds seen beyond those (encoded_video, sidecar...)
    are added as found. The timestamp is left out while the report is empty.
    """
    entries = dict.fromkeys(INTEGRITY_SERIES, 0) | report.entries
    fams = [gauge("immich_integrity_report_entries", [((t, k), float(n)) for (t, k), n in entries.items()])]
    if report.newest is not None:
        fams.append(gauge("immich_integrity_report_newest_timestamp_seconds", [((), report.newest)]))
    return fams


class IntegrityReader:
    """Reads the report for the inventory collection, and remembers whether it already warned."""

    def __init__(self, pg: PostgresSource, timeout: float) -> None:
        self.pg = pg
        self.timeout = timeout
        self._warned = False

    async def families(self) -> list[Metric]:
        if (await self.pg.schema()).files != "asset_file":
            return []  # the table came with Immich v3, long after the singular names (v1.136)
        try:
            async with self.pg.connection() as conn:
                # Asked each round, not taken from the cached schema: an upgrade to v3 adds the table.
                if not await has_integrity_report(conn, self.timeout):
                    return []
                report = await integrity.read(conn, self.timeout)
        except QueryError as exc:
            # The server answered: PostgreSQL is up, only this table is out of reach.
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot read Immich's integrity report (%s): its series are left out; "
                    "GRANT SELECT ON integrity_report TO the exporter's role to show them", exc
                )
            return []
        if self._warned:
            log.info("Immich's integrity report is readable again")
            self._warned = False
        return integrity_families(report)
