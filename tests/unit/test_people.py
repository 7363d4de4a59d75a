"""``remediation/people.py``'s pure parts: a person's fresh check as the one decision sees it
(``seen_of``, then ``decision.decide``, the same rules as an asset's), and why its face thumbnail is still
broken, from made-up checks and ledger rows."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from immich_thumbnail_exporter.remediation.decision import Policy, QueueSeen, decide
from immich_thumbnail_exporter.remediation.jobwatch import JobSeen
from immich_thumbnail_exporter.remediation.ledger import Entry
from immich_thumbnail_exporter.remediation.original import OriginalVerdict
from immich_thumbnail_exporter.remediation.people import (
    explain_person,
    person_reasons,
    person_text,
    seen_of,
)
from immich_thumbnail_exporter.scan.verdict import PersonVerdict

P = "11111111-1111-4111-8111-111111111111"
FACE = "22222222-2222-4222-8222-222222222222"
REASONS = ("file_missing", "file_empty", "file_corrupt")
MISSING = PersonVerdict(P, True, "o", "/data/thumbs/o/11/11/p.jpeg", FACE, "/data/upload/a.jpg", True,
                        [("person", "file_missing", "/data/thumbs/o/11/11/p.jpeg")])
SOUND = replace(MISSING, problems=[])
POLICY = Policy(max_attempts=3, retry_after=300.0)


def entry(state: str, attempts: int = 1) -> Entry:
    return Entry(P, state, attempts, frozenset({"person"}), 1.0, 1.0, None, None, None, None, None)


# (verdict, ledger row, seconds since the last request, action, reason)
CASES: list[tuple[PersonVerdict, Entry | None, float | None, str, str]] = [
    (MISSING, None, None, "submit", "new"),
    (SOUND, None, None, "skip", "nothing_to_fix"),
    (PersonVerdict(P, False), None, None, "skip", "not_in_database"),
    (replace(MISSING, face_asset_id=None), None, None, "skip", "no_face"),
    (replace(MISSING, original_exists=False), None, None, "skip", "original_missing"),
    (replace(MISSING, original_exists=None), None, None, "submit", "new"),  # cannot tell: asking finds out
    # Not asked for unless named: the exporter cannot read it, its path is refused, or Immich makes it.
    (replace(MISSING, problems=[("person", "file_unreadable", "x")]), None, None, "skip", "reason_not_submitted"),
    (replace(MISSING, problems=[("person", "path_refused", "x")]), None, None, "skip", "reason_not_submitted"),
    (replace(MISSING, problems=[("person", "no_record", None)]), None, None, "skip", "reason_not_submitted"),
    # An unreadable file of a person without a face: the file reason comes first.
    (replace(MISSING, face_asset_id=None, problems=[("person", "file_unreadable", "x")]), None, None, "skip",
     "reason_not_submitted"),
    # The ledger: an open attempt runs, then settles; a fresh failure waits for its window; none left.
    (MISSING, entry("submitted"), 10.0, "wait", "attempt_running"),
    (MISSING, entry("submitted"), 400.0, "retry", "attempt_over"),
    (MISSING, entry("submitted", 3), 2000.0, "give_up", "attempts_exhausted"),
    (SOUND, entry("submitted"), 10.0, "fixed", "fixed"),
    (SOUND, entry("still_missing"), 10.0, "fixed", "fixed"),
    (MISSING, entry("still_missing"), 10.0, "wait", "retry_not_due"),
    (MISSING, entry("still_missing"), 400.0, "submit", "retry_due"),
    (MISSING, entry("not_queued", 3), 10_000.0, "give_up", "attempts_exhausted"),
    (MISSING, entry("gave_up", 3), None, "gave_up", "gave_up_earlier"),
    (MISSING, entry("fixed"), None, "submit", "broken_again"),  # fixed once and broken again: start over
    (replace(MISSING, face_asset_id=None), entry("submitted"), 10.0, "give_up", "no_face"),
    (PersonVerdict(P, False), entry("still_missing"), 10.0, "give_up", "not_in_database"),
]


@pytest.mark.parametrize(("verdict", "row", "since", "action", "reason"), CASES)
def test_the_one_decision_about_a_person(verdict: PersonVerdict, row: Entry | None, since: float | None,
                                         action: str, reason: str) -> None:
    seen = seen_of(verdict, REASONS)
    assert seen.target == "person"
    d = decide(row, seen, QueueSeen(since_request=since), POLICY)
    assert (d.action, d.reason) == (action, reason), d
    assert person_text(d.reason, verdict)


def test_another_users_person_is_not_asked_for() -> None:
    other = replace(POLICY, key_owner="someone-else")
    assert decide(None, seen_of(MISSING, REASONS), QueueSeen(), other).reason == "other_owner"
    assert decide(None, seen_of(MISSING, REASONS), QueueSeen(), replace(POLICY, key_owner="o")).action == "submit"


def test_unreadable_is_asked_for_when_chosen() -> None:
    v = replace(MISSING, problems=[("person", "file_unreadable", "x")])
    assert decide(None, seen_of(v, (*REASONS, "file_unreadable")), QueueSeen(), POLICY).action == "submit"


BAD = OriginalVerdict(FACE, "original_checksum_mismatch", "its original ... is not the file Immich stored")
OK = OriginalVerdict(FACE, "original_ok", "fine")


@pytest.mark.parametrize(("verdict", "job", "original", "code"), [
    (MISSING, JobSeen("7", P, 0.0, finished_at=time.time(), outcome="completed"), OK, "no_effect"),
    (MISSING, JobSeen("7", P, 0.0, finished_at=time.time(), outcome="completed"), BAD, "original_checksum_mismatch"),
    (MISSING, JobSeen("7", P, 0.0, finished_at=time.time(), outcome="failed", failed_reason="boom"), None,
     "job_failed"),
    (MISSING, JobSeen("7", P, 0.0), None, "job_waiting"),
    (MISSING, None, None, "queue_unknown"),
    (replace(MISSING, face_asset_id=None), None, None, "no_face"),
])
def test_explain_person(verdict: PersonVerdict, job: JobSeen | None, original: OriginalVerdict | None,
                        code: str) -> None:
    why = explain_person(verdict, job, original)
    assert why.code == code, why
    assert why.text


def test_an_empty_path_is_not_asked_for_by_default() -> None:
    """remediation.reasons' default includes no_record; a person with an empty path is Immich's own
    "Missing" job's, so the people flow leaves it out unless --reason names it."""
    configured = ("no_record", "file_missing", "file_empty", "file_corrupt")
    assert person_reasons(configured) == ("file_missing", "file_empty", "file_corrupt")
    blank = replace(MISSING, problems=[("person", "no_record", None)])
    assert decide(None, seen_of(blank, person_reasons(configured)), QueueSeen(), POLICY).reason == \
        "reason_not_submitted"
    assert decide(None, seen_of(blank, configured), QueueSeen(), POLICY).action == "submit"
