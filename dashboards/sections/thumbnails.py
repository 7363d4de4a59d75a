"""What the database and the disk say about each asset's generated files."""

from __future__ import annotations

from dashboards.builder import GREEN, INSTANCE, ORANGE, RED, Layout, stat, target, thresholds, timeseries

COVERAGE = f"1 - sum by (kind) (immich_asset_files_missing{{{INSTANCE}}}) / scalar(sum(immich_assets{{{INSTANCE}}}))"


def section(layout: Layout) -> None:
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
