"""``remediation/people.py``'s pure rules: what to do with a person, and why its face thumbnail is still
broken, from made-up checks and ledger rows."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from immich_thumbnail_exporter.remediation.ledger import Entry
from immich_thumbnail_exporter.remediation.original import OriginalVerdict
from immich_thumbnail_exporter.remediation.people import PersonJob, decide, explain_person
from immich_thumbnail_exporter.scan.verdict import PersonVerdict

P = "11111111-1111-4111-8111-111111111111"
FACE = "22222222-2222-4222-8222-222222222222"
NOW = 1_000_000.0
REASONS = ("file_missing", "file_empty", "file_corrupt")
MISSING = PersonVerdict(P, True, "o", "/data/thumbs/o/11/11/p.jpeg", FACE, "/data/upload/a.jpg", True,
                        [("person", "file_missing", "/data/thumbs/o/11/11/p.jpeg")])
SOUND = replace(MISSING, problems=[])


def entry(state: str, attempts: int = 1, last: float = NOW - 10) -> Entry:
    return Entry(P, state, attempts, frozenset({"person"}), last, last, None, None, None, None, None, None, None,
                 None)


@pytest.mark.parametrize(("verdict", "row", "action", "code"), [
    (MISSING, None, "ask", ""),
    (SOUND, None, "skip", "present"),
    (PersonVerdict(P, False), None, "skip", "not_a_person"),
    (replace(MISSING, face_asset_id=None), None, "skip", "no_face"),
    (replace(MISSING, original_exists=False), None, "skip", "original_missing"),
    (replace(MISSING, original_exists=None), None, "ask", ""),  # cannot tell: asking is how to find out
    (replace(MISSING, problems=[("person", "file_unreadable", "x")]), None, "skip", "file_unreadable"),
    (replace(MISSING, problems=[("person", "path_refused", "x")]), None, "skip", "path_refused"),
    (replace(MISSING, problems=[("person", "no_record", None)]), None, "skip", "no_record"),
    # The ledger: an open attempt is checked, a fresh failure waits for its window, none left: given up.
    (MISSING, entry("submitted"), "settle", ""),
    (SOUND, entry("still_missing"), "settle", ""),
    (MISSING, entry("still_missing", 1, NOW - 10), "wait", ""),
    (MISSING, entry("still_missing", 1, NOW - 400), "ask", ""),
    (MISSING, entry("not_queued", 3, NOW - 10_000), "skip", "gave_up"),
    (MISSING, entry("gave_up", 3), "skip", "gave_up"),
    (MISSING, entry("fixed", 1), "ask", "reset"),  # fixed once and broken again: attempts start over
])
def test_decide(verdict: PersonVerdict, row: Entry | None, action: str, code: str) -> None:
    d = decide(verdict, row, REASONS, NOW, 300.0, 3)
    assert (d.action, d.code) == (action, code), d


def test_another_users_person_is_not_asked_for() -> None:
    assert decide(MISSING, None, REASONS, NOW, 300.0, 3, key_owner="someone-else").code == "other_owner"
    assert decide(MISSING, None, REASONS, NOW, 300.0, 3, key_owner="o").action == "ask"


def test_unreadable_is_asked_for_when_chosen() -> None:
    v = replace(MISSING, problems=[("person", "file_unreadable", "x")])
    assert decide(v, None, (*REASONS, "file_unreadable"), NOW, 300.0, 3).action == "ask"


BAD = OriginalVerdict(FACE, "original_checksum_mismatch", "its original ... is not the file Immich stored")
OK = OriginalVerdict(FACE, "original_ok", "fine")


@pytest.mark.parametrize(("verdict", "job", "original", "code"), [
    (MISSING, PersonJob("7", P, time.time(), "completed"), OK, "no_effect"),
    (MISSING, PersonJob("7", P, time.time(), "completed"), BAD, "original_checksum_mismatch"),
    (MISSING, PersonJob("7", P, time.time(), "failed", "boom"), None, "job_failed"),
    (MISSING, PersonJob("7", P), None, "job_waiting"),
    (MISSING, None, None, "queue_unknown"),
    (replace(MISSING, face_asset_id=None), None, None, "no_face"),
])
def test_explain_person(verdict: PersonVerdict, job: PersonJob | None, original: OriginalVerdict | None,
                        code: str) -> None:
    why = explain_person(verdict, job, original)
    assert why.code == code, why
    assert why.text
