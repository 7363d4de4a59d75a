"""The golden ``/metrics`` (``metrics.prom``): every family the exporter defines, as a scrape shows it.

A real exporter run on a seeded Immich (``tests/test_golden.py``) gives the inventory and file-check
families. The families that run does not produce (queues, job events, verification, remediation, the
integrity report, and any metric added to ``metrics.py`` since) get made-up values here, and all of it
is rendered through the real path: one ``Store`` holding every collection's result, and the ``/metrics``
handler's registry and encoder. Values that depend on the time, the version, and the process' own
metrics are normalised.

Regenerate after adding or changing a metric, and review the diff::

    python -m tests.golden        # or: make golden

A metric added to ``metrics.py`` gets one made-up sample per label set below (``LABEL_EXAMPLES``, else
``example``); give it realistic samples in ``EXAMPLES`` and the collection it belongs to in
``COLLECTION_OF``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from immich_thumbnail_exporter import __version__
from immich_thumbnail_exporter.collectors.integrity import integrity_families
from immich_thumbnail_exporter.exposition.http import build_registry
from immich_thumbnail_exporter.metrics import DEFS, family
from immich_thumbnail_exporter.sources.integrity import IntegrityReport
from immich_thumbnail_exporter.store import SOURCES, Part, Result, Store

GOLDEN = Path(__file__).with_name("metrics.prom")

# Every collection ``serve`` runs with everything enabled, in its order, and the sources each reads.
COLLECTIONS: dict[str, frozenset[str]] = {
    "inventory": frozenset({"postgres"}),
    "files": frozenset({"postgres", "filesystem"}),
    "capacity": frozenset({"filesystem"}),
    "queues": frozenset({"redis"}),
    "job_verification": frozenset({"redis", "postgres", "filesystem"}),
    "remediation": frozenset({"postgres", "immich_api", "filesystem"}),
}
# Which collection produces a made-up family, by name prefix (first match); the rest go to "files".
COLLECTION_OF = (
    ("immich_integrity_report_", "inventory"),
    ("immich_media_filesystem_", "capacity"),
    ("immich_queue_", "queues"),
    ("immich_jobs_", "queues"),
    ("immich_job_", "queues"),
    ("immich_exporter_queue_events_lost", "queues"),
    ("immich_thumbnail_jobs_verified", "job_verification"),
    ("immich_regeneration_", "remediation"),
)

THUMBS, JOB = "thumbnailGeneration", "AssetGenerateThumbnails"
# Made-up samples: label values in the definition's label order, and a value (histograms: bucket counts
# for le 1, 10 and +Inf, then the sum).
Sample = tuple[tuple[str, ...], float | tuple[float, float, float, float]]
EXAMPLES: dict[str, list[Sample]] = {
    "immich_queue_jobs": [((THUMBS, "waiting"), 10), ((THUMBS, "active"), 2), ((THUMBS, "failed"), 1)],
    "immich_queue_paused": [((THUMBS,), 0)],
    "immich_queue_workers": [((THUMBS,), 1)],
    "immich_queue_oldest_job_age_seconds": [((THUMBS, "waiting"), 120), ((THUMBS, "active"), 3)],
    "immich_queue_stalled_jobs": [((THUMBS,), 0)],
    "immich_queue_orphaned_jobs": [((THUMBS,), 1)],
    "immich_jobs_accepted": [((THUMBS, JOB), 12)],
    "immich_jobs_finished": [((THUMBS, JOB, "completed"), 9), ((THUMBS, JOB, "failed"), 1)],
    "immich_thumbnail_jobs_verified": [((THUMBS, JOB, "written"), 8), ((THUMBS, JOB, "no_effect"), 1),
                                       ((THUMBS, JOB, "not_checked"), 1)],
    "immich_job_wait_seconds": [((THUMBS, JOB), (4, 9, 10, 31.5))],
    "immich_job_run_seconds": [((THUMBS, JOB), (8, 10, 10, 6.25))],
    "immich_regeneration_requests": [(("accepted",), 5), (("rejected",), 1)],
    "immich_regeneration_verified": [(("fixed",), 3), (("still_missing",), 1), (("not_queued",), 1)],
    "immich_exporter_queue_events_lost": [((THUMBS,), 0)],
}
LABEL_EXAMPLES = {
    "queue": THUMBS, "job_name": JOB, "state": "waiting", "kind": "thumbnail", "reason": "file_missing",
    "result": "written", "outcome": "completed", "asset_type": "image", "type": "missing_file",
    "source": "postgres", "collection": "files", "folder": "thumbs",
}
INTEGRITY = IntegrityReport({("missing_file", "thumbnail"): 4, ("missing_file", "original"): 1,
                             ("untracked_file", "unknown"): 6}, newest=1_785_400_000.0)

TIME_DEPENDENT = re.compile(
    r"^(immich_exporter_collection_duration_seconds|immich_exporter_collection_last_success_timestamp_seconds"
    r"|immich_queue_oldest_job_age_seconds"
    # Not time but the machine: the free space of the disk the test's media folder is on.
    r"|immich_media_filesystem_size_bytes|immich_media_filesystem_avail_bytes)(\{.*\})? .*$"
)


def collection_of(name: str) -> str:
    return next((c for prefix, c in COLLECTION_OF if name.startswith(prefix)), "files")


def made_up(name: str) -> Metric:
    """The family ``name`` with its made-up samples."""
    d = DEFS[name]
    fam = family(name)
    samples: Sequence[Sample] = EXAMPLES.get(name) or [
        (tuple(LABEL_EXAMPLES.get(label, "example") for label in d.labels), 1.0)]
    for labels, value in samples:
        if isinstance(fam, HistogramMetricFamily):
            assert isinstance(value, tuple)
            le1, le10, total, sum_value = value
            fam.add_metric(list(labels), [("1.0", le1), ("10.0", le10), ("+Inf", total)], sum_value)
        else:
            assert not isinstance(value, tuple)
            fam.add_metric(list(labels), float(value))  # type: ignore[attr-defined]
    return fam


def complete(real: Store) -> Store:
    """A store holding the real run's results, and made-up results for every family they lack."""
    store = Store(COLLECTIONS, SOURCES)
    for source in SOURCES:
        store.set_source(source, True)
    now = time.time()  # not before the sources came up: a result older than that is not shown
    produced = {fam.name for name in real.collections if (res := real.result(name))
                for part in res.parts for fam in part.families}
    extra: dict[str, list[Metric]] = {}
    if "immich_integrity_report_entries" not in produced:
        extra["inventory"] = list(integrity_families(INTEGRITY))
        produced |= {fam.name for fam in extra["inventory"]}
    for name in DEFS:
        if name not in produced and name not in _STORE_OWN:
            extra.setdefault(collection_of(name), []).append(made_up(name))
    for name, needs in COLLECTIONS.items():
        res = real.result(name)
        parts = res.parts if res is not None else ()
        if extra.get(name):
            parts = (*parts, Part(needs, tuple(extra[name])))
        if res is None:
            res = Result(name, True, 1.0, now, parts)
        store.publish(replace(res, parts=parts, finished_at=now))
    return store


# The store writes these itself, from the results' and sources' states.
_STORE_OWN = frozenset({
    "immich_exporter_build_info", "immich_exporter_source_up", "immich_exporter_collection_success",
    "immich_exporter_collection_duration_seconds", "immich_exporter_collection_last_success_timestamp_seconds",
})


def render(store: Store) -> str:
    """The store as ``/metrics`` renders it (the handler's registry and default encoder), normalised."""
    encoder, _ = choose_encoder("")
    return normalise(encoder(build_registry(store)).decode())


def normalise(text: str) -> str:
    """Drop the process' own metrics; zero what depends on the clock; name no version."""
    out = []
    for line in text.splitlines():
        if _name(line).startswith(("process_", "python_")):
            continue
        m = TIME_DEPENDENT.match(line)
        if m:
            line = f"{m.group(1)}{m.group(2) or ''} 0"
        out.append(line.replace(f'version="{__version__}"', 'version="VERSION"'))
    return "\n".join(out) + "\n"


def _name(line: str) -> str:
    return line.split(" ")[2] if line.startswith("#") else line.split("{")[0].split(" ")[0]

