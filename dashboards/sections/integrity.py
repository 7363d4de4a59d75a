"""Immich v3's own integrity check beside the exporter's counts (docs/immich-integrity.md).

Immich's report counts what its scheduled checks last found; the exporter's counts are its own file
check's. They differ by design (what each looks at, and when), so the row shows both and alerts on
neither. On Immich before v3.0 the report's panels show no data: its table does not exist there.
"""

from __future__ import annotations

from dashboards.builder import GREEN, INSTANCE, ORANGE, RED, Layout, stat, target, thresholds, timeseries

REPORT = f"immich_integrity_report_entries{{{INSTANCE}"
MISSING_BY_KIND = f'sum by (kind) ({REPORT},type="missing_file"}})'
OURS_BY_KIND = f'sum by (kind) (immich_asset_files_missing{{{INSTANCE},reason="file_missing"}})'
OURS_ORIGINALS = f"sum(immich_assets_original_missing{{{INSTANCE}}})"
UNTRACKED = f'sum({REPORT},type="untracked_file"}})'
OURS_ORPHANS = f"sum(immich_thumbnail_orphaned_files{{{INSTANCE}}})"
NEWEST_AGE = f"time() - max(immich_integrity_report_newest_timestamp_seconds{{{INSTANCE}}})"

DAY = 86400


def section(layout: Layout) -> None:
    layout.row("Immich's integrity check beside the exporter (Immich v3+)")
    layout.line(
        5,
        (
            9,
            stat(
                "Missing files: Immich / exporter",
                "Immich's report (type missing_file) by kind of file, beside the exporter's file_missing "
                "counts and the originals it finds gone (with checks.check_originals). Immich's counts "
                "are from its last scheduled check; the exporter's from its last file check.",
                [
                    target(MISSING_BY_KIND, "Immich {{kind}}", instant=True),
                    target(OURS_BY_KIND, "exporter {{kind}}", instant=True),
                    target(OURS_ORIGINALS, "exporter original", instant=True),
                ],
                "short",
                decimals=0,
                text_mode="value_and_name",
            ),
        ),
        (
            6,
            stat(
                "Untracked files: Immich / exporter",
                "Files no database row names. Immich's untracked_file entries cover thumbs/ and the "
                "originals' folders (upload/, library/, encoded-video/); the exporter's orphans are under "
                "thumbs/ only.",
                [
                    target(UNTRACKED, "Immich untracked", instant=True),
                    target(OURS_ORPHANS, "exporter orphans", instant=True),
                ],
                "short",
                decimals=0,
                text_mode="value_and_name",
            ),
        ),
        (
            4,
            stat(
                "Checksum mismatches (Immich)",
                "Originals whose content no longer matches the checksum Immich stored at upload: only "
                "Immich's check reads originals' content. Restore them from backup.",
                [target(f'sum({REPORT},type="checksum_mismatch"}})', "mismatches", instant=True)],
                "short",
                steps=thresholds((None, GREEN), (1, RED)),
            ),
        ),
        (
            5,
            stat(
                "Immich's newest report entry",
                "Time since Immich's integrity check last wrote an entry: an upper bound on the age of "
                "its last check that found something. No data: no entry, or Immich before v3.0.",
                [target(NEWEST_AGE, "age", instant=True)],
                "s",
                steps=thresholds((None, GREEN), (2 * DAY, ORANGE)),
            ),
        ),
    )
    layout.line(
        8,
        (
            12,
            timeseries(
                "Missing files over time: Immich and exporter",
                "Immich's missing_file entries and the exporter's file_missing counts, by kind. Immich's "
                "move in steps, when its scheduled check runs; the exporter's every file check.",
                [
                    target(MISSING_BY_KIND, "Immich {{kind}}"),
                    target(OURS_BY_KIND, "exporter {{kind}}"),
                ],
                "short",
            ),
        ),
        (
            12,
            timeseries(
                "Untracked files over time: Immich and exporter",
                "Immich's untracked_file entries (all media folders) and the exporter's orphans under "
                "thumbs/.",
                [
                    target(UNTRACKED, "Immich untracked"),
                    target(OURS_ORPHANS, "exporter orphans"),
                ],
                "short",
            ),
        ),
    )
