"""Every metric the exporter can emit: name, type, labels and help, in one place.

Collections build their families through ``family()`` so that two collections feeding one metric (for
example ``immich_asset_files_missing``: ``no_record`` from the database, ``file_*`` from the disk)
agree on help text and labels, and so tests can check the dashboard and alert rules against this list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)


@dataclass(frozen=True)
class Def:
    name: str
    type: str  # gauge, counter, histogram
    labels: tuple[str, ...]
    help: str


_DEFS = [
    Def("immich_assets", "gauge", ("asset_type",),
        "Assets that should have thumbnails by Immich's own rule (not deleted, not hidden, image or video)."),
    Def("immich_asset_files_missing", "gauge", ("kind", "reason"),
        "Eligible assets whose thumbnail-type file is missing or broken, by kind and reason."),
    Def("immich_assets_thumbhash_missing", "gauge", (), "Eligible assets with no thumbhash."),
    Def("immich_assets_metadata_pending", "gauge", (),
        "Eligible assets with no asset_job_status row: Immich's Missing job never queues them."),
    Def("immich_assets_original_missing", "gauge", (),
        "Eligible assets whose original file is gone: regenerating thumbnails cannot fix them."),
    Def("immich_person_thumbnails_missing", "gauge", ("reason",),
        "Face (person) thumbnails whose person.thumbnailPath names a file that is missing or broken, by reason: "
        "Immich's Missing job never remakes them."),
    Def("immich_thumbnail_files", "gauge", ("kind",), "Thumbnail-type files on disk referenced by the database."),
    Def("immich_thumbnail_bytes", "gauge", ("kind",),
        "Bytes of thumbnail-type files on disk referenced by the database."),
    Def("immich_thumbnail_orphaned_files", "gauge", (), "Files under thumbs/ that nothing in the database references."),
    Def("immich_thumbnail_orphaned_bytes", "gauge", (),
        "Bytes of files under thumbs/ that nothing in the database references."),
    Def("immich_media_filesystem_size_bytes", "gauge", ("folder",),
        "Size of the filesystem holding each of Immich's storage folders (thumbs, upload, library, ...)."),
    Def("immich_media_filesystem_avail_bytes", "gauge", ("folder",),
        "Bytes an unprivileged writer can still use on the filesystem holding each storage folder (f_bavail)."),
    Def("immich_exporter_paths_refused", "gauge", ("kind",),
        "Database paths the exporter refused to check: outside the media location, or with '..' or empty segments."),
    Def("immich_integrity_report_entries", "gauge", ("type", "kind"),
        "Entries in Immich v3's own integrity report (table integrity_report), by type and kind of file."),
    Def("immich_integrity_report_newest_timestamp_seconds", "gauge", (),
        "Unix time of the newest entry in Immich v3's integrity report: when its check last wrote one."),
    Def("immich_queue_jobs", "gauge", ("queue", "state"), "Jobs in each BullMQ queue by state."),
    Def("immich_queue_paused", "gauge", ("queue",), "1 when the queue is paused."),
    Def("immich_queue_workers", "gauge", ("queue",), "Live workers attached to the queue."),
    Def("immich_queue_oldest_job_age_seconds", "gauge", ("queue", "state"),
        "Age of the oldest waiting or active job at scrape time."),
    Def("immich_queue_stalled_jobs", "gauge", ("queue",), "Active jobs whose worker lock is gone."),
    Def("immich_queue_orphaned_jobs", "gauge", ("queue",),
        "Waiting or active jobs naming an asset that is not in the database."),
    Def("immich_jobs_accepted", "counter", ("queue", "job_name"),
        "Jobs added to the queue, from the BullMQ event stream."),
    Def("immich_jobs_finished", "counter", ("queue", "job_name", "outcome"),
        "Jobs finished, by outcome: completed (no status reported, as Immich's processor does), success, "
        "skipped, failed (a status the server passed) or error (thrown)."),
    Def("immich_thumbnail_jobs_verified", "counter", ("queue", "job_name", "result"),
        "Finished per-asset (and face) thumbnail jobs, their asset (or person) checked in the database and on disk "
        "afterwards: written, no_effect (a file still missing or broken), asset_missing (not an asset to make "
        "thumbnails for, or no such person), not_checked (not learned in time, or check shed under load)."),
    Def("immich_job_wait_seconds", "histogram", ("queue", "job_name"), "Time from a job being added to it starting."),
    Def("immich_job_run_seconds", "histogram", ("queue", "job_name"), "Time from a job starting to it finishing."),
    Def("immich_regeneration_requests", "counter", ("result",),
        "Regeneration requests sent to Immich's API, by result."),
    Def("immich_regeneration_verified", "counter", ("result",),
        "Regeneration attempts settled, by result: fixed, still_missing (its attempt is over and a file is "
        "still missing), not_queued (Immich answered 204 and queued no job), gave_up."),
    Def("immich_server_info", "gauge", ("version", "schema"), "Immich server version and database schema era."),
    Def("immich_exporter_source_up", "gauge", ("source",), "1 when the exporter can use the source."),
    Def("immich_exporter_collection_success", "gauge", ("collection",), "1 when the collection's last run succeeded."),
    Def("immich_exporter_collection_duration_seconds", "gauge", ("collection",),
        "How long the collection's last run took."),
    Def("immich_exporter_collection_last_success_timestamp_seconds", "gauge", ("collection",),
        "Unix time of the collection's last successful run."),
    Def("immich_exporter_queue_events_lost", "counter", ("queue",),
        "Events trimmed from a queue's event stream before the exporter read them."),
    Def("immich_exporter_build_info", "gauge", ("version",), "Build information of the exporter."),
]

DEFS: dict[str, Def] = {d.name: d for d in _DEFS}


def exposed_names() -> set[str]:
    """Every sample name the exporter may expose (counters with ``_total``, histograms with suffixes)."""
    names: set[str] = set()
    for d in _DEFS:
        if d.type == "counter":
            names.add(d.name + "_total")
        elif d.type == "histogram":
            names.update(d.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(d.name)
    return names


def family(name: str) -> Metric:
    d = DEFS[name]
    if d.type == "gauge":
        return GaugeMetricFamily(d.name, d.help, labels=d.labels)
    if d.type == "counter":
        return CounterMetricFamily(d.name, d.help, labels=d.labels)
    return HistogramMetricFamily(d.name, d.help, labels=d.labels)


def gauge(name: str, samples: Iterable[tuple[Sequence[str], float]], help_suffix: str = "") -> Metric:
    """A gauge family from ``(label values, value)`` pairs."""
    d = DEFS[name]
    fam = GaugeMetricFamily(d.name, d.help + help_suffix, labels=d.labels)
    for labels, value in samples:
        fam.add_metric(list(labels), value)
    return fam


def counter(name: str, samples: Iterable[tuple[Sequence[str], float]]) -> Metric:
    d = DEFS[name]
    fam = CounterMetricFamily(d.name, d.help, labels=d.labels)
    for labels, value in samples:
        fam.add_metric(list(labels), value)
    return fam


def merge(families: Iterable[Metric]) -> list[Metric]:
    """Join families of the same name (fed by several collections) into one, keeping first-seen order."""
    out: dict[str, Metric] = {}
    for fam in families:
        have = out.get(fam.name)
        if have is None:
            copy = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            copy.samples = list(fam.samples)
            out[fam.name] = copy
        else:
            have.samples.extend(fam.samples)
    return list(out.values())
