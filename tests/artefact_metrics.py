"""Metric names that the shipped alert rules and Grafana dashboard use.

``metric_names_used()`` returns every metric name the exporter must expose for the rules in
``alerts/immich-thumbnails.rules.yml`` and the queries in ``dashboards/immich-thumbnails.json`` to work.
Names are returned as written in the queries, so a histogram appears with its ``_bucket`` suffix. Series
that Prometheus makes itself (``up``) and the rule file's own recording rules are left out.

tests/test_metric_names.py checks these names against the exporter's own metric definitions
(``metrics.py``, themselves checked against the README's Metrics table); a test against a running exporter can check
them against its ``/metrics`` output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES_FILE = ROOT / "alerts" / "immich-thumbnails.rules.yml"
DASHBOARD_FILE = ROOT / "dashboards" / "immich-thumbnails.json"

# Series that Prometheus itself writes, never the exporter.
PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"})

# Keywords that look like identifiers. The label lists after the grouping ones are skipped whole.
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
# Aggregation operators may put their grouping clause before the parenthesis: `sum by (x) (...)`.
_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_KEYWORDS = _GROUPING | _AGGREGATIONS | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+)
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<space>\s+)
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_LABEL_VALUES = re.compile(r"label_values\(\s*(?P<selector>[^,]+?)\s*,\s*\w+\s*\)")


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(expr):
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
    return out


def _skip_balanced(tokens: list[tuple[str, str]], start: int, opening: str, closing: str) -> int:
    """Index just past the token that closes the bracket opened at ``tokens[start]``."""
    depth = 0
    for index in range(start, len(tokens)):
        kind, text = tokens[index]
        if kind != "punct":
            continue
        if text == opening:
            depth += 1
        elif text == closing:
            depth -= 1
            if depth == 0:
                return index + 1
    raise ValueError(f"unbalanced {opening!r} in PromQL expression")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label names, functions, keywords and durations left out)."""
    tokens = _tokens(expr)
    names: set[str] = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else ("", "")
        if kind == "punct" and text == "{":
            index = _skip_balanced(tokens, index, "{", "}")
            continue
        if kind == "punct" and text == "[":
            index = _skip_balanced(tokens, index, "[", "]")
            continue
        if kind == "ident":
            if text in _GROUPING and following == ("punct", "("):
                index = _skip_balanced(tokens, index + 1, "(", ")")
                continue
            if following == ("punct", "(") or text in _KEYWORDS:
                index += 1
                continue
            names.add(text)
        index += 1
    return names


def _load_rules(path: Path = RULES_FILE) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def recorded_names(path: Path = RULES_FILE) -> set[str]:
    """Names of the recording rules defined in the rule file."""
    return {str(rule["record"]) for rule in _load_rules(path) if "record" in rule}


def rule_metric_names(path: Path = RULES_FILE) -> set[str]:
    """Every metric name in the rule file's expressions, recording rules and Prometheus' own left out."""
    names: set[str] = set()
    for rule in _load_rules(path):
        names |= promql_metric_names(str(rule["expr"]))
    return names - recorded_names(path) - PROMETHEUS_SERIES


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_expressions(path: Path = DASHBOARD_FILE) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and variable queries."""
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    exprs = [str(t["expr"]) for p in _panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = _LABEL_VALUES.search(text)
        exprs.append(match.group("selector") if match else text)
    return exprs


def dashboard_metric_names(path: Path = DASHBOARD_FILE) -> set[str]:
    names: set[str] = set()
    for expr in dashboard_expressions(path):
        names |= promql_metric_names(expr)
    return names - PROMETHEUS_SERIES


def metric_names_used() -> set[str]:
    """Every metric name used by the shipped alert rules and dashboard."""
    return rule_metric_names() | dashboard_metric_names()
