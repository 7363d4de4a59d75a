"""Bad input, generated: database paths with odd characters, ``..``, absolute paths outside the media
location, and symlinks in the media tree pointing outside the media root.

``PathMapper.relative`` must refuse anything that is not a clean path under the media location, and
never raise. The file check itself (``scan.files.merge_stream``: the production merge of database rows
with the walk of ``thumbs/``, fed here from a list instead of a cursor, its walk in this process) must give
every row a counted outcome (a file, a missing or unreadable file, or a refused path) and must never
open, list or read anything outside the media root: an audit hook watches every ``open``, ``os.scandir``
and ``os.listdir`` while it runs, in every thread, and a file outside the root has a size and content
that would show in the results if it were ever read. (``tests/test_strace.py`` watches every system call,
``lstat`` and ``readlink`` included, of a real ``scan``.)

BullMQ job hashes and event entries with missing, non-JSON, huge or absurd fields (parsed in
``sources/bullmq.py`` and counted in ``collectors/job_events.py``) must never fail a round: pure functions are fuzzed,
and malformed jobs are written into a real Valkey beside good ones.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from immich_thumbnail_exporter.demo.seed import jpeg, webp
from immich_thumbnail_exporter.findings import FileStats, Problem
from immich_thumbnail_exporter.scan.disk_walk import DiskWalk
from immich_thumbnail_exporter.scan.file_check import merge_stream
from immich_thumbnail_exporter.scan.file_sql import KINDS as STREAM_KINDS
from immich_thumbnail_exporter.scan.verdict import original_exists
from immich_thumbnail_exporter.sources.paths import IMMICH_CWD, PathMapper
from immich_thumbnail_exporter.vocabulary import JOB_OUTCOMES, KINDS, REASONS, is_asset_job
from tests.audit import audited, outside

LOCATIONS = ("/data", "/usr/src/app/upload", "/")
SECRET_SIZE = 7777  # the file outside the root: a size no file inside has
SECRET = b"SECRET-CONTENT-" + b"x" * (SECRET_SIZE - 15)  # not a JPEG: reading it would say file_corrupt

# -- PathMapper.relative ------------------------------------------------------------------------------

segment = st.one_of(
    st.sampled_from(["thumbs", "upload", "..", ".", "", "data", "usr", "src", "app", "etc", "passwd", "a.jpeg",
                     "..a", "a..", "...", "x\x00y", "\\..", "%2e%2e", "\udcff", "\ud800", "é", "\u202e", "a b", "\n"]),
    st.text(max_size=8),
)
stored_paths = st.one_of(
    st.text(max_size=40),
    st.lists(segment, max_size=8).map("/".join),
    st.tuples(st.sampled_from(["/data/", "/usr/src/app/upload/", "upload/", "/", "", "/data", "./", "../"]),
              st.lists(segment, max_size=6).map("/".join)).map("".join),
)


def _clean(rel: str) -> bool:
    return bool(rel) and all(part not in ("", ".", "..") for part in rel.split("/")) and "\x00" not in rel


@settings(max_examples=400, deadline=None)
@given(stored=stored_paths, location=st.sampled_from(LOCATIONS))
@example(stored="/data/../etc/passwd", location="/data")
@example(stored="/data/thumbs/u/../../../etc/passwd", location="/data")
@example(stored="/datax/thumbs/a.jpeg", location="/data")
@example(stored="upload/../../../etc/passwd", location="/usr/src/app/upload")
@example(stored="/data/thumbs/\ud800.jpeg", location="/data")
@example(stored="/data//thumbs/a.jpeg", location="/data")
@example(stored="/data/thumbs/a.jpeg/", location="/data")
@example(stored="/data/thumbs/\x00/a.jpeg", location="/data")
def test_relative_refuses_or_stays_inside(stored: str, location: str) -> None:
    root = "/srv/media"
    mapper = PathMapper(root, location)
    rel = mapper.relative(stored)
    if rel is None:
        return
    assert _clean(rel), (stored, rel)
    assert not rel.startswith("/") and not rel.endswith("/")
    # What the database meant (resolved like Immich does) is exactly the location plus rel.
    absolute = stored if stored.startswith("/") else f"{IMMICH_CWD}/{stored}"
    assert absolute == mapper._prefix + rel
    # Where it lands on our side stays inside the root, lexically (symlinks are the walk's business).
    local = mapper.local(rel)
    assert os.path.normpath(local).startswith(os.fsencode(root) + b"/"), (stored, local)


@settings(max_examples=200, deadline=None)
@given(rel=st.lists(st.text(alphabet=st.characters(blacklist_characters="/\x00"), min_size=1, max_size=6)
                    .filter(lambda p: p not in (".", "..")), min_size=1, max_size=5).map("/".join))
def test_relative_accepts_every_clean_path(rel: str) -> None:
    mapper = PathMapper("/srv/media", "/data")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        assert mapper.relative(f"/data/{rel}") is None  # no database can hold it; never a crash
        return
    assert mapper.relative(f"/data/{rel}") == rel


# -- the file check on a real media tree -------------------------------------------------------------


@dataclass
class Tree:
    root: str
    outside: str
    location: str = "/data"
    # relative path -> what the disk holds there, for the rows to name
    known: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    base = tmp_path_factory.mktemp("fuzz")
    root, out = base / "media", base / "outside"
    (out / "sub").mkdir(parents=True)
    for target in (out / "secret.jpeg", out / "sub" / "secret.jpeg", out / "good.webp"):
        target.write_bytes(SECRET)
    t = Tree(str(root), str(out))

    def put(rel: str, data: bytes | None = None, link: str | None = None, what: str = "") -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if link is not None:
            os.symlink(link, path)
        elif data is not None:
            path.write_bytes(data)
        t.known[rel] = what

    d = "thumbs/u1/aa/bb"
    put(f"{d}/good_thumbnail.webp", webp(300), what="file")
    put(f"{d}/good_preview.jpeg", jpeg(1200), what="file")
    put(f"{d}/empty_thumbnail.webp", b"", what="empty")
    put(f"{d}/bad_preview.jpeg", webp(1200), what="corrupt")
    put(f"{d}/out_thumbnail.jpeg", link=str(out / "secret.jpeg"), what="symlink out")
    put(f"{d}/dotdot_preview.jpeg", link="../../../../../outside/secret.jpeg", what="symlink out")
    put(f"{d}/in_preview.jpeg", link="good_preview.jpeg", what="symlink in")
    put(f"{d}/dangling_preview.jpeg", link="nowhere.jpeg", what="dangling")
    os.mkfifo(root / d / "fifo_preview.jpeg")  # opening it to check its header would block forever
    t.known[f"{d}/fifo_preview.jpeg"] = "fifo"
    put("thumbs/u1/dirlink", link=str(out), what="dir symlink out")
    put("thumbs/u1/aa/loop", link=".", what="dir symlink loop")
    put("thumbs/.immich", b"", what="marker")
    put("thumbs/u2/\udcff-odd.webp", webp(300), what="file")
    put("thumbs/u2/cc/orphan.webp", webp(500), what="orphan")
    put("elsewhere/old_thumbnail.jpeg", jpeg(600), what="file")
    put("elsewhere-link", link=str(out), what="dir symlink out")
    put("upload/u1/original.jpg", jpeg(400), what="original")
    put("upload-link", link=str(out), what="dir symlink out")
    for rel in ("thumbs/u1/dirlink/secret.jpeg", "thumbs/u1/dirlink/sub/secret.jpeg", "elsewhere-link/secret.jpeg",
                "elsewhere-link/good.webp", "thumbs/u1/aa/loop/bb/good_preview.jpeg", f"{d}/missing_thumbnail.webp",
                "thumbs/u1/zz/zz/missing_preview.jpeg", "elsewhere/missing.jpeg", "upload-link/secret.jpeg"):
        t.known[rel] = "through a link, or missing"
    yield t


def row_paths(tree: Tree) -> st.SearchStrategy[str]:
    loc = tree.location
    known = sorted(tree.known)
    return st.one_of(
        st.sampled_from(known).map(lambda r: f"{loc}/{r}"),
        st.sampled_from([
            f"{loc}/thumbs/../../outside/secret.jpeg", f"{tree.outside}/secret.jpeg", f"{loc}/../outside/secret.jpeg",
            f"{loc}/thumbs/u1/aa/bb/../../../../outside/secret.jpeg", "upload/thumbs/u1/a.jpeg", f"{loc}x/thumbs/a",
            f"{loc}/thumbs//u1/aa/bb/good_preview.jpeg", f"{loc}/thumbs/./u1/aa/bb/good_preview.jpeg",
            f"{loc}/thumbs/u1/aa/bb/good_preview.jpeg/", "", f"{loc}/thumbs/\x00", f"{loc}/thumbs/\ud800.webp",
        ]),
        st.lists(segment, min_size=1, max_size=6).map(lambda parts: f"{loc}/thumbs/" + "/".join(parts)),
        st.lists(segment, min_size=1, max_size=4).map(lambda parts: f"{loc}/" + "/".join(parts)),
        stored_paths,
    )


def sort_key(path: str) -> bytes:
    """PostgreSQL's ORDER BY (normalized path) COLLATE "C": bytewise on the UTF-8 text."""
    absolute = path if path.startswith("/") else f"{IMMICH_CWD}/{path}"
    return absolute.encode("utf-8", "surrogatepass")


