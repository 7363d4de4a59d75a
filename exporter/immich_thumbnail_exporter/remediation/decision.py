"""The one remediation decision: what to do about one target now, and why.

``regenerate`` (``remediation/engine.py``) and ``serve``'s rounds (``remediation/rounds.py``) used to
answer the same questions each in its own way. Both now call ``decide``, a pure function (no I/O, no
clock) of four inputs:

* ``entry``: the target's ledger entry (``ledger.Entry``), or None when nothing was ever asked for it;
* ``seen``: its fresh targeted check (``Seen``: does it exist, is it eligible, locked, owned by whom,
  what is broken, its original);
* ``queue``: the queue's view of it (``QueueSeen``: a job naming it waits there; its latest attempt is
  known to be over because its job finished or none was queued; how long ago, by the monotonic clock,
  the last request went, and the last time Immich refused it on its own);
* ``policy``: the run's rules (``Policy``: attempts, the retry window, the key's user, ...).

It returns a ``Decision``: an action (``ACTIONS``) and a reason code (``REASONS``). The caller does the
I/O the action asks for (record in the ledger, send, report) and words the reason (``why.SKIP_TEXT``).

Time: "is a retry due" is decided on ``QueueSeen.since_request``, the seconds since the last request
as measured by ``RetryClock`` (monotonic within a process). The ledger keeps wall-clock times so that a
restart carries on; a wall clock stepped forward must not make remediation ask again early.

Hooks for later targets and checks (``remediation/people.py``, ``remediation/original.py``):

* ``Seen.target`` names the kind of target: ``asset``, or ``person`` for face thumbnails
  (``people.seen_of``; its ledger row has kinds ``{"person"}``). The rules do not depend on it; a person
  has no ``locked`` or ``eligible`` notion of its own and passes the defaults (eligible, not locked).
* ``Seen.original`` is the original file's state: ``ok``, or one of ``ORIGINAL_REASONS``: what the
  original check finds (``original_missing``, ``original_corrupt``, ``original_unreadable``,
  ``original_checksum_mismatch``), and for a person ``no_face`` (no feature face to crop from). Every
  value but ``ok`` makes regeneration pointless: the target is skipped with that reason, and an attempt
  under way is given up with it. A new reason needs only a ``SKIP_TEXT`` sentence; ``decide`` passes it
  through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from immich_thumbnail_exporter.remediation.ledger import AWAITING, RETRYABLE, Entry, window
from immich_thumbnail_exporter.vocabulary import ORIGINAL_BROKEN

# What the caller does.
SUBMIT = "submit"  # ask Immich now (claim in the ledger first); ``reset``: start the attempts over
WAIT = "wait"  # asked earlier, nothing to do now: its attempt runs, or its next window is not over
SETTLE = "settle"  # its attempt is over and it is still broken: record still_missing, ask again later
RETRY = "retry"  # its attempt is over, still broken, and the window has passed: record, then ask again
FIXED = "fixed"  # asked earlier and sound now: record fixed
GIVE_UP = "give_up"  # stop trying (record gave_up with the reason)
GAVE_UP = "gave_up"  # given up earlier: report it, ask nothing
SKIP = "skip"  # not asked, for the reason given
ACTIONS = (SUBMIT, WAIT, SETTLE, RETRY, FIXED, GIVE_UP, GAVE_UP, SKIP)

# ``Seen.original`` values that make a request pointless: the original check's (``remediation/original.py``,
# ``vocabulary.ORIGINAL_BROKEN``), and, for a person, no feature face to crop its thumbnail from.
ORIGINAL_REASONS = (*ORIGINAL_BROKEN, "no_face")
# Reason codes, per action.
REASONS = {
    SUBMIT: ("new", "broken_again", "retry_gave_up", "retry_due"),
    WAIT: ("attempt_running", "retry_not_due"),
    SETTLE: ("attempt_over",),
    RETRY: ("attempt_over",),
    FIXED: ("fixed",),
    GIVE_UP: ("attempts_exhausted", "not_in_database", *ORIGINAL_REASONS),
    GAVE_UP: ("gave_up_earlier",),
    SKIP: ("not_in_database", "not_eligible", *ORIGINAL_REASONS, "nothing_to_fix", "reason_not_submitted", "locked",
           "other_owner", "queued", "refused"),
}
# Original states other than these are reasons of their own (skip or give up with them).
ORIGINAL_OK = "ok"


@dataclass(frozen=True)
class Seen:
    """The fresh targeted check of one target."""

    exists: bool = True
    eligible: bool = True
    # visibility = 'locked' (Immich v1.133+): an API key never reaches it.
    locked: bool = False
    owner: str | None = None
    # Broken kinds the run looks at, and the subset whose reasons it may ask Immich to fix.
    broken: frozenset[str] = frozenset()
    fixable: frozenset[str] = frozenset()
    # ok, original_missing, or a reason from the original check (original_corrupt, ...).
    original: str = ORIGINAL_OK
    target: str = "asset"


@dataclass(frozen=True)
class QueueSeen:
    """The queue's view of one target, and the time since it was last asked for."""

    # A job naming it waits in the queue now (None: Redis not configured or not read).
    queued: bool | None = None
    # Its latest attempt is known to be over: its job finished, or Immich queued none.
    attempt_over: bool = False
    # Seconds since the last request (``RetryClock``); None when never asked.
    since_request: float | None = None
    # Seconds since Immich last refused it on its own (400, isolated from its batch); None when it did not.
    since_refused: float | None = None


