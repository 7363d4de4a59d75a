"""Immich's BullMQ queues: depth, age, workers, stalls, and the job event streams."""

from __future__ import annotations

from dashboards.builder import (
    GREEN,
    ORANGE,
    QUEUES,
    RED,
    THUMB_QUEUE,
    Layout,
    stat,
    target,
    thresholds,
    timeseries,
    value_mappings,
)


def section(layout: Layout) -> None:
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
                "Failed share",
                "Share of finished jobs whose outcome was failed or error.",
                [
                    target(
                        "sum by (queue) (rate(immich_jobs_finished_total"
                        f'{{{QUEUES},outcome=~"failed|error"}}[$__rate_interval]))'
                        " / sum by (queue) (rate(immich_jobs_finished_total"
                        f"{{{QUEUES}}}[$__rate_interval]))",
                        "{{queue}}",
                    )
                ],
                "percentunit",
                max_value=1,
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
