#!/usr/bin/env python3
"""Generate the Grafana dashboard for immich-thumbnail-exporter.

The dashboard JSON is generated, never edited by hand:

    python dashboards/generate.py            # writes dashboards/immich-thumbnails.json
    python dashboards/generate.py --check    # exit 1 if the committed JSON is out of date

Plain dictionaries, no dependencies beyond the standard library. Every query uses only the metric names
listed in SPEC.md; tests/test_artefacts.py checks that, the units, the variables and that the committed
file matches this generator.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

UID = "immich-thumbnails"
TITLE = "Immich thumbnails"
OUTPUT = Path(__file__).resolve().parent / "immich-thumbnails.json"
RUNBOOKS = "https://github.com/immich-thumbnail-exporter/immich-thumbnail-exporter/blob/main/docs/runbooks.md"

Json = dict[str, Any]

DATASOURCE: Json = {"type": "prometheus", "uid": "${datasource}"}
INSTANCE = 'instance="$instance"'
THUMB_QUEUE = f'{INSTANCE},queue="thumbnailGeneration"'
QUEUES = f'{INSTANCE},queue=~"$queue"'

GREEN = "green"
ORANGE = "orange"
RED = "red"


# --- building blocks -----------------------------------------------------------------------------------


def target(expr: str, legend: str = "", *, instant: bool = False) -> Json:
    """A Prometheus query; refIds are assigned by the panel."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
    }


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for value, color in steps]}


def value_mappings(mapping: dict[int, tuple[str, str]]) -> list[Json]:
    return [
        {
            "type": "value",
            "options": {
                str(value): {"color": color, "index": index, "text": text}
                for index, (value, (text, color)) in enumerate(sorted(mapping.items()))
            },
        }
    ]


def _with_refids(targets: list[Json]) -> list[Json]:
    return [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)]


def timeseries(
    title: str,
    description: str,
    targets: list[Json],
    unit: str,
    *,
    stack: bool = False,
    min_value: float | None = 0,
    max_value: float | None = None,
    decimals: int | None = None,
    legend_calcs: tuple[str, ...] = ("lastNotNull", "max"),
) -> Json:
    defaults: Json = {
        "color": {"mode": "palette-classic"},
        "custom": {
            "axisPlacement": "auto",
            "drawStyle": "line",
            "fillOpacity": 25 if stack else 10,
            "gradientMode": "none",
            "lineInterpolation": "linear",
            "lineWidth": 1,
            "pointSize": 4,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"group": "A", "mode": "normal" if stack else "none"},
        },
        "unit": unit,
    }
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "calcs": list(legend_calcs),
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": _with_refids(targets),
    }


def stat(
    title: str,
    description: str,
    targets: list[Json],
    unit: str,
    *,
    steps: Json | None = None,
    mappings: list[Json] | None = None,
    decimals: int | None = None,
    color_mode: str = "value",
    text_mode: str = "auto",
) -> Json:
    defaults: Json = {
        "color": {"mode": "thresholds"},
        "mappings": mappings or [],
        "thresholds": steps or thresholds((None, GREEN)),
        "unit": unit,
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "colorMode": color_mode,
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showPercentChange": False,
            "textMode": text_mode,
            "wideLayout": True,
        },
        "targets": _with_refids(targets),
    }


class Layout:
    """Places panels left to right in rows of 24 columns and numbers them."""

    def __init__(self) -> None:
        self.panels: list[Json] = []
        self._y = 0
        self._id = 0

    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def row(self, title: str) -> None:
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
                "id": self._next_id(),
                "panels": [],
            }
        )
        self._y += 1

    def line(self, height: int, *items: tuple[int, Json]) -> None:
        if sum(width for width, _ in items) != 24:
            raise ValueError(f"panel widths must add up to 24: {[p['title'] for _, p in items]}")
        x = 0
        for width, panel in items:
            placed = {"id": self._next_id(), "gridPos": {"h": height, "w": width, "x": x, "y": self._y}}
            placed.update(panel)
            self.panels.append(placed)
            x += width
        self._y += height


# --- panels ----------------------------------------------------------------------------------------------

COVERAGE = f"1 - sum by (kind) (immich_asset_files_missing{{{INSTANCE}}}) / scalar(sum(immich_assets{{{INSTANCE}}}))"


