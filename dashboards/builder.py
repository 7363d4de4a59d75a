"""The pieces the dashboard is built from: queries, panels and the layout that places them.

Plain dictionaries shaped as Grafana's dashboard JSON (schema version 39); no dependencies beyond the
standard library. Sections (``dashboards/sections/``) use these; ``dashboards/generate.py`` assembles them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Json = dict[str, Any]

DATASOURCE: Json = {"type": "prometheus", "uid": "${datasource}"}
INSTANCE = 'instance="$instance"'
THUMB_QUEUE = f'{INSTANCE},queue="thumbnailGeneration"'
QUEUES = f'{INSTANCE},queue=~"$queue"'

GREEN = "green"
ORANGE = "orange"
RED = "red"


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


def iter_panels(dashboard: Json) -> Iterator[Json]:
    """All panels, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])
