"""The exporter's own regeneration requests and what their verification found."""

from __future__ import annotations

from dashboards.builder import INSTANCE, Layout, stat, target, timeseries


def section(layout: Layout) -> None:
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
                "Regeneration attempts settled: fixed, still missing, not queued (Immich answered 204 and "
                "queued nothing), or given up.",
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