def thumbnails_section(layout: Layout) -> None:
    layout.row("Thumbnails")
    layout.line(
        5,
        (
            8,
            stat(
                "Coverage",
                "Share of assets that have a usable file of each kind: 1 - missing / assets. "
                "Fullsize files exist only for RAW and other web-unsupported originals, so its share is "
                "of all assets too.",
                [target(COVERAGE, "{{kind}}", instant=True)],
                "percentunit",
                decimals=2,
                steps=thresholds((None, RED), (0.99, ORANGE), (0.9999, GREEN)),
                text_mode="value_and_name",
            ),
        ),
        (
            4,
            stat(
                "Assets",
                "Assets that should have thumbnails, by Immich's own rule.",
                [target(f"sum by (asset_type) (immich_assets{{{INSTANCE}}})", "{{asset_type}}", instant=True)],
                "short",
                text_mode="value_and_name",
            ),
        ),
        (
            4,
            stat(
                "Missing files",
                "Thumbnail, preview and fullsize files missing, empty, corrupt or unreadable, all reasons.",
                [target(f"sum(immich_asset_files_missing{{{INSTANCE}}})", "missing", instant=True)],
                "short",
                steps=thresholds((None, GREEN), (1, RED)),
            ),
        ),
        (
            4,
            stat(
                "Originals missing",
                "Assets whose original file is gone. Regeneration cannot fix them: restore from backup.",
                [target(f"sum(immich_assets_original_missing{{{INSTANCE}}})", "originals", instant=True)],
                "short",
                steps=thresholds((None, GREEN), (1, RED)),
            ),
        ),
        (
            4,
            stat(
                "Metadata pending",
                'Assets with no asset_job_status row: Immich\'s "Missing" button never queues them.',
                [target(f"sum(immich_assets_metadata_pending{{{INSTANCE}}})", "pending", instant=True)],
                "short",
                steps=thresholds((None, GREEN), (1, ORANGE)),
            ),
        ),
    )
    layout.line(
        8,
        (
            12,
            timeseries(
                "Coverage by kind",
                "1 - missing / assets, per kind of generated file.",
                [target(COVERAGE, "{{kind}}")],
                "percentunit",
                min_value=None,
                max_value=1,
                decimals=2,
                legend_calcs=("lastNotNull", "min"),
            ),
        ),
        (
            12,
            timeseries(
                "Problems by reason",
                "Missing generated files by kind and reason (no_record, file_missing, file_empty, "
                "file_corrupt, file_unreadable).",
                [
                    target(
                        f"sum by (kind, reason) (immich_asset_files_missing{{{INSTANCE}}})",
                        "{{kind}} / {{reason}}",
                    )
                ],
                "short",
                stack=True,
            ),
        ),
    )
    layout.line(
        8,
        (
            8,
            timeseries(
                "Other asset problems",
                "Assets without a thumbhash, without metadata extraction, or without their original.",
                [
                    target(f"sum(immich_assets_thumbhash_missing{{{INSTANCE}}})", "thumbhash missing"),
                    target(f"sum(immich_assets_metadata_pending{{{INSTANCE}}})", "metadata pending"),
                    target(f"sum(immich_assets_original_missing{{{INSTANCE}}})", "original missing"),
                ],
                "short",
            ),
        ),
        (
            8,
            timeseries(
                "Thumbnail storage",
                "Bytes on disk per kind, and bytes under thumbs/ that nothing in the database references "
                "(no data with checks.file_sizes: false, which reads no sizes).",
                [
                    target(f"sum by (kind) (immich_thumbnail_bytes{{{INSTANCE}}})", "{{kind}}"),
                    target(f"sum(immich_thumbnail_orphaned_bytes{{{INSTANCE}}})", "orphaned"),
                ],
                "bytes",
            ),
        ),
        (
            8,
            timeseries(
                "Thumbnail files",
                "Files on disk per kind, and files under thumbs/ that nothing in the database references.",
                [
                    target(f"sum by (kind) (immich_thumbnail_files{{{INSTANCE}}})", "{{kind}}"),
                    target(f"sum(immich_thumbnail_orphaned_files{{{INSTANCE}}})", "orphaned"),
                ],
                "short",
            ),
        ),
    )


