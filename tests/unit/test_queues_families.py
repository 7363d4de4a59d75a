"""Every family the queues, job_events and job_verification collections produce, from made-up data.

No servers: BullMQ's samples, stream entries and finished jobs are written out here, and each table row
says what the families must show. The event reader's pure parts (the one parse of an entry, the one
job map, the continuity rule) and its subscribers are driven the same way.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from prometheus_client.core import Metric

from immich_thumbnail_exporter.collectors.job_events import MAX_JOB_NAMES, UNKNOWN, JobCounters, outcome_of
from immich_thumbnail_exporter.collectors.job_verification import Limits, Verifier, verdict, verified_samples
from immich_thumbnail_exporter.collectors.queues import (
    AgeFamilies,
    age_seconds,
    api_families,
    oldest_jobs,
    orphans_family,
    queue_families,
)
from immich_thumbnail_exporter.config import load_config
from immich_thumbnail_exporter.metrics import counter
from immich_thumbnail_exporter.scan.verdict import PersonVerdict
from immich_thumbnail_exporter.sources.bullmq import JobHash, QueueSample
from immich_thumbnail_exporter.sources.bullmq_events import OK, REREAD, STOP, Cursor, continuity, parse_id
from immich_thumbnail_exporter.sources.bullmq_follow import ASSET, PERSON, FinishedJob, JobFollower
from immich_thumbnail_exporter.sources.bullmq_jobs import JobMap, job_events, needs_hash
from immich_thumbnail_exporter.sources.bullmq_reader import EventReader
from immich_thumbnail_exporter.sources.immich_api import QueueStats
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.vocabulary import THUMBNAIL_JOBS_BY_QUEUE, VERIFY_RESULTS

Q = "thumbnailGeneration"
JOB = "AssetGenerateThumbnails"
A1, A2 = str(uuid.uuid4()), str(uuid.uuid4())
PERSON_ID = str(uuid.uuid4())


def flat(fams: Iterable[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams for s in f.samples}


def at(fams: Iterable[Metric], name: str, **labels: str) -> float | None:
    return flat(fams).get((name, tuple(sorted(labels.items()))))


def entry(ms: int, seq: int = 0, **fields: str) -> tuple[str, dict[str, str]]:
    return f"{ms}-{seq}", fields


def config() -> Any:
    return load_config(None, environ={"DB_URL": "postgresql://x@127.0.0.1/x", "REDIS_URL": "redis://127.0.0.1:1/0"})


# -- queues ----------------------------------------------------------------------------------------


def sample(**kw: Any) -> QueueSample:
    s = QueueSample()
    for k, v in kw.items():
        setattr(s, k, v)
    return s


QUEUE_ROWS = [
    # (samples, workers, expected samples)
    ({Q: sample(counts={"waiting": 3, "active": 1, "failed": 2}, paused=False, stalled=1)}, {Q: 2}, {
        ("immich_queue_jobs", (("queue", Q), ("state", "waiting"))): 3.0,
        ("immich_queue_jobs", (("queue", Q), ("state", "active"))): 1.0,
        ("immich_queue_jobs", (("queue", Q), ("state", "failed"))): 2.0,
        ("immich_queue_jobs", (("queue", Q), ("state", "completed"))): 0.0,
        ("immich_queue_paused", (("queue", Q),)): 0.0,
        ("immich_queue_stalled_jobs", (("queue", Q),)): 1.0,
        ("immich_queue_workers", (("queue", Q),)): 2.0,
    }),
    # CLIENT LIST refused: no workers family at all (unknown is not 0).
    ({Q: sample(paused=True)}, None, {
        ("immich_queue_paused", (("queue", Q),)): 1.0,
        ("immich_queue_jobs", (("queue", Q), ("state", "paused"))): 0.0,
    }),
    # A queue with no worker connected: 0, shown.
    ({Q: sample(), "editor": sample(counts={"prioritized": 5})}, {}, {
        ("immich_queue_workers", (("queue", Q),)): 0.0,
        ("immich_queue_workers", (("queue", "editor"),)): 0.0,
        ("immich_queue_jobs", (("queue", "editor"), ("state", "prioritized"))): 5.0,
    }),
]


@pytest.mark.parametrize(("samples", "workers", "expected"), QUEUE_ROWS)
def test_queue_families(samples: dict[str, QueueSample], workers: dict[str, int] | None,
                        expected: dict[Any, float]) -> None:
    got = flat(queue_families(sorted(samples), samples, workers))
    for key, value in expected.items():
        assert got[key] == value, key
    assert any(k[0] == "immich_queue_workers" for k in got) is (workers is not None)
    assert len([k for k in got if k[0] == "immich_queue_jobs"]) == 7 * len(samples)  # every state, every queue


AGE_ROWS = [
    # (timestamp ms, scrape time, age): wall-clock ms from BullMQ; never negative.
    (None, 1000.0, 0.0),
    (990_000, 1000.0, 10.0),
    (1_005_000, 1000.0, 0.0),  # a clock stepped back (or Immich's ahead of ours): clamped, not negative
    (1_000_000, 1000.0, 0.0),
]


@pytest.mark.parametrize(("ms", "now", "age"), AGE_ROWS)
def test_oldest_job_age_is_never_negative(ms: int | None, now: float, age: float) -> None:
    assert age_seconds(ms, now) == age
    samples = {Q: sample(oldest_waiting_ms=ms, oldest_active_ms=ms)}
    fams = list(AgeFamilies(oldest_jobs([Q], samples))(now))
    assert at(fams, "immich_queue_oldest_job_age_seconds", queue=Q, state="waiting") == age
    assert at(fams, "immich_queue_oldest_job_age_seconds", queue=Q, state="active") == age


@pytest.mark.parametrize(("orphaned", "sampled", "help_says_sampled"), [
    ({Q: 2}, None, False), ({}, 200, True),
])
def test_orphaned_jobs_family(orphaned: dict[str, int], sampled: int | None, help_says_sampled: bool) -> None:
    fam = orphans_family([Q], orphaned, sampled)
    assert at([fam], "immich_queue_orphaned_jobs", queue=Q) == float(orphaned.get(Q, 0))
    assert ("Sampled: at most 200" in fam.documentation) is help_says_sampled


def test_api_families_have_the_same_labels() -> None:
    fams = api_families([QueueStats("b", True, {"waiting": 4, "bogus": 1}), QueueStats("a", False, {})])
    assert at(fams, "immich_queue_jobs", queue="b", state="waiting") == 4.0
    assert at(fams, "immich_queue_paused", queue="b") == 1.0 and at(fams, "immich_queue_paused", queue="a") == 0.0
    assert not [k for k in flat(fams) if ("state", "bogus") in k[1]]


# -- the reader's one parse, and the job counters ------------------------------------------------------


def count(entries: Sequence[tuple[str, Any]], hashes: dict[str, JobHash] | None = None,
          jobs: JobMap | None = None) -> tuple[JobCounters, int, JobMap]:
    jobs = jobs if jobs is not None else JobMap()
    counters = JobCounters()
    events, malformed = job_events(Q, entries, jobs, hashes or {})
    counters.deliver(events)
    return counters, malformed, jobs


COUNTER_ROWS = [
    # (entries, hashes, accepted, finished {(job, outcome): n}, wait count, run count, malformed)
    ([entry(1000, event="added", jobId="1", name=JOB), entry(3000, event="active", jobId="1"),
      entry(3500, event="completed", jobId="1", returnvalue="null")],
     {}, {JOB: 1}, {(JOB, "completed"): 1}, 1, 1, 0),
    ([entry(1000, event="added", jobId="1", name=JOB), entry(1001, event="active", jobId="1"),
      entry(1002, event="completed", jobId="1", returnvalue='"success"'),
      entry(1003, event="added", jobId="2", name=JOB), entry(1004, event="active", jobId="2"),
      entry(1005, event="failed", jobId="2", failedReason="boom")],
     {}, {JOB: 2}, {(JOB, "success"): 1, (JOB, "error"): 1}, 2, 2, 0),
    # Added before we started: its hash (read by the reader) names it and says when it was added.
    ([entry(5000, event="active", jobId="7"), entry(6000, event="completed", jobId="7")],
     {"7": JobHash(JOB, A1, timestamp=4000)}, {}, {(JOB, "completed"): 1}, 1, 1, 0),
    # Gone before anyone read it: unknown, no duration.
    ([entry(6000, event="completed", jobId="8", returnvalue="not json")],
     {"8": JobHash(None, None)}, {}, {(UNKNOWN, "completed"): 1}, 0, 0, 0),
    # Malformed: no event field, a finish without jobId; unknown event types are skipped, not malformed.
    ([entry(1, no="event"), entry(2, event="completed", returnvalue='"success"'), entry(3, event="new", jobId="1")],
     {}, {}, {}, 0, 0, 2),
]


@pytest.mark.parametrize(("entries", "hashes", "accepted", "finished", "waits", "runs", "malformed"), COUNTER_ROWS)
def test_job_counter_families(entries: list[tuple[str, Any]], hashes: dict[str, JobHash], accepted: dict[str, int],
                              finished: dict[tuple[str, str], int], waits: int, runs: int, malformed: int) -> None:
    counters, bad, _ = count(entries, hashes)
    assert bad == malformed
    fams = counters.families({Q: 3})
    for job, n in accepted.items():
        assert at(fams, "immich_jobs_accepted_total", queue=Q, job_name=job) == n
    got_finished = {(dict(k[1])["job_name"], dict(k[1])["outcome"]): v for k, v in flat(fams).items()
                    if k[0] == "immich_jobs_finished_total"}
    assert got_finished == finished
    assert (at(fams, "immich_job_wait_seconds_count", queue=Q, job_name=JOB) or 0) == waits
    assert (at(fams, "immich_job_run_seconds_count", queue=Q, job_name=JOB) or 0) == runs
    assert at(fams, "immich_exporter_queue_events_lost_total", queue=Q) == 3


def test_wait_and_run_times_come_from_the_entry_ids() -> None:
    counters, _, _ = count([entry(1000, event="added", jobId="1", name=JOB), entry(3500, event="active", jobId="1"),
                            entry(3600, event="active", jobId="1"), entry(4600, event="completed", jobId="1")])
    assert counters.wait[(Q, JOB)].sum == 2.5  # added -> first active
    assert counters.run[(Q, JOB)].sum == 1.0  # last active -> finished


@pytest.mark.parametrize(("returnvalue", "outcome"), [
    (None, "completed"), ("null", "completed"), ('"success"', "success"), ('"SKIPPED"', "skipped"),
    ('"failed"', "failed"), ('{"not": "a status"}', "completed"), ("[[[", "completed"),
])
def test_outcome_of(returnvalue: str | None, outcome: str) -> None:
    assert outcome_of(returnvalue) == outcome


def test_job_names_stay_bounded() -> None:
    entries = [entry(i + 1, event="added", jobId=str(i), name=f"Job{i}") for i in range(MAX_JOB_NAMES + 10)]
    counters, _, _ = count(entries)
    assert len(counters.accepted) == MAX_JOB_NAMES + 1
    assert counters.accepted[(Q, UNKNOWN)] == 10


def test_the_one_job_map_is_bounded() -> None:
    jobs = JobMap(limit=5)
    count([entry(i + 1, event="added", jobId=str(i), name=JOB) for i in range(12)], jobs=jobs)
    assert len(jobs) == 5 and jobs.evicted == 7


@pytest.mark.parametrize(("entries", "known", "wanted", "expected"), [
    # A wanted job just added: its data; an unwanted one: nothing.
    ([entry(1, event="added", jobId="1", name=JOB), entry(2, event="added", jobId="2", name="Other")], {}, {JOB},
     ["1"]),
    # Starts or ends without its ``added`` seen: its name and times.
    ([entry(1, event="active", jobId="3"), entry(2, event="completed", jobId="4")], {}, set(), ["3", "4"]),
    # Added in this very batch, then active: nothing more to read for an unwanted name.
    ([entry(1, event="added", jobId="5", name="Other"), entry(2, event="active", jobId="5")], {}, {JOB}, []),
    # Read ahead already (from the head of the queue): not read again.
    ([entry(1, event="added", jobId="6", name=JOB)], {"6"}, {JOB}, []),
])
def test_which_hashes_the_reader_reads(entries: list[tuple[str, Any]], known: set[str], wanted: set[str],
                                       expected: list[str]) -> None:
    jobs = JobMap()
    for job_id in known:
        job_events(Q, [entry(0, event="active", jobId=job_id)], jobs, {job_id: JobHash(JOB, A1, timestamp=1)})
    assert needs_hash(Q, entries, jobs, lambda name: name in wanted) == expected


# -- continuity: one check, for every subscriber -----------------------------------------------------


def info(added: int | None, length: int, last: str, first: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"length": length, "last-generated-id": last, "first-entry": [first, {}] if first else None}
    if added is not None:
        doc["entries-added"] = added
    return doc


@pytest.mark.parametrize(("cursor", "doc", "verdict", "lost", "replaced", "after"), [
    (Cursor("10-0", 10), info(12, 12, "12-0", "1-0"), OK, 0, False, "10-0"),  # nothing lost
    (Cursor("10-0", 10), info(30, 4, "30-0", "27-0"), OK, 16, False, "10-0"),  # 16 trimmed unread
    (Cursor("10-0", 10), info(16, 0, "16-0", None), OK, 6, False, "16-0"),  # all trimmed: to the end
    (Cursor("10-0", 10), info(2, 2, "50-0", "49-0"), REREAD, 0, True, "0-0"),  # recreated (FLUSHALL)
    (Cursor("10-0", 10), info(5, 5, "5-0", "1-0"), STOP, 0, True, "5-0"),  # went back in time
    (Cursor("10-0", None), info(None, 3, "5-0", "3-0"), STOP, 0, True, "5-0"),  # back in time, Redis < 7
])
def test_continuity(cursor: Cursor, doc: dict[str, Any], verdict: str, lost: int, replaced: bool, after: str) -> None:
    got = continuity("k", cursor, doc, set())
    assert (got.verdict, got.lost, got.replaced, cursor.last_id) == (verdict, lost, replaced, after)


@pytest.mark.parametrize("bad", ["", "x-1", "1-x", "-"])
def test_stream_ids_are_parsed_one_way(bad: str) -> None:
    assert parse_id("1700000000000-3") == (1700000000000, 3) and parse_id("5") == (5, 0)
    with pytest.raises(ValueError):
        parse_id(bad)


# -- job verification ------------------------------------------------------------------------------


def test_verified_family_shows_every_result_of_every_job_seen() -> None:
    verifier = Verifier(Limits(settle=0.0))
    verifier.count(FinishedJob(Q, "1", JOB, A1, False, 0), "written")
    verifier.count(FinishedJob(Q, "2", JOB, None, False, 0), "not_checked")
    samples = verified_samples({(Q, JOB), ("editor", "AssetEditThumbnailGeneration")}, verifier.counts)
    fam = counter("immich_thumbnail_jobs_verified", samples)
    assert at([fam], "immich_thumbnail_jobs_verified_total", queue=Q, job_name=JOB, result="written") == 1
    assert at([fam], "immich_thumbnail_jobs_verified_total", queue=Q, job_name=JOB, result="not_checked") == 1
    for result in VERIFY_RESULTS:  # seen, nothing counted yet: 0, not absent
        assert at([fam], "immich_thumbnail_jobs_verified_total", queue="editor",
                  job_name="AssetEditThumbnailGeneration", result=result) == 0


def follower(kinds: frozenset[str] = frozenset({ASSET})) -> tuple[JobFollower, list[FinishedJob]]:
    got: list[FinishedJob] = []
    return JobFollower(EventReader(config().redis), THUMBNAIL_JOBS_BY_QUEUE, kinds, sink=got.append), got


def deliver(f: JobFollower, entries: list[tuple[str, Any]], hashes: dict[str, JobHash]) -> None:
    events, _ = job_events(Q, entries, f.reader.jobs, hashes)
    f.deliver(events)


@pytest.mark.parametrize(("kinds", "expected", "names"), [
    (frozenset({ASSET}), [("1", JOB, A1, ASSET, False), ("3", "unknown", None, ASSET, True)], {(Q, JOB)}),
    # Job verification's follower: face jobs too, and their own verified series.
    (frozenset({ASSET, PERSON}), [("1", JOB, A1, ASSET, False), ("2", "PersonGenerateThumbnail", PERSON_ID, PERSON,
                                                                   False), ("3", "unknown", None, ASSET, True)],
     {(Q, JOB), (Q, "PersonGenerateThumbnail")}),
])
def test_the_follower_hands_back_finished_thumbnail_jobs(kinds: frozenset[str], expected: list[Any],
                                                         names: set[tuple[str, str]]) -> None:
    f, got = follower(kinds)
    deliver(f, [
        entry(1, event="added", jobId="1", name=JOB),
        entry(2, event="added", jobId="2", name="PersonGenerateThumbnail"),
        entry(3, event="added", jobId="q", name="AssetGenerateThumbnailsQueueAll"),
        entry(4, event="completed", jobId="1"), entry(5, event="completed", jobId="2"),
        entry(6, event="completed", jobId="q"), entry(7, event="failed", jobId="3"),
    ], {"1": JobHash(JOB, A1, timestamp=1), "2": JobHash("PersonGenerateThumbnail", PERSON_ID, timestamp=1),
        "3": JobHash(None, None)})
    assert [(j.job_id, j.name, j.entity_id, j.kind, j.failed) for j in got] == expected
    assert all(j.asset_id is None for j in got if j.kind == PERSON)
    assert f.names == names
    assert f.wants(Q, "PersonGenerateThumbnail") == (PERSON in kinds)  # no face job's data read for nothing


@pytest.mark.parametrize(("results", "expected"), [
    # An asset and a person with the same id are told apart by the job's kind.
    ({(ASSET, A1): "written", (PERSON, A1): "no_effect"},
     {(Q, JOB, "written"): 1, (Q, "PersonGenerateThumbnail", "no_effect"): 1}),
    # No answer for an id: not in the database.
    ({(ASSET, A1): "written"}, {(Q, JOB, "written"): 1, (Q, "PersonGenerateThumbnail", "asset_missing"): 1}),
])
def test_the_verifier_counts_face_jobs_by_their_person(results: dict[tuple[str, str], str],
                                                       expected: dict[tuple[str, str, str], int]) -> None:
    verifier = Verifier(Limits(settle=0.0))
    verifier.add(FinishedJob(Q, "1", JOB, A1, False, 0), 0.0)
    verifier.add(FinishedJob(Q, "2", "PersonGenerateThumbnail", A1, False, 0, PERSON), 0.0)
    verifier.add(FinishedJob(Q, "3", "PersonGenerateThumbnail", None, False, 0, PERSON), 0.0)  # not learned
    verifier.record(verifier.take(1.0), results)
    assert verifier.counts == {**expected, (Q, "PersonGenerateThumbnail", "not_checked"): 1}


@pytest.mark.parametrize(("check", "result"), [
    (PersonVerdict(PERSON_ID, exists=False), "asset_missing"),
    (PersonVerdict(PERSON_ID, True, "o", "/p.jpeg", A1), "written"),
    (PersonVerdict(PERSON_ID, True, "o", "/p.jpeg", A1, problems=[("person", "file_missing", "/p.jpeg")]),
     "no_effect"),
    (PersonVerdict(PERSON_ID, True, "o", "", A1, problems=[("person", "no_record", "")]), "no_effect"),
    (PersonVerdict(PERSON_ID, True, "o", "/../x", A1, problems=[("person", "path_refused", "/../x")]),
     "not_checked"),
])
def test_a_face_job_is_judged_by_its_person(check: PersonVerdict, result: str) -> None:
    assert verdict(check) == result


# -- the client ------------------------------------------------------------------------------------


def test_the_redis_client_is_built_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # redis 8 warns when the asyncio client gets the synchronous Retry
        client = RedisSource(config().redis).client()
    assert client.get_connection_kwargs().get("client_name") == "immich-thumbnail-exporter"


# -- regeneration's watch --------------------------------------------------------------------------


@pytest.mark.parametrize(("armed", "before_expect", "confirmed"), [
    (True, True, {A1: "1"}),  # the reader saw the request's job before its answer came back
    (True, False, {A1: "1"}),  # ... or after
    (False, True, {}),  # not started: no job is read, none can confirm
])
def test_the_watch_confirms_a_job_read_before_or_after_the_answer(armed: bool, before_expect: bool,
                                                                  confirmed: dict[str, str]) -> None:
    from immich_thumbnail_exporter.remediation.jobwatch import JobWatch

    watch = JobWatch(RedisSource(config().redis), "immich_bull")
    watch._armed = armed  # what start() does, without a server to follow
    entries = [entry(1, event="added", jobId="1", name=JOB), entry(2, event="active", jobId="1"),
               entry(3, event="completed", jobId="1")]

    def feed() -> None:
        jobs = watch.reader.jobs
        wanted = needs_hash(Q, entries, jobs, lambda name: watch.wants(Q, name))
        events, _ = job_events(Q, entries, jobs, {j: JobHash(JOB, A1, timestamp=1) for j in wanted})
        watch.deliver(events)

    if before_expect:
        feed()
    watch.expect([A1, A2], window=60)
    if not before_expect:
        feed()
    assert watch._confirmed == confirmed
    job = watch.job_of(A1)
    if confirmed:
        assert job is not None and job.finished and job.outcome == "completed" and job.started_at == 0.002
    assert watch.pending  # A2 has no job yet
