"""The restore report's renderers from made-up data: figures, sources that are down, and escaping."""

from __future__ import annotations

import io
from collections import Counter
from html.parser import HTMLParser

import pytest

from immich_thumbnail_exporter.findings import FileStats, InventoryCounts, Problem, ProblemStore
from immich_thumbnail_exporter.output.restore_report import (
    AssetHistory,
    Check,
    FileNow,
    JobTimes,
    OrphanJob,
    QueueReport,
    RestoreData,
    write_markdown,
)
from immich_thumbnail_exporter.output.restore_report_html import write_html
from immich_thumbnail_exporter.output.scan_report import Space, needed_bytes
from immich_thumbnail_exporter.scan.run import ScanResult

EVIL = '<script>alert(1)</script>|**x**'


def scan(missing: dict[tuple[str, str], int], files: dict[str, int], sizes: dict[str, int] | None,
         no_record: dict[str, int] | None = None) -> ScanResult:
    counts = InventoryCounts("v1.136+", "v1.137.3", {"image": 90, "video": 10}, no_record or {}, 0, 0)
    stats = FileStats(missing=Counter(missing), files=Counter(files), bytes=Counter(sizes or {}),
                      sizes_known=sizes is not None, originals_missing=1)
    store = ProblemStore()
    store.add(Problem("a1", "u1", "image", "thumbnail", "file_missing", "/data/thumbs/x", "/data/upload/x", True))
    store.add(Problem(EVIL, "u1", "image", "preview", "file_missing", EVIL, EVIL, False))
    return ScanResult(counts, stats, store, "/data", "/media", 1.7e9)


@pytest.mark.parametrize(
    ("missing", "files", "sizes", "no_record", "expected"),
    [
        # thumbnails 10 B each on disk, 3 missing (2 on disk, 1 no record); previews 100 B, 1 missing.
        ({("thumbnail", "file_missing"): 2, ("preview", "file_empty"): 1}, {"thumbnail": 10, "preview": 5},
         {"thumbnail": 100, "preview": 500}, {"thumbnail": 1}, 3 * 10 + 1 * 100),
        # No fullsize file on disk: no mean size, so its missing files add nothing (not a guess).
        ({("fullsize", "file_missing"): 7}, {"thumbnail": 1}, {"thumbnail": 10}, None, 0),
        ({("thumbnail", "file_missing"): 2}, {"thumbnail": 10}, None, None, None),  # sizes not read
    ],
    ids=["two-kinds", "kind-with-no-file", "no-sizes"],
)
def test_needed_bytes(missing: dict[tuple[str, str], int], files: dict[str, int], sizes: dict[str, int] | None,
                      no_record: dict[str, int] | None, expected: int | None) -> None:
    assert needed_bytes(scan(missing, files, sizes, no_record)) == expected


def history(asset: str, state: str, attempts: int, **kw: object) -> AssetHistory:
    base: dict[str, object] = dict(
        asset_id=asset, state=state, attempts=attempts, first_requested=1.7e9, last_requested=1.7e9 + 60,
        request_outcome="fixed" if state == "fixed" else "gave_up", detail=None,
        job=JobTimes("41", "gone"), last_checked=1.7e9 + 90, fixed_at=1.7e9 + 90 if state == "fixed" else None,
        why=None, gave_up_reason=None, files_now=[FileNow("thumbnail", 300)], broken_now=[], exists_now=True)
    base.update(kw)
    return AssetHistory(**base)  # type: ignore[arg-type]


def data(**kw: object) -> RestoreData:
    d = RestoreData(1.7e9 + 100, scan({("thumbnail", "file_missing"): 1}, {"thumbnail": 10}, {"thumbnail": 100}))
    d.spaces = [Space("thumbs", 1 << 30, 1 << 20, 5), Space("upload", 1 << 30, 1 << 20, 5)]
    d.queue = QueueReport(workers=0, counts={"waiting": 3}, orphans=[OrphanJob("17", EVIL, "waiting")])
    d.ledger = [
        history("fixed-once", "fixed", 1),
        history("fixed-twice", "fixed", 2),
        history(EVIL, "gave_up", 3, files_now=[], broken_now=[("preview", "file_missing")],
                gave_up_reason=EVIL, job=JobTimes("42", "completed", 1.7e9, 1.7e9 + 1, 1.7e9 + 2)),
    ]
    d.checks = [Check("Immich's database", "snapshot", "ok", True), Check("Job queues", "Redis", EVIL, False)]
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def render(d: RestoreData, fmt: str) -> str:
    out = io.StringIO()
    (write_html if fmt == "html" else write_markdown)(d, out)
    return out.getvalue()


def test_markdown_sections_and_escaping() -> None:
    doc = render(data(), "markdown")
    heads = [line for line in doc.splitlines() if line.startswith("## ")]
    assert [h[:5] for h in heads] == ["## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6."]
    assert "Complete (no missing or broken file): **98**" in doc  # 100 eligible, 2 problem assets
    assert "Free under thumbs/, upload/: **1.0 MiB** of 1.0 GiB (one filesystem)" in doc
    assert "| fixed-twice | 2 |" in doc and "fixed-once | 1" not in doc
    assert "3 attempt(s)" in doc and "preview file\\_missing" in doc
    assert "finished and removed by BullMQ" in doc  # a job that is gone: no invented times
    assert "**not reachable**" in doc
    assert "<script>" not in doc and "\\<script\\>" in doc
    # A cell never splits: every table row from the ledger keeps its column count.
    for line in doc.splitlines():
        if line.startswith("| \\<script"):
            assert line.count(" | ") in (2, 3), line


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"scan": None, "scan_error": "postgres: connection refused"}, "The scan could not run: postgres: connection"),
        ({"queue": None}, "Redis is not configured"),
        ({"queue": QueueReport(error="redis: timed out")}, "The thumbnail queue could not be read: redis: timed out"),
        ({"ledger": None, "ledger_note": "No remediation ledger in /x"}, "No remediation ledger in /x"),
        ({"spaces": None}, "Free space: unknown (no media root)"),
        ({"integrity": None, "integrity_note": "not on this release"}, "not on this release"),
    ],
    ids=["database-down", "no-redis", "redis-down", "no-ledger", "no-media-root", "no-integrity"],
)
def test_a_source_that_is_down_is_said_so(change: dict[str, object], says: str) -> None:
    for fmt in ("markdown", "html"):
        doc = render(data(**change), fmt)
        assert says in doc.replace("&#x27;", "'"), fmt
        if "scan" in change:
            assert "Assets that should have thumbnails" not in doc  # no figure from a scan that did not run


class _Strict(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    VOID = frozenset({"meta", "br", "img", "hr", "input", "link"})

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_balanced_escaped_and_has_its_charts() -> None:
    page = render(data(), "html")
    parser = _Strict()
    parser.feed(page)
    parser.close()
    assert parser.stack == [] and parser.scripts == 0
    text = "".join(parser.text)
    assert EVIL in text  # shown as text, never as markup
    assert page.count("<svg") == 2