@dataclass(frozen=True)
class Policy:
    max_attempts: int = 3
    retry_after: float = 300.0
    retry_gave_up: bool = False
    # The API key's user when known: another user's targets are refused by Immich.
    key_owner: str | None = None
    # Ask again for a target fixed earlier and broken now (False: report it, leave it).
    reopen_fixed: bool = True


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str
    # Start the attempts over (broken again after a fix, or retrying what was given up).
    reset: bool = False
    # The kinds to ask for (the broken fixable ones, plus those the ledger already tracks).
    kinds: frozenset[str] = field(default_factory=frozenset)


def _skip(reason: str) -> Decision:
    return Decision(SKIP, reason)


def _stop(entry: Entry | None, reason: str) -> Decision:
    """Regeneration cannot help: give up what is under way, skip the rest."""
    if entry is not None and entry.state in (*AWAITING, *RETRYABLE):
        return Decision(GIVE_UP, reason)
    return _skip(reason)


def decide(entry: Entry | None, seen: Seen, queue: QueueSeen, policy: Policy) -> Decision:
    """What to do about one target now, and why (see the module docstring)."""
    if not seen.exists:
        return _stop(entry, "not_in_database")
    if not seen.eligible:
        return _skip("not_eligible")
    if seen.original != ORIGINAL_OK:
        return _stop(entry, seen.original)
    pending = entry is not None and entry.state in (*AWAITING, *RETRYABLE)
    if not seen.broken:
        return Decision(FIXED, "fixed") if pending else _skip("nothing_to_fix")
    if not seen.fixable:
        return _skip("reason_not_submitted")
    kinds = seen.fixable | (entry.kinds if entry is not None else frozenset())
    if entry is not None and entry.state in AWAITING:
        over = window_over(entry, queue.since_request, policy.retry_after)
        if not (queue.attempt_over or over):
            return Decision(WAIT, "attempt_running", kinds=kinds)
        if entry.attempts >= policy.max_attempts:
            return Decision(GIVE_UP, "attempts_exhausted", kinds=kinds)
        if not over or queue.queued:
            return Decision(SETTLE, "attempt_over", kinds=kinds)
        blocked = _blocked(seen, policy)
        if blocked is not None:
            return Decision(SETTLE, "attempt_over", kinds=kinds)
        return Decision(RETRY, "attempt_over", kinds=kinds)
    # Never asked, or asked and settled: may it be asked for now?
    blocked = _blocked(seen, policy)
    if entry is not None and entry.state == "gave_up":
        if not policy.retry_gave_up:
            return Decision(GAVE_UP, "gave_up_earlier", kinds=kinds)
        if blocked is not None:
            return _skip(blocked)
        return Decision(SUBMIT, "retry_gave_up", reset=True, kinds=seen.fixable)
    if blocked is not None:
        return _skip(blocked)
    if queue.since_refused is not None and queue.since_refused < policy.retry_after:
        return _skip("refused")  # asked again once a window has passed, not every round
    if queue.queued:
        return _skip("queued")
    if entry is None:
        return Decision(SUBMIT, "new", kinds=kinds)
    if entry.state == "fixed":
        if not policy.reopen_fixed:
            return _skip("nothing_to_fix")
        return Decision(SUBMIT, "broken_again", reset=True, kinds=seen.fixable)
    # still_missing, not_queued, error: once the window has passed and attempts remain.
    since = queue.since_request
    if since is not None and entry.attempts >= 1 and since < window(entry.attempts, policy.retry_after):
        return Decision(WAIT, "retry_not_due", kinds=kinds)
    if entry.attempts >= policy.max_attempts:
        return Decision(GIVE_UP, "attempts_exhausted", kinds=kinds)
    return Decision(SUBMIT, "retry_due", kinds=kinds)