def queues_section(layout: Layout) -> None:
    layout.row("Job queues")
    layout.line(
        4,
        (
            4,
            stat(
                "Thumbnail jobs waiting",
                "Jobs waiting on the thumbnailGeneration queue (waiting and prioritized).",
                [
                    target(
                        f'sum(immich_queue_jobs{{{THUMB_QUEUE},state=~"waiting|prioritized"}})',
                        "waiting",
                        instant=True,
                    )
                ],
                "short",
            ),
        ),
        (
            4,
            stat(
                "Thumbnail jobs active",
                "Jobs a worker has taken on the thumbnailGeneration queue.",
                [target(f'sum(immich_queue_jobs{{{THUMB_QUEUE},state="active"}})', "active", instant=True)],
                "short",
            ),
        ),
        (
            4,
            stat(
                "Thumbnail workers",
                "Live workers attached to the thumbnailGeneration queue.",
                [target(f"sum(immich_queue_workers{{{THUMB_QUEUE}}})", "workers", instant=True)],
                "short",
                steps=thresholds((None, RED), (1, GREEN)),
            ),
        ),
        (
            4,
            stat(
                "Oldest waiting thumbnail job",
                "Age of the oldest waiting job on the thumbnailGeneration queue.",
                [
                    target(
                        f'max(immich_queue_oldest_job_age_seconds{{{THUMB_QUEUE},state="waiting"}})',
                        "age",
                        instant=True,
                    )
                ],
                "s",
                steps=thresholds((None, GREEN), (900, ORANGE), (3600, RED)),
            ),
        ),
        (
            4,
            stat(
                "Stalled thumbnail jobs",
                "Active jobs whose worker lock is gone.",
                [target(f"sum(immich_queue_stalled_jobs{{{THUMB_QUEUE}}})", "stalled", instant=True)],
                "short",
                steps=thresholds((None, GREEN), (1, RED)),
            ),
        ),
        (
            4,
            stat(
                "Thumbnail queue",
                "Whether the thumbnailGeneration queue is paused.",
                [target(f"max(immich_queue_paused{{{THUMB_QUEUE}}})", "paused", instant=True)],
                "none",
                mappings=value_mappings({0: ("running", GREEN), 1: ("paused", ORANGE)}),
                color_mode="background",
            ),
        ),
    )
    layout.line(
        8,
        (
            12,
            timeseries(
                "Queue depth by state",
                "Jobs per queue and state. Completed jobs are removed at once, so completed stays near 0.",
                [
                    target(
                        f"sum by (queue, state) (immich_queue_jobs{{{QUEUES}}})",
                        "{{queue}} {{state}}",
                    )
                ],
                "short",
            ),
        ),
        (
            12,
            timeseries(
                "Accepted vs finished (jobs per second)",
                "Jobs added to each queue against jobs that finished, by outcome. Accepted well above "
                "finished for long means the queue is not keeping up or is stuck.",
                [
                    target(
                        f"sum by (queue) (rate(immich_jobs_accepted_total{{{QUEUES}}}[$__rate_interval]))",
                        "{{queue}} accepted",
                    ),
                    target(
                        f"sum by (queue, outcome) (rate(immich_jobs_finished_total{{{QUEUES}}}[$__rate_interval]))",
                        "{{queue}} finished {{outcome}}",
                    ),
                ],
                "ops",
            ),
        ),
    )
    layout.line(
        8,
        (
            8,
            timeseries(
                "Oldest job age",
                "Age of the oldest waiting and active job per queue.",
                [
                    target(
                        f"max by (queue, state) (immich_queue_oldest_job_age_seconds{{{QUEUES}}})",
                        "{{queue}} {{state}}",
                    )
                ],
                "s",
            ),
        ),
        (
            8,
            timeseries(
                "Workers",
                "Live workers attached to each queue.",
                [target(f"sum by (queue) (immich_queue_workers{{{QUEUES}}})", "{{queue}}")],
                "short",
                decimals=0,
            ),
        ),
        (
            8,
            timeseries(
                "Stalled and orphaned jobs",
                "Stalled: active jobs whose worker lock is gone. Orphaned: jobs naming assets that are not "
                "in the database (expected after a restore; harmless).",
                [
                    target(f"sum by (queue) (immich_queue_stalled_jobs{{{QUEUES}}})", "{{queue}} stalled"),
                    target(f"sum by (queue) (immich_queue_orphaned_jobs{{{QUEUES}}})", "{{queue}} orphaned"),
                ],
                "short",
            ),
        ),
    )
    layout.line(
        8,
        (
            8,
            timeseries(
                "Verified thumbnail jobs (per second)",
                "What each finished thumbnail job left behind, checked on disk and in the database: written, "
                "no_effect (a file still missing or broken), asset_missing (not in the database: expected "
                "after a restore), not_checked (asset not learned in time, or shed under load). Immich "
                "reports no status of its own, so this is the only place a job without effect shows.",
                [
                    target(
                        "sum by (queue, result) "
                        f"(rate(immich_thumbnail_jobs_verified_total{{{QUEUES}}}[$__rate_interval]))",
                        "{{queue}} {{result}}",
                    )
                ],
                "ops",
            ),
        ),
        (
            8,
            timeseries(
                "Job wait time",
                "Time from added to taken by a worker: median and 90th percentile.",
                [
                    target(
                        "histogram_quantile(0.5, sum by (queue, le) "
                        f"(rate(immich_job_wait_seconds_bucket{{{QUEUES}}}[$__rate_interval])))",
                        "{{queue}} p50",
                    ),
                    target(
                        "histogram_quantile(0.9, sum by (queue, le) "
                        f"(rate(immich_job_wait_seconds_bucket{{{QUEUES}}}[$__rate_interval])))",
                        "{{queue}} p90",
                    ),
                ],
                "s",
            ),
        ),
        (
            8,
            timeseries(
                "Job run time",
                "Time from taken by a worker to finished: median and 90th percentile.",
                [
                    target(
                        "histogram_quantile(0.5, sum by (queue, le) "
                        f"(rate(immich_job_run_seconds_bucket{{{QUEUES}}}[$__rate_interval])))",
                        "{{queue}} p50",
                    ),
                    target(
                        "histogram_quantile(0.9, sum by (queue, le) "
                        f"(rate(immich_job_run_seconds_bucket{{{QUEUES}}}[$__rate_interval])))",
                        "{{queue}} p90",
                    ),
                ],
                "s",
            ),
        ),
    )


