"""Moved: the thumbnail queue's reads live in ``sources/bullmq_queue.py`` (``scan`` uses them too).

Kept as names only, for code that still imports them from here: ``output/`` may import ``remediation``
but not ``sources``, so ``output/scan_report.py`` reads ``Throughput`` through this module.
"""

from immich_thumbnail_exporter.sources.bullmq_queue import (
    JobState,
    QueuedJob,
    QueueHealth,
    QueueView,
    Throughput,
    job_assets,
    job_states,
    queue_health,
    queued_assets,
    throughput,
    thumbnail_throughput,
)

__all__ = [
    "JobState", "QueueHealth", "QueueView", "QueuedJob", "Throughput", "job_assets", "job_states",
    "queue_health", "queued_assets", "throughput", "thumbnail_throughput",
]
