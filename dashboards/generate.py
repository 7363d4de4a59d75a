#!/usr/bin/env python3
"""Generate the Grafana dashboard for immich-thumbnail-exporter.

The dashboard JSON is generated, never edited by hand:

    python dashboards/generate.py            # writes dashboards/immich-thumbnails.json
    python dashboards/generate.py --check    # exit 1 with a diff if the committed JSON is out of date

The panels are built in ``dashboards/sections/`` (one module per row) from the pieces in
``dashboards/builder.py``; this file assembles the rows, the variables and the dashboard's settings.
Every query uses only the metric names listed in SPEC.md; tests/test_artefacts.py checks that, the
units, the variables and that the committed file matches this generator.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: python dashboards/generate.py
    sys.path.insert(0, str(ROOT))

from dashboards.builder import DATASOURCE, INSTANCE, Json, Layout, iter_panels  # noqa: E402
from dashboards.sections import capacity, exporter, integrity, queues, regeneration, thumbnails  # noqa: E402
from scripts.generated import main as generated_main  # noqa: E402

UID = "immich-thumbnails"
TITLE = "Immich thumbnails"
OUTPUT = Path(__file__).resolve().parent / "immich-thumbnails.json"
RUNBOOKS = "https://github.com/immich-thumbnail-exporter/immich-thumbnail-exporter/blob/main/docs/runbooks.md"

# The rows, top to bottom.
SECTIONS: tuple[Callable[[Layout], None], ...] = (
    thumbnails.section,
    integrity.section,
    queues.section,
    regeneration.section,
    capacity.section,
    exporter.section,
)

__all__ = ["build_dashboard", "iter_panels", "main", "render"]


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
    for section in SECTIONS:
        section(layout)
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


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    return generated_main(
        __doc__.splitlines()[1] if __doc__ else "",
        OUTPUT,
        lambda _args: render(),
        generator="python dashboards/generate.py",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