@st.composite
def row_batches(draw: st.DrawFn, tree: Tree) -> tuple[list[tuple[Any, ...]], list[int]]:
    paths = draw(st.lists(row_paths(tree), min_size=1, max_size=40))
    rows = []
    for i, path in enumerate(paths):
        kind = draw(st.sampled_from([*KINDS, "person"]))
        original = draw(st.one_of(st.none(), st.sampled_from([
            "/data/upload/u1/original.jpg", "/data/upload/u1/gone.jpg", "/data/upload-link/secret.jpeg",
            f"{tree.outside}/secret.jpeg", "/data/../outside/secret.jpeg",
        ])))
        rows.append((path, kind, f"asset-{i}", "owner", "image", original, kind != "person"))
    rows.sort(key=lambda r: sort_key(r[0]))
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=4)))
    return rows, cuts


def run_merge(
    tree: Tree, rows: list[tuple[Any, ...]], cuts: list[int], verify: bool
) -> tuple[FileStats, list[Problem]]:
    """The production file check (``merge_stream``) over ``rows`` ``(stored path, kind, asset id, owner,
    type, original, eligible)``, streamed as ``files_sql`` streams them and cut into batches at ``cuts``,
    the walk in this process (in a worker thread, which the audit hook sees) instead of helper processes."""
    mapper = PathMapper(tree.root, tree.location)
    stats = FileStats()
    problems: list[Problem] = []
    code = {k: i for i, k in enumerate(STREAM_KINDS)}
    cwd = IMMICH_CWD + "/"
    stream = [((r[0] if r[0][:1] == "/" else cwd + r[0]).encode("utf-8", "surrogatepass"), code[r[1]], r[2],
               r[0].encode("utf-8", "surrogatepass")) for r in rows]
    batches: list[Sequence[Any]] = []
    start = 0
    for cut in [*cuts, len(rows)]:
        if stream[start:cut]:
            batches.append(stream[start:cut])
        start = max(start, cut)
    assets = {r[2]: (r[2], r[3], r[4], r[5], r[6]) for r in rows}

    async def fetch() -> Sequence[Any]:
        return batches.pop(0) if batches else []

    async def lookup(ids: list[Any]) -> Mapping[Any, Sequence[Any]]:
        return {i: assets[i] for i in ids if i in assets}

    walk = DiskWalk(mapper.root_bytes, verify, workers=0)
    asyncio.run(merge_stream(fetch, lookup, mapper, stats, problems.append, verify_headers=verify, disk=walk))
    return stats, problems


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), verify=st.booleans())
def test_file_check_counts_every_row_and_never_reads_outside(tree: Tree, data: st.DataObject, verify: bool) -> None:
    rows, cuts = data.draw(row_batches(tree))
    root_real = os.path.realpath(os.fsencode(tree.root))
    with audited() as seen:
        stats, problems = run_merge(tree, rows, cuts, verify)
    assert not outside(root_real, seen), outside(root_real, seen)

    # Every row has exactly one counted outcome (every row here is eligible).
    for kind in KINDS:
        n = sum(1 for r in rows if r[1] == kind)
        counted = (stats.files[kind] + stats.missing[(kind, "file_missing")]
                   + stats.missing[(kind, "file_unreadable")] + stats.refused[kind])
        assert counted == n, (kind, n, stats)
    assert stats.rows == len(rows)
    assert stats.problems_total == len(problems) == sum(stats.missing.values())
    assert all(p.reason in REASONS and p.kind in KINDS for p in problems)
    # Two rows naming one file get one verdict, whatever their kinds and wherever the batches were cut.
    verdict: dict[str, set[str]] = {}
    reasons = {(p.asset_id, p.kind): p.reason for p in problems}
    for path, kind, asset_id, *_ in rows:
        if kind != "person" and PathMapper(tree.root, tree.location).relative(path) is not None:
            verdict.setdefault(path, set()).add(reasons.get((asset_id, kind), "ok"))
    assert all(len(v) == 1 for v in verdict.values()), {p: v for p, v in verdict.items() if len(v) > 1}
    # Nothing outside the root was ever measured or judged by its content.
    assert SECRET_SIZE not in (stats.orphaned_bytes, *stats.bytes.values())
    for p in problems:
        if p.path is not None and "secret" in p.path:
            assert p.reason in ("file_missing", "file_unreadable"), p
    # Symlinks out of the root are unreadable, never followed; the one inside is followed.
    by_path = {p.path: p.reason for p in problems}
    for path, kind, *_ in rows:
        if kind != "person" and path.endswith(("/out_thumbnail.jpeg", "/dotdot_preview.jpeg")) and "//" not in path \
                and "/./" not in path and not path.endswith("/"):
            assert by_path.get(path) == "file_unreadable", (path, by_path.get(path))
        if kind != "person" and path == "/data/thumbs/u1/aa/bb/in_preview.jpeg":
            assert path not in by_path, (path, by_path[path])