def window_over(entry: Entry, since: float | None, retry_after: float) -> bool:
    """Has the window after the entry's last request passed (``since``: ``RetryClock.since``)?"""
    return since is None or since >= window(entry.attempts, retry_after)


def _blocked(seen: Seen, policy: Policy) -> str | None:
    """Why Immich would refuse a request naming this target (it would sink the whole batch)."""
    if seen.locked:
        return "locked"
    if policy.key_owner is not None and seen.owner is not None and seen.owner != policy.key_owner:
        return "other_owner"
    return None


class RetryClock:
    """Seconds since each target's last request, by the monotonic clock within a process.

    The ledger stores wall-clock times (a restart must carry on). The first time this process sees a
    request (made by it, or read from the ledger) it pins the request to the monotonic clock, using the
    wall clock's distance at that moment (never negative); from then on a wall clock stepped forward or
    back changes nothing. Only across a restart does a step count, once.
    """

    def __init__(self, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic) -> None:
        self._wall = wall
        self._mono = mono
        self._pinned: dict[str, tuple[float, float]] = {}  # target -> (wall time of request, monotonic)

    def requested(self, target: str, wall_at: float) -> None:
        """This process just sent a request recorded at ``wall_at``."""
        self._pinned[target] = (wall_at, self._mono())

    def since(self, entry: Entry | None) -> float | None:
        if entry is None or entry.last_submitted is None or entry.attempts < 1:
            return None
        # Another process's request, or one from before this process, is pinned when first seen.
        return self._since(entry.asset_id, entry.last_submitted)

    def view(self, entry: Entry | None, queued: bool | None = None, attempt_over: bool = False) -> QueueSeen:
        """The decision's ``QueueSeen`` for an entry, with this clock's times."""
        return QueueSeen(queued=queued, attempt_over=attempt_over, since_request=self.since(entry),
                         since_refused=self.since_refused(entry))

    def since_refused(self, entry: Entry | None) -> float | None:
        """Seconds since Immich refused the target on its own (the ledger keeps when: ``last_checked``)."""
        if entry is None or entry.last_outcome != "refused" or entry.last_checked is None:
            return None
        return self._since(f"{entry.asset_id}#refused", entry.last_checked)

    def _since(self, key: str, wall_at: float) -> float:
        pinned = self._pinned.get(key)
        if pinned is None or pinned[0] != wall_at:
            pinned = (wall_at, self._mono() - max(0.0, self._wall() - wall_at))
            self._pinned[key] = pinned
        return self._mono() - pinned[1]

    def forget(self, target: str) -> None:
        self._pinned.pop(target, None)