def regeneration_section(layout: Layout) -> None:
    layout.row("Regeneration")
    layout.line(
        8,
        (
            8,
            timeseries(
                "Regeneration requests (per second)",
                "Requests the exporter sent to Immich to regenerate thumbnails, by result.",
                [
                    target(
                        f"sum by (result) (rate(immich_regeneration_requests_total{{{INSTANCE}}}[$__rate_interval]))",
                        "{{result}}",
                    )
                ],
                "ops",
            ),
        ),
        (
            8,
            timeseries(
                "Regeneration verified (per second)",
                "Regenerated assets checked on disk afterwards: fixed, still missing, or given up.",
                [
                    target(
                        f"sum by (result) (rate(immich_regeneration_verified_total{{{INSTANCE}}}[$__rate_interval]))",
                        "{{result}}",
                    )
                ],
                "ops",
            ),
        ),
        (
            8,
            stat(
                "Regeneration in the selected range",
                "Requests and verification results over the dashboard's time range.",
                [
                    target(
                        f"sum by (result) (increase(immich_regeneration_requests_total{{{INSTANCE}}}[$__range]))",
                        "requests {{result}}",
                        instant=True,
                    ),
                    target(
                        f"sum by (result) (increase(immich_regeneration_verified_total{{{INSTANCE}}}[$__range]))",
                        "verified {{result}}",
                        instant=True,
                    ),
                ],
                "short",
                decimals=0,
                text_mode="value_and_name",
            ),
        ),
    )