def test_symlinks_in_the_tree(tree: Tree) -> None:
    """The fixed cases, spelt out: what each kind of link gives with header checks on."""
    names = ["out_thumbnail.jpeg", "dotdot_preview.jpeg", "in_preview.jpeg", "dangling_preview.jpeg"]
    rows = sorted(
        [(f"/data/thumbs/u1/aa/bb/{n}", "thumbnail", n, "o", "image", None, True) for n in names]
        + [("/data/thumbs/u1/dirlink/secret.jpeg", "preview", "dir", "o", "image", None, True),
           ("/data/elsewhere-link/secret.jpeg", "thumbnail", "else", "o", "image", None, True),
           ("/data/elsewhere/old_thumbnail.jpeg", "thumbnail", "old", "o", "image", None, True)],
        key=lambda r: sort_key(r[0]),
    )
    root_real = os.path.realpath(os.fsencode(tree.root))
    with audited() as seen:
        stats, problems = run_merge(tree, rows, [], verify=True)
    assert not outside(root_real, seen), outside(root_real, seen)
    reasons = {p.asset_id: p.reason for p in problems}
    assert reasons == {
        "out_thumbnail.jpeg": "file_unreadable",
        "dotdot_preview.jpeg": "file_unreadable",
        "dangling_preview.jpeg": "file_missing",
        "dir": "file_missing",  # the walk never enters a linked directory: not there
        "else": "file_unreadable",  # a directory outside thumbs/ that links out of the root
    }, reasons
    assert stats.files["thumbnail"] == 2  # in_preview.jpeg (followed, inside) and the old layout's file


