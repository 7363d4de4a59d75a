"""The one remediation decision (``remediation.decision.decide``): every action and reason from made-up
ledger entries, checks and queue views; and the retry clock, on a fake wall and monotonic clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from immich_thumbnail_exporter.remediation.decision import (
    ACTIONS,
    FIXED,
    GAVE_UP,
    GIVE_UP,
    REASONS,
    RETRY,
    SETTLE,
    SKIP,
    SUBMIT,
    WAIT,
    Decision,
    Policy,
    QueueSeen,
    RetryClock,
    Seen,
    decide,
)
from immich_thumbnail_exporter.remediation.ledger import Entry

A = "00000000-0000-4000-8000-000000000001"
ME, OTHER = "user-me", "user-other"
POLICY = Policy(max_attempts=3, retry_after=100.0, key_owner=ME)
BROKEN = Seen(owner=ME, broken=frozenset({"preview"}), fixable=frozenset({"preview"}))
SOUND = Seen(owner=ME)
NO_QUEUE = QueueSeen()


def entry(state: str, attempts: int = 1, kinds: frozenset[str] = frozenset({"thumbnail"})) -> Entry:
    return Entry(A, state, attempts, kinds, 1.0, 1.0, None, state, None, None, None)


# (name, ledger entry, check, queue, policy, expected action, expected reason, reset)
CASES: list[tuple[str, Entry | None, Seen, QueueSeen, Policy, str, str, bool]] = [
    # Regeneration cannot help: skipped, or an attempt under way given up.
    ("gone, never asked", None, Seen(exists=False), NO_QUEUE, POLICY, SKIP, "not_in_database", False),
    ("gone while asked", entry("submitted"), Seen(exists=False), NO_QUEUE, POLICY, GIVE_UP, "not_in_database", False),
    ("gone after a fix", entry("fixed"), Seen(exists=False), NO_QUEUE, POLICY, SKIP, "not_in_database", False),
    ("trashed or hidden", None, replace(BROKEN, eligible=False), NO_QUEUE, POLICY, SKIP, "not_eligible", False),
    ("original missing", None, replace(BROKEN, original="original_missing"), NO_QUEUE, POLICY, SKIP,
     "original_missing", False),
    ("original missing while asked", entry("still_missing"), replace(BROKEN, original="original_missing"),
     NO_QUEUE, POLICY, GIVE_UP, "original_missing", False),
    # The hook for remediation/original.py: its reasons pass through.
    ("original corrupt", None, replace(BROKEN, original="original_corrupt"), NO_QUEUE, POLICY, SKIP,
     "original_corrupt", False),
    ("original unreadable while asked", entry("submitted"), replace(BROKEN, original="original_unreadable"),
     NO_QUEUE, POLICY, GIVE_UP, "original_unreadable", False),
    ("original replaced", None, replace(BROKEN, original="original_checksum_mismatch"), NO_QUEUE, POLICY, SKIP,
     "original_checksum_mismatch", False),
    ("original replaced while asked", entry("still_missing"), replace(BROKEN, original="original_checksum_mismatch"),
     NO_QUEUE, POLICY, GIVE_UP, "original_checksum_mismatch", False),
    ("original corrupt while its job runs", entry("submitted"), replace(BROKEN, original="original_corrupt"),
     NO_QUEUE, POLICY, GIVE_UP, "original_corrupt", False),
    # A person (face thumbnail): the same rules; no feature face is its original's reason.
    ("person without a feature face", None, replace(BROKEN, original="no_face", target="person"), NO_QUEUE,
     POLICY, SKIP, "no_face", False),
    ("person's feature face gone while asked", entry("submitted", kinds=frozenset({"person"})),
     replace(BROKEN, original="no_face", target="person"), NO_QUEUE, POLICY, GIVE_UP, "no_face", False),
    ("person never asked", None, replace(BROKEN, target="person", broken=frozenset({"person"}),
                                         fixable=frozenset({"person"})), NO_QUEUE, POLICY, SUBMIT, "new", False),
    ("original unreadable", None, replace(BROKEN, original="original_unreadable"), NO_QUEUE, POLICY, SKIP,
     "original_unreadable", False),
    ("original corrupt while asked", entry("not_queued"), replace(BROKEN, original="original_corrupt"),
     NO_QUEUE, POLICY, GIVE_UP, "original_corrupt", False),
    ("nothing broken", None, SOUND, NO_QUEUE, POLICY, SKIP, "nothing_to_fix", False),
    ("fixed since asked", entry("submitted"), SOUND, NO_QUEUE, POLICY, FIXED, "fixed", False),
    ("fixed after a settled attempt", entry("still_missing"), SOUND, NO_QUEUE, POLICY, FIXED, "fixed", False),
    ("broken, reason not submitted", None, replace(BROKEN, fixable=frozenset()), NO_QUEUE, POLICY, SKIP,
     "reason_not_submitted", False),
    # What Immich would refuse (and sink the whole batch with).
    ("locked", None, replace(BROKEN, locked=True), NO_QUEUE, POLICY, SKIP, "locked", False),
    ("another owner's", None, replace(BROKEN, owner=OTHER), NO_QUEUE, POLICY, SKIP, "other_owner", False),
    ("owner unknown: sent", None, replace(BROKEN, owner=OTHER), NO_QUEUE, replace(POLICY, key_owner=None),
     SUBMIT, "new", False),
    ("already queued", None, BROKEN, QueueSeen(queued=True), POLICY, SKIP, "queued", False),
    # Immich refused it on its own (a 400 isolated from its batch): not asked again every round.
    ("refused lately", entry("error", 0), BROKEN, QueueSeen(since_refused=99), POLICY, SKIP, "refused", False),
    ("refused a window ago", entry("error", 0), BROKEN, QueueSeen(since_refused=100), POLICY, SUBMIT, "retry_due",
     False),
    ("refused lately, never asked before", None, BROKEN, QueueSeen(since_refused=5), POLICY, SKIP, "refused",
     False),
    ("new", None, BROKEN, NO_QUEUE, POLICY, SUBMIT, "new", False),
    ("a person (face thumbnail)", None, replace(BROKEN, target="person"), NO_QUEUE, POLICY, SUBMIT, "new", False),
    ("broken again after a fix", entry("fixed"), BROKEN, NO_QUEUE, POLICY, SUBMIT, "broken_again", True),
    ("broken again, not reopened", entry("fixed"), BROKEN, NO_QUEUE, replace(POLICY, reopen_fixed=False), SKIP,
     "nothing_to_fix", False),
    ("given up earlier", entry("gave_up", 3), BROKEN, NO_QUEUE, POLICY, GAVE_UP, "gave_up_earlier", False),
    ("given up, retried on request", entry("gave_up", 3), BROKEN, NO_QUEUE, replace(POLICY, retry_gave_up=True),
     SUBMIT, "retry_gave_up", True),
    ("given up, retried, locked", entry("gave_up", 3), replace(BROKEN, locked=True), NO_QUEUE,
     replace(POLICY, retry_gave_up=True), SKIP, "locked", False),
    # An attempt under way (submitted): its window is 100s after attempt 1, 200s after attempt 2.
    ("attempt running", entry("submitted"), BROKEN, QueueSeen(since_request=50), POLICY, WAIT, "attempt_running",
     False),
    ("job finished, window not over", entry("submitted"), BROKEN, QueueSeen(attempt_over=True, since_request=50),
     POLICY, SETTLE, "attempt_over", False),
    ("window over: ask again", entry("submitted"), BROKEN, QueueSeen(since_request=100), POLICY, RETRY,
     "attempt_over", False),
    ("window over, a job waits", entry("submitted"), BROKEN, QueueSeen(queued=True, since_request=150), POLICY,
     SETTLE, "attempt_over", False),
    ("window over, now locked", entry("submitted"), replace(BROKEN, locked=True), QueueSeen(since_request=150),
     POLICY, SETTLE, "attempt_over", False),
    ("attempt 2's window is longer", entry("submitted", 2), BROKEN, QueueSeen(since_request=150), POLICY, WAIT,
     "attempt_running", False),
    ("last attempt over", entry("submitted", 3), BROKEN, QueueSeen(attempt_over=True, since_request=1), POLICY,
     GIVE_UP, "attempts_exhausted", False),
    # Settled attempts (still_missing, not_queued, error): asked again once the window has passed.
    ("retry not due", entry("still_missing"), BROKEN, QueueSeen(since_request=99), POLICY, WAIT, "retry_not_due",
     False),
    ("retry due", entry("still_missing"), BROKEN, QueueSeen(since_request=100), POLICY, SUBMIT, "retry_due", False),
    ("not queued, retry due", entry("not_queued"), BROKEN, QueueSeen(since_request=100), POLICY, SUBMIT,
     "retry_due", False),
    ("request failed: asked again", entry("error", 0), BROKEN, NO_QUEUE, POLICY, SUBMIT, "retry_due", False),
    ("retry due, queued", entry("still_missing"), BROKEN, QueueSeen(queued=True, since_request=500), POLICY, SKIP,
     "queued", False),
    ("retry due, another owner's", entry("still_missing"), replace(BROKEN, owner=OTHER),
     QueueSeen(since_request=500), POLICY, SKIP, "other_owner", False),
    ("retry due, no attempts left", entry("not_queued", 3), BROKEN, QueueSeen(since_request=500), POLICY, GIVE_UP,
     "attempts_exhausted", False),
]


@pytest.mark.parametrize(("name", "e", "seen", "queue", "policy", "action", "reason", "reset"), CASES,
                         ids=[c[0] for c in CASES])
def test_decide(name: str, e: Entry | None, seen: Seen, queue: QueueSeen, policy: Policy, action: str, reason: str,
                reset: bool) -> None:
    d = decide(e, seen, queue, policy)
    assert (d.action, d.reason, d.reset) == (action, reason, reset)
    assert d.reason in REASONS[d.action]


def test_the_table_covers_every_action_and_reason() -> None:
    covered = {(c[5], c[6]) for c in CASES}
    assert covered == {(a, r) for a in ACTIONS for r in REASONS[a]}


def test_kinds_asked_for_include_those_already_tracked() -> None:
    d = decide(entry("still_missing"), BROKEN, QueueSeen(since_request=500), POLICY)
    assert d == Decision(SUBMIT, "retry_due", kinds=frozenset({"preview", "thumbnail"}))
    # Starting over asks only for what is broken now.
    d = decide(entry("fixed"), BROKEN, NO_QUEUE, POLICY)
    assert d.kinds == frozenset({"preview"})


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_000_000.0
        self.mono = 50.0

    def step(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_a_forward_wall_clock_step_does_not_make_a_retry_due_early() -> None:
    c = Clocks()
    clock = RetryClock(wall=lambda: c.wall, mono=lambda: c.mono)
    sent = entry("still_missing")
    sent = replace(sent, last_submitted=c.wall)
    clock.requested(A, c.wall)
    c.step(30)
    assert clock.since(sent) == pytest.approx(30)
    c.wall += 3600  # NTP steps the wall clock an hour forward
    assert clock.since(sent) == pytest.approx(30)
    assert decide(sent, BROKEN, QueueSeen(since_request=clock.since(sent)), POLICY).action == WAIT
    c.step(70)
    assert decide(sent, BROKEN, QueueSeen(since_request=clock.since(sent)), POLICY).action == SUBMIT


def test_a_request_from_an_earlier_process_is_pinned_when_first_seen() -> None:
    c = Clocks()
    clock = RetryClock(wall=lambda: c.wall, mono=lambda: c.mono)
    earlier = replace(entry("still_missing"), last_submitted=c.wall - 40)  # read from the ledger
    assert clock.since(earlier) == pytest.approx(40)
    c.wall += 3600
    assert clock.since(earlier) == pytest.approx(40)
    c.wall -= 7200  # and back: no effect either
    c.mono += 10
    assert clock.since(earlier) == pytest.approx(50)
    # A wall clock behind the recorded request (stepped back before this process started): never negative.
    later = replace(entry("still_missing"), asset_id="b", last_submitted=c.wall + 500)
    assert clock.since(later) == pytest.approx(0)
    # A new request replaces the pin.
    renewed = replace(earlier, last_submitted=c.wall)
    clock.requested(A, c.wall)
    assert clock.since(renewed) == pytest.approx(0)
    assert clock.since(replace(earlier, attempts=0, last_submitted=None)) is None


def test_a_refusal_is_timed_on_the_monotonic_clock_too() -> None:
    c = Clocks()
    clock = RetryClock(wall=lambda: c.wall, mono=lambda: c.mono)
    refused = replace(entry("error", 0), last_outcome="refused", last_checked=c.wall - 10)
    view = clock.view(refused)
    assert view.since_refused == pytest.approx(10) and view.since_request is None
    c.wall += 3600
    assert decide(refused, BROKEN, clock.view(refused), POLICY).reason == "refused"
    c.mono += 90
    assert decide(refused, BROKEN, clock.view(refused), POLICY) == Decision(SUBMIT, "retry_due",
                                                                             kinds=frozenset({"preview", "thumbnail"}))
    assert clock.view(entry("error", 0)).since_refused is None
