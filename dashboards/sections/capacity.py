"""The capacity review after a restore: room on disk, what regeneration needs, how fast it goes.

Queries are written out from the raw metrics (not the rule file's recording rules) so the row works on a
Prometheus that does not load ``alerts/immich-thumbnails.rules.yml``; they compute the same things.
"""

from __future__ import annotations

from dashboards.builder import (
    GREEN,
    INSTANCE,
    ORANGE,
    RED,
    THUMB_QUEUE,
    Layout,
    stat,
    target,
    thresholds,
    timeseries,
)

AVAIL = f"immich_media_filesystem_avail_bytes{{{INSTANCE}}}"
THUMBS_FREE = f'sum(immich_media_filesystem_avail_bytes{{{INSTANCE},folder="thumbs"}})'
# Each kind's mean file size on disk times the files of that kind missing (kinds with no file yet: 0).
NEEDED = (
    f"sum((immich_thumbnail_bytes{{{INSTANCE}}} / immich_thumbnail_files{{{INSTANCE}}} > 0)"
    f" * on (kind) sum by (kind) (immich_asset_files_missing{{{INSTANCE}}}))"
)
TIME_TO_FULL = f"min by (folder) ({AVAIL} / (-deriv({AVAIL}[6h]) > 0))"
WRITTEN_PER_MIN = (
    f'60 * sum(rate(immich_thumbnail_jobs_verified_total{{{INSTANCE},result="written"}}[$__rate_interval]))'
)
# One job regenerates every kind of an asset: the kind with the most problems is the asset count's floor.
PROBLEM_ASSETS = f"max(sum by (kind) (immich_asset_files_missing{{{INSTANCE}}}))"
WAITING = f'sum(immich_queue_jobs{{{THUMB_QUEUE},state=~"waiting|prioritized|paused|delayed"}})'
BACKLOG = f"({PROBLEM_ASSETS} + ({WAITING} or vector(0)))"
RATE_1H = f'sum(rate(immich_thumbnail_jobs_verified_total{{{INSTANCE},result="written"}}[1h]))'
ETA = f"{BACKLOG} / ({RATE_1H} > 0)"
RUN = (
    "histogram_quantile({q}, sum by (le) (rate(immich_job_run_seconds_bucket"
    f'{{{THUMB_QUEUE},job_name=~"AssetGenerateThumbnails|generate-thumbnails"}}[$__rate_interval])))'
)
FACES = f"sum by (reason) (immich_person_thumbnails_missing{{{INSTANCE}}})"

DAY = 86400


def section(layout: Layout) -> None:
    layout.row("Capacity")
    layout.line(
        5,
        (
            5,
            stat(
                "Free space under thumbs/",
                "Bytes an unprivileged writer (Immich) can still use on the filesystem holding thumbs/, "
                "like df's Avail.",
                [target(THUMBS_FREE, "free", instant=True)],
                "bytes",
                steps=thresholds((None, RED), (1 << 30, ORANGE), (10 << 30, GREEN)),
            ),
        ),
        (
            5,
            stat(
                "Needed to regenerate what is missing",
                "Each kind's mean file size on disk times the files of that kind missing: the room "
                "regenerating everything takes. Compare with the free space beside it.",
                [target(NEEDED, "needed", instant=True)],
                "bytes",
            ),
        ),
        (
            5,
            stat(
                "Thumbnails written",
                "Per-asset thumbnail jobs per minute whose files were checked and found written.",
                [target(WRITTEN_PER_MIN, "written", instant=True)],
                "opm",
                decimals=1,
            ),
        ),
        (
            5,
            stat(
                "Backlog ETA",
                "Problem assets plus waiting thumbnail jobs, divided by the last hour's written rate. "
                "No data: nothing is being written.",
                [target(ETA, "ETA", instant=True)],
                "s",
                steps=thresholds((None, GREEN), (DAY, ORANGE), (7 * DAY, RED)),
            ),
        ),
        (
            4,
            stat(
                "Thumbnail workers",
                "Live workers attached to the thumbnailGeneration queue: 0 means nothing gets written.",
                [target(f"sum(immich_queue_workers{{{THUMB_QUEUE}}})", "workers", instant=True)],
                "short",
                steps=thresholds((None, RED), (1, GREEN)),
            ),
        ),
    )
    layout.line(
        8,
        (
            8,
            timeseries(
                "Free space by storage folder",
                "Free bytes on the filesystem holding each of Immich's storage folders present under the "
                "media root. Folders on one filesystem show the same line.",
                [target(f"sum by (folder) ({AVAIL})", "{{folder}}")],
                "bytes",
            ),
        ),
        (
            8,
            timeseries(
                "Time to full by storage folder",
                "Free space divided by how fast it shrank over the last 6 hours. No line: that filesystem "
                "is not filling.",
                [target(TIME_TO_FULL, "{{folder}}")],
                "s",
            ),
        ),
        (
            8,
            timeseries(
                "Needed to regenerate vs free under thumbs/",
                "The room regenerating every missing file takes, beside the free space under thumbs/.",
                [target(NEEDED, "needed"), target(THUMBS_FREE, "free")],
                "bytes",
            ),
        ),
    )
    layout.line(
        8,
        (
            6,
            timeseries(
                "Throughput: thumbnails written per minute",
                "Per-asset thumbnail jobs per minute found written on disk and in the database afterwards.",
                [target(WRITTEN_PER_MIN, "written")],
                "opm",
            ),
        ),
        (
            6,
            timeseries(
                "Backlog",
                "Problem assets (at least the kind with the most: one job fixes every kind of an asset) "
                "and thumbnail jobs already waiting.",
                [target(PROBLEM_ASSETS, "problem assets"), target(WAITING, "waiting jobs")],
                "short",
                stack=True,
            ),
        ),
        (
            6,
            timeseries(
                "Backlog ETA",
                "Seconds until the backlog is written at the last hour's rate (the recording rule "
                "immich:thumbnail_backlog:eta_seconds computes the same).",
                [target(ETA, "ETA")],
                "s",
            ),
        ),
        (
            6,
            timeseries(
                "Thumbnail job run time per asset",
                "Time a worker spent on each per-asset thumbnail job: median and 90th percentile.",
                [target(RUN.replace("{q}", "0.5"), "p50"), target(RUN.replace("{q}", "0.9"), "p90")],
                "s",
            ),
        ),
    )
    layout.line(
        6,
        (
            18,
            timeseries(
                "Face thumbnails missing",
                "People whose face thumbnail file (person.thumbnailPath) is missing or broken, by reason. "
                "Asset jobs do not remake them: regenerate --kind person does.",
                [target(FACES, "{{reason}}")],
                "short",
                stack=True,
            ),
        ),
        (
            6,
            stat(
                "People without a face thumbnail",
                "People whose face thumbnail is missing or broken, all reasons.",
                [target(f"sum(immich_person_thumbnails_missing{{{INSTANCE}}})", "people", instant=True)],
                "short",
                steps=thresholds((None, GREEN), (1, ORANGE)),
            ),
        ),
    )