@pytest.mark.parametrize(("original", "expected"), [
    ("/data/upload/u1/original.jpg", True),
    ("/data/upload/u1/gone.jpg", False),
    ("/data/upload-link/secret.jpeg", None),  # through a link out of the root: not looked at
    ("/data/../outside/secret.jpeg", None),
    ("/elsewhere/outside/secret.jpeg", None),
    (None, None),
])
def test_original_exists_stays_inside(tree: Tree, original: str | None, expected: bool | None) -> None:
    assert original_exists(PathMapper(tree.root, "/data"), original) is expected


def test_fixture_is_what_it_claims(tree: Tree) -> None:
    """Guard the guard: the outside file is there, and reading it would be seen."""
    assert Path(tree.outside, "secret.jpeg").stat().st_size == SECRET_SIZE
    assert Path(tree.root, "thumbs/u1/aa/bb/out_thumbnail.jpeg").stat().st_size == SECRET_SIZE
    with audited() as seen:
        Path(tree.root, "elsewhere-link/secret.jpeg").read_bytes()
    assert outside(os.path.realpath(os.fsencode(tree.root)), seen)


EXPECTED = {  # what one row naming this file gets (no verdict: a healthy file)
    "in_preview.jpeg": None, "good_preview.jpeg": None, "dangling_preview.jpeg": "file_missing",
    "out_thumbnail.jpeg": "file_unreadable", "missing.jpeg": "file_missing", "fifo_preview.jpeg": "file_empty",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("face_first", [False, True])
def test_two_rows_naming_one_file_get_one_verdict(tree: Tree, name: str, verify: bool, face_first: bool) -> None:
    path = f"/data/thumbs/u1/aa/bb/{name}"
    rows = [(path, kind, kind, "o", "image", None, True) for kind in ("thumbnail", "preview", "fullsize")]
    if face_first:
        rows.insert(0, (path, "person", "face", "o", None, None, False))
    stats, problems = run_merge(tree, rows, [], verify)
    want = EXPECTED[name]
    assert [p.reason for p in problems] == ([want] * 3 if want else []), problems
    # A file on disk, even an empty one, counts as a file; a missing or unreadable one does not.
    assert sum(stats.files.values()) == (0 if want in ("file_missing", "file_unreadable") else 3), stats


# -- BullMQ job hashes and event entries: missing, non-JSON, huge ---------------------------------------

from immich_thumbnail_exporter.collectors import job_events as bull_events  # noqa: E402
from immich_thumbnail_exporter.collectors import queues as bull_queues  # noqa: E402
from immich_thumbnail_exporter.sources import bullmq  # noqa: E402

UUID = "0b9d2a8e-6d8c-4c6e-9d55-2f5c3a1e7b10"
json_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(
    st.none(), st.text(max_size=60), json_docs.map(json.dumps), st.just(json.dumps({"id": UUID})),
    st.just(json.dumps({"id": UUID.upper(), "source": "upload"})), st.just("x" * 5000),
    st.integers().map(str), st.floats(allow_infinity=False, allow_nan=False).map(str),
)


def _infinite(value: str | None) -> bool:
    """A number too big for a float: the known crash (test_job_fields_known_crashes), kept out here."""
    try:
        return value is not None and math.isinf(float(value))
    except (ValueError, OverflowError):
        return False


@settings(max_examples=300, deadline=None)
@given(value=field_values)
def test_job_fields_never_raise(value: str | None) -> None:
    asset = bullmq.asset_id_of(value)
    assert asset is None or asset == UUID
    assert bull_events.outcome_of(value) in ("completed", "success", "skipped", "failed")
    n = bullmq.to_int(value)
    assert n is None or (isinstance(n, int) and abs(n) <= 2**53)


@settings(max_examples=200, deadline=None)
@given(name=st.one_of(st.text(max_size=40), st.sampled_from(["immich_bull:dGh1bWJuYWlsR2VuZXJhdGlvbg==",
                                                             "immich_bull:dGh1bWJuYWlsR2VuZXJhdGlvbg==:w:x",
                                                             "immich_bull:thumbnailGeneration", "immich_bull:"])))
def test_worker_names_never_raise(name: str) -> None:
    queue = bullmq.worker_queue(name, "immich_bull", {"dGh1bWJuYWlsR2VuZXJhdGlvbg==": "thumbnailGeneration"},
                                     {"thumbnailGeneration"})
    assert queue in (None, "thumbnailGeneration")
    assert is_asset_job(name) in (True, False)


entry_ids = st.one_of(
    st.tuples(st.integers(0, 2**48), st.integers(0, 50)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.text(max_size=12),
)
entry_fields = st.dictionaries(
    st.sampled_from(["event", "jobId", "name", "returnvalue", "failedReason", "prev", "data", "x"]),
    st.one_of(st.sampled_from(["added", "active", "completed", "failed", "progress", "waiting"]),
              st.sampled_from(["1", "2", "3", "job-4"]),
              field_values.filter(lambda v: v is not None and not _infinite(v)),
              st.text(min_size=101, max_size=300)),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(st.tuples(entry_ids, st.one_of(entry_fields, st.none(), st.text(max_size=5))), max_size=60))
def test_event_entries_never_raise_and_labels_stay_bounded(entries: list[tuple[str, Any]]) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from immich_thumbnail_exporter.sources.bullmq_jobs import JobMap, job_events, needs_hash

    tracker = bull_events.JobCounters()
    jobs = JobMap(50)
    needs_hash("thumbnailGeneration", entries, jobs, lambda name: True)
    events, _ = job_events("thumbnailGeneration", entries, jobs, {})  # the reader's one parse, no lookups
    tracker.deliver(events)
    for (_, job), n in tracker.accepted.items():
        assert n > 0 and (job == bull_events.UNKNOWN or len(job) <= bull_events.MAX_NAME_LENGTH)
    assert len({j for _, j in tracker.accepted} | {j for _, j, _ in tracker.finished}) <= bull_events.MAX_JOB_NAMES + 1
    assert all(o in JOB_OUTCOMES for _, _, o in tracker.finished)
    assert len(jobs) <= jobs.limit

    class Families(Collector):
        def collect(self) -> Any:
            yield from tracker.families({"thumbnailGeneration": 0})

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    generate_latest(registry)  # renders: no NaN counts, no broken label values


xread_entries = st.lists(st.one_of(st.tuples(entry_ids, st.one_of(entry_fields, st.none())), st.none(),
                                   st.text(max_size=5), st.lists(entry_ids, max_size=3)), max_size=20)
xread_streams = st.sampled_from(["immich_bull:thumbnailGeneration:events", "immich_bull:other:events", "x"])


@settings(max_examples=300, deadline=None)
@given(answer=st.one_of(
    st.lists(st.one_of(st.tuples(xread_streams, xread_entries), st.none(), st.text(max_size=5)), max_size=4),
    st.dictionaries(xread_streams, xread_entries, max_size=3),  # RESP3
    st.none(), st.integers(), st.text(max_size=5),
))
def test_xread_answers_never_raise(answer: Any) -> None:
    """The blocking readers' one parse of XREAD (sources.bullmq_events.by_stream): any shape in, only the
    streams asked for and only entries with a stream id out."""
    from immich_thumbnail_exporter.sources.bullmq_events import by_stream, parse_id

    wanted = "immich_bull:thumbnailGeneration:events"
    out = by_stream(answer, {wanted: "thumbnailGeneration"})
    assert set(out) <= {wanted}
    for entries in out.values():
        assert entries
        for entry_id, _ in entries:
            parse_id(entry_id)  # raises if not a stream id


# Values that used to crash the queue collection (OverflowError on 'inf'/'1e999', RecursionError on deeply
# nested JSON), taking every queue series down while Redis was fine.
@pytest.mark.parametrize("value", ["inf", "1e999", "9" * 400, "[" * 100_000])
def test_job_fields_former_crashes(value: str) -> None:
    test_job_fields_never_raise.hypothesis.inner_test(value)  # type: ignore[attr-defined]


BAD_JOBS: dict[str, dict[str, Any]] = {
    "timestamp not a number": {"timestamp": "soon"},
    "timestamp empty": {"timestamp": ""},
    "no fields but name": {"timestamp": None, "data": None},
    "data not JSON": {"data": "{not json"},
    "data a JSON list": {"data": "[1, 2]"},
    "data id not a uuid": {"data": json.dumps({"id": 42})},
    "data huge": {"data": json.dumps({"id": UUID, "pad": "x" * 1_000_000})},
    "name huge": {"name": "A" * 100_000},
    "name not UTF-8": {"name": b"\xff\xfe\x00bad"},
    "returnvalue nested a little": {"returnvalue": "[" * 50 + "]" * 50},
    "timestamp infinite": {"timestamp": "inf"},
    "timestamp 400 digits": {"timestamp": "9" * 400},
    "data nested 100k deep": {"data": "[" * 100_000},
    "returnvalue nested 100k deep": {"returnvalue": "[" * 100_000},
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
@pytest.mark.asyncio
async def test_bad_job_hash_and_events_on_real_valkey(valkey: Any, case: str) -> None:
    """One malformed job among good ones: the round still succeeds and every queue series is there."""
    import redis as sync_redis

    from immich_thumbnail_exporter.config import load_config
    from immich_thumbnail_exporter.sources.postgres import PostgresSource

    spec = {k: v for k, v in BAD_JOBS[case].items() if not k.startswith("_")}
    admin = sync_redis.Redis.from_url(valkey.url)
    base = "immich_bull:thumbnailGeneration"
    admin.hset(f"{base}:meta", mapping={"paused": "0"})
    good = {"name": "AssetGenerateThumbnails", "timestamp": "1700000000000", "data": json.dumps({"id": UUID})}
    admin.hset(f"{base}:1", mapping=good)
    admin.lpush(f"{base}:wait", "1")
    config = load_config(None, environ={"REDIS_URL": valkey.url, "DB_URL": "postgresql://x@127.0.0.1:1/x"},
                         overrides={"intervals.queues": "5s"})
    pg = PostgresSource(config.database)
    col = bull_queues.QueueCollection(config, pg)
    try:
        first = await col.collect()  # the event stream is followed from here on
        assert first.sources["redis"] is True
        job = {**good, **{k: v for k, v in spec.items() if k != "returnvalue" and v is not None}}
        for k in [k for k, v in spec.items() if v is None]:
            job.pop(k, None)
        admin.hset(f"{base}:2", mapping=job)
        admin.lpush(f"{base}:wait", "2")
        admin.lpush(f"{base}:active", "3")
        admin.hset(f"{base}:3", mapping={**job, "processedOn": job.get("timestamp", "")})
        admin.xadd(f"{base}:events", {"event": "added", "jobId": "2", "name": str(job.get("name", ""))[:200]})
        admin.xadd(f"{base}:events", {"event": "active", "jobId": "4", "prev": "waiting"})
        admin.xadd(f"{base}:events", {"event": "completed", "jobId": "4",
                                      "returnvalue": spec.get("returnvalue") or "null"})
        admin.hset(f"{base}:4", mapping=job)
        outcome = await col.collect()
        assert outcome.sources["redis"] is True, outcome
        names = {f.name for p in outcome.parts for f in p.families}
        assert {"immich_queue_jobs", "immich_queue_paused", "immich_jobs_accepted"} <= names, names
    finally:
        await col.close()
        await pg.close()
        admin.close()