def exporter_section(layout: Layout) -> None:
    layout.row("Exporter")
    layout.line(
        4,
        (
            8,
            stat(
                "Sources",
                "Whether the exporter reaches each source. Metrics fed only by a source that is down are "
                "dropped, not shown stale.",
                [target(f"immich_exporter_source_up{{{INSTANCE}}}", "{{source}}", instant=True)],
                "none",
                mappings=value_mappings({0: ("down", RED), 1: ("up", GREEN)}),
                color_mode="background",
                text_mode="value_and_name",
            ),
        ),
        (
            8,
            stat(
                "Last collection",
                "Whether each collection's last round succeeded.",
                [target(f"immich_exporter_collection_success{{{INSTANCE}}}", "{{collection}}", instant=True)],
                "none",
                mappings=value_mappings({0: ("failed", RED), 1: ("ok", GREEN)}),
                color_mode="background",
                text_mode="value_and_name",
            ),
        ),
        (
            8,
            stat(
                "Versions",
                "Exporter version, and the Immich version and schema era it detected.",
                [
                    target(
                        f"max by (version) (immich_exporter_build_info{{{INSTANCE}}})",
                        "exporter {{version}}",
                        instant=True,
                    ),
                    target(
                        f"max by (version, schema) (immich_server_info{{{INSTANCE}}})",
                        "Immich {{version}} ({{schema}})",
                        instant=True,
                    ),
                ],
                "none",
                text_mode="name",
            ),
        ),
    )
    layout.line(
        8,
        (
            8,
            timeseries(
                "Collection duration",
                "How long each collection's last round took.",
                [
                    target(
                        f"immich_exporter_collection_duration_seconds{{{INSTANCE}}}",
                        "{{collection}}",
                    )
                ],
                "s",
            ),
        ),
        (
            8,
            timeseries(
                "Time since last successful collection",
                "Seconds since each collection last succeeded.",
                [
                    target(
                        f"time() - immich_exporter_collection_last_success_timestamp_seconds{{{INSTANCE}}}",
                        "{{collection}}",
                    )
                ],
                "s",
            ),
        ),
        (
            8,
            timeseries(
                "Queue events lost (per second)",
                "Job events trimmed from Redis before the exporter read them: accepted and finished "
                "counts undercount while this is above zero.",
                [
                    target(
                        "sum by (queue) "
                        f"(rate(immich_exporter_queue_events_lost_total{{{INSTANCE}}}[$__rate_interval]))",
                        "{{queue}}",
                    )
                ],
                "ops",
            ),
        ),
    )


def templating() -> Json:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "includeAll": False,
                "multi": False,
                "options": [],
                "refresh": 1,
                "regex": "",
            },
            {
                "name": "instance",
                "label": "Instance",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": "label_values(immich_exporter_build_info, instance)",
                "query": "label_values(immich_exporter_build_info, instance)",
                "current": {},
                "hide": 0,
                "includeAll": False,
                "multi": False,
                "options": [],
                "refresh": 2,
                "regex": "",
                "sort": 1,
            },
            {
                "name": "queue",
                "label": "Queue",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": f"label_values(immich_queue_jobs{{{INSTANCE}}}, queue)",
                "query": f"label_values(immich_queue_jobs{{{INSTANCE}}}, queue)",
                "current": {"selected": True, "text": ["thumbnailGeneration"], "value": ["thumbnailGeneration"]},
                "hide": 0,
                "includeAll": True,
                "multi": True,
                "options": [],
                "refresh": 2,
                "regex": "",
                "sort": 1,
            },
        ]
    }


def build_dashboard() -> Json:
    layout = Layout()
    thumbnails_section(layout)
    queues_section(layout)
    regeneration_section(layout)
    exporter_section(layout)
    return {
        "uid": UID,
        "title": TITLE,
        "description": "Missing Immich thumbnails and previews, the thumbnail job queue, regeneration and "
        "the exporter's own health (immich-thumbnail-exporter).",
        "tags": ["immich", "immich-thumbnail-exporter"],
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "refresh": "1m",
        "schemaVersion": 39,
        "version": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "title": "Runbooks",
                "type": "link",
                "url": RUNBOOKS,
                "icon": "doc",
                "targetBlank": True,
                "asDropdown": False,
                "includeVars": False,
                "keepTime": False,
                "tags": [],
                "tooltip": "What each alert means and how to fix it",
            }
        ],
        "templating": templating(),
        "panels": layout.panels,
    }


def iter_panels(dashboard: Json) -> Iterator[Json]:
    """All panels, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python dashboards/generate.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
