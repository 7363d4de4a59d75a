"""The exporter's health: its sources, collections, versions and lost queue events."""

from __future__ import annotations

from dashboards.builder import GREEN, INSTANCE, RED, Layout, stat, target, timeseries, value_mappings


def section(layout: Layout) -> None:
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
