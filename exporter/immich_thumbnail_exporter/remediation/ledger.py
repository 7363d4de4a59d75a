"""The remediation ledger: what was asked of Immich, when, how often, and what came of it.

A small SQLite file (standard library, WAL mode) in the state directory, one row per asset. It is what
lets an interrupted ``regenerate`` or a restarted ``serve`` carry on without losing track and without
asking again too early:

* a submission is recorded *before* the request is sent (state ``submitting``, attempt counted). If the
  process dies before the answer, the next run treats the asset as submitted: it is verified later and
  only resubmitted once its waiting window has passed. A refused or failed request is rolled back.
* the waiting window after attempt *n* is ``retry_after * 2**(n-1)`` (backoff); after the last attempt's
  window an asset that is still broken is given up, with the reason.
* claims run in ``BEGIN IMMEDIATE`` transactions, so ``serve`` and a ``regenerate`` run sharing the
  state directory never both submit one asset.
* each attempt keeps the job Immich queued for it (``job_id``); why the last attempt that ended left the
  asset broken stays until it is fixed (``why``: a ``vocabulary.WHY`` code, ``why_text``: the sentence
  the reports show).

Files written before those columns existed (schema version 1) are upgraded in place when opened for
writing and read as they are (the new columns empty) when opened read-only.

Nothing here talks to Immich: the ledger only records.

States: ``submitting`` (claimed, request in flight or interrupted), ``submitted`` (Immich accepted it),
``not_queued`` (Immich accepted it and queued no job; may be resubmitted), ``still_missing`` (its attempt
is over and the asset is still broken; may be resubmitted), ``error`` (the request failed; may be
resubmitted), ``fixed``, ``gave_up``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from immich_thumbnail_exporter.remediation.why import Why

FILENAME = "remediation.sqlite3"
SCHEMA_VERSION = "2"

AWAITING = ("submitting", "submitted")
RETRYABLE = ("still_missing", "not_queued", "error")
# Submitted and not settled: verified again until fixed or given up.
PENDING = (*AWAITING, "still_missing", "not_queued")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS asset (
    asset_id        TEXT PRIMARY KEY,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    kinds           TEXT NOT NULL DEFAULT '',
    first_submitted REAL,
    last_submitted  REAL,
    last_checked    REAL,
    last_outcome    TEXT,
    detail          TEXT,
    gave_up_reason  TEXT,
    fixed_at        REAL,
    updated         REAL NOT NULL,
    job_id          TEXT,
    why             TEXT,
    why_text        TEXT
);
CREATE INDEX IF NOT EXISTS asset_state ON asset (state, last_submitted);
"""

_COLUMN_NAMES = (
    "asset_id", "state", "attempts", "kinds", "first_submitted", "last_submitted", "last_checked",
    "last_outcome", "detail", "gave_up_reason", "fixed_at", "job_id", "why", "why_text",
)
# Added by schema version 2: (name, type) for ALTER TABLE.
_ADDED_COLUMNS = (("job_id", "TEXT"), ("why", "TEXT"), ("why_text", "TEXT"))


class LedgerError(Exception):
    """The state directory or its database cannot be used; one line fit for an error message."""


@dataclass(frozen=True)
class Entry:
    asset_id: str
    state: str
    attempts: int
    kinds: frozenset[str]
    first_submitted: float | None
    last_submitted: float | None
    last_checked: float | None
    last_outcome: str | None
    detail: str | None
    gave_up_reason: str | None
    fixed_at: float | None
    job_id: str | None = None
    why: str | None = None
    why_text: str | None = None

    def window(self, retry_after: float) -> float:
        """How long to wait after the last attempt before calling it failed (backoff per attempt)."""
        return window(self.attempts, retry_after)

    def due_at(self, retry_after: float) -> float:
        """When the last attempt's window ends (now, when nothing was submitted yet)."""
        if self.last_submitted is None or self.attempts < 1:
            return 0.0
        return self.last_submitted + self.window(retry_after)


@dataclass(frozen=True)
class Claim:
    """What a claim changed, so a refused request can be rolled back exactly."""

    asset_id: str
    prev_state: str | None
    prev_attempts: int
    prev_first: float | None
    prev_last: float | None


def window(attempts: int, retry_after: float) -> float:
    return float(retry_after) * float(1 << max(attempts - 1, 0))


def _row(r: Any) -> Entry:
    kinds = str(r[3] or "")
    return Entry(
        asset_id=str(r[0]),
        state=str(r[1]),
        attempts=int(r[2]),
        kinds=frozenset(k for k in kinds.split(",") if k),
        first_submitted=_float(r[4]),
        last_submitted=_float(r[5]),
        last_checked=_float(r[6]),
        last_outcome=None if r[7] is None else str(r[7]),
        detail=None if r[8] is None else str(r[8]),
        gave_up_reason=None if r[9] is None else str(r[9]),
        fixed_at=_float(r[10]),
        job_id=_str(r[11]),
        why=_str(r[12]),
        why_text=_str(r[13]),
    )


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _float(v: Any) -> float | None:
    if v is None:
        return None
    return float(v)


def _chunks(items: list[str], n: int = 500) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Ledger:
    def __init__(self, directory: str, *, readonly: bool = False) -> None:
        self.directory = directory
        self.path = os.path.join(directory, FILENAME)
        self.readonly = readonly
        # The last write's failure ("database or disk is full"), until a write succeeds.
        self.failed: str | None = None
        try:
            if readonly:
                uri = "file:" + self.path.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None)
            else:
                os.makedirs(directory, mode=0o750, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._upgrade()
            self._db.execute("PRAGMA busy_timeout=5000")
            present = {str(r[1]) for r in self._db.execute("PRAGMA table_info(asset)")}
            # Read-only, a version 1 file lacks the newer columns: they read as empty.
            self._columns = ", ".join(c if c in present else f"NULL AS {c}" for c in _COLUMN_NAMES)
        except OSError as exc:
            raise LedgerError(
                f"cannot use state directory {directory}: {exc.strerror or exc} "
                "(set --state-dir or remediation.state_dir)"
            ) from None
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the remediation ledger {self.path}: {exc}") from None

    def _upgrade(self) -> None:
        present = {str(r[1]) for r in self._db.execute("PRAGMA table_info(asset)")}
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for name, kind in _ADDED_COLUMNS:
                if name not in present:
                    self._db.execute(f"ALTER TABLE asset ADD COLUMN {name} {kind}")
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (SCHEMA_VERSION,)
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    @classmethod
    def open_existing(cls, directory: str) -> Ledger | None:
        """Read-only, for dry runs: None when there is no ledger yet (a dry run creates nothing)."""
        if not os.path.exists(os.path.join(directory, FILENAME)):
            return None
        return cls(directory, readonly=True)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise LedgerError("the ledger is open read-only")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        try:
            yield self._db
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._failed(exc) from None
        except BaseException:
            self._rollback()
            raise
        self.failed = None

    def _failed(self, exc: sqlite3.Error) -> LedgerError:
        # Kept until a write succeeds: a round that writes nothing must not look healthy meanwhile.
        self.failed = f"remediation ledger {self.path}: {exc}"
        return LedgerError(self.failed)

    def probe(self, now: float) -> None:
        """A small write (the time of the last round): raises LedgerError while the ledger cannot be
        written; clears ``failed`` once it can."""
        with self._write() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('last_write', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (repr(now),)
            )

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        try:
            return list(self._db.execute(sql, params))
        except sqlite3.Error as exc:
            raise LedgerError(f"remediation ledger {self.path}: {exc}") from None

    # -- readers ---------------------------------------------------------------------------------
    def get(self, asset_ids: Iterable[str]) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for chunk in _chunks(list(asset_ids)):
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT {self._columns} FROM asset WHERE asset_id IN ({marks})", chunk):
                e = _row(r)
                out[e.asset_id] = e
        return out

    def entries(self, states: Iterable[str], limit: int = 10_000) -> list[Entry]:
        """Entries in these states, oldest submission first."""
        wanted = list(states)
        marks = ",".join("?" * len(wanted))
        rows = self._query(
            f"SELECT {self._columns} FROM asset WHERE state IN ({marks}) ORDER BY last_submitted, asset_id LIMIT ?",
            [*wanted, limit],
        )
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        return {str(s): int(n) for s, n in self._query("SELECT state, count(*) FROM asset GROUP BY state", ())}

    # -- writers ---------------------------------------------------------------------------------
    def claim(
        self,
        kinds: Mapping[str, Iterable[str]],
        now: float,
        max_attempts: int,
        reset: Iterable[str] = (),
    ) -> list[Claim]:
        """Record a submission for each asset that may be submitted now; return those claimed.

        An asset may be submitted when the ledger has never seen it, or when its last attempt failed
        to fix it (or the request failed) and attempts remain. Whether its window has passed is the
        caller's decision (``decision.decide``, on the monotonic clock): the ledger's wall-clock times
        only carry it across restarts. Assets in ``reset`` start over (fixed earlier and broken again,
        or given up and retried on request). Everything else (awaiting verification, given up, fixed)
        is left alone: a claim in ``BEGIN IMMEDIATE`` sees another process's claim and skips it.
        """
        reset_set = set(reset)
        claimed: list[Claim] = []
        with self._write() as db:
            existing = {}
            for chunk in _chunks(list(kinds)):
                marks = ",".join("?" * len(chunk))
                for r in db.execute(f"SELECT {self._columns} FROM asset WHERE asset_id IN ({marks})", chunk):
                    existing[str(r[0])] = _row(r)
            for asset_id, asset_kinds in kinds.items():
                e = existing.get(asset_id)
                wanted = set(asset_kinds)
                if e is None:
                    db.execute(
                        "INSERT INTO asset (asset_id, state, attempts, kinds, first_submitted, last_submitted, "
                        "last_outcome, updated) VALUES (?, 'submitting', 1, ?, ?, ?, 'submitting', ?)",
                        (asset_id, ",".join(sorted(wanted)), now, now, now),
                    )
                    claimed.append(Claim(asset_id, None, 0, None, None))
                    continue
                fresh = asset_id in reset_set and e.state in ("fixed", "gave_up", *RETRYABLE)
                if fresh:
                    attempts, first = 0, None
                elif e.state in RETRYABLE and e.attempts < max_attempts:
                    attempts, first = e.attempts, e.first_submitted
                    wanted |= e.kinds
                else:
                    continue
                db.execute(
                    "UPDATE asset SET state = 'submitting', attempts = ?, kinds = ?, first_submitted = ?, "
                    "last_submitted = ?, last_outcome = 'submitting', gave_up_reason = NULL, fixed_at = NULL, "
                    "job_id = NULL, updated = ? WHERE asset_id = ?",
                    (attempts + 1, ",".join(sorted(wanted)), now if first is None else first, now, now, asset_id),
                )
                claimed.append(Claim(asset_id, e.state, e.attempts, e.first_submitted, e.last_submitted))
        return claimed

    def accepted(self, asset_ids: Iterable[str], now: float) -> None:
        with self._write() as db:
            db.executemany(
                "UPDATE asset SET state = 'submitted', last_outcome = 'accepted', detail = NULL, updated = ? "
                "WHERE asset_id = ? AND state = 'submitting'",
                [(now, a) for a in asset_ids],
            )

    def queued(self, jobs: Mapping[str, str], now: float) -> None:
        """The job Immich queued for each asset's latest attempt."""
        with self._write() as db:
            db.executemany(
                "UPDATE asset SET job_id = ?, updated = ? WHERE asset_id = ? AND state = 'submitted'",
                [(job_id, now, a) for a, job_id in jobs.items()],
            )

    def release(self, claims: Iterable[Claim], outcome: str, detail: str, now: float) -> None:
        """The request was refused or failed: it does not count as an attempt. An asset Immich refused on
        its own (``refused``) keeps when (``last_checked``), so that it is not asked again too soon."""
        with self._write() as db:
            for c in claims:
                state = c.prev_state or "error"
                db.execute(
                    "UPDATE asset SET state = ?, attempts = ?, first_submitted = ?, last_submitted = ?, "
                    "last_outcome = ?, detail = ?, last_checked = CASE WHEN ? = 'refused' THEN ? "
                    "ELSE last_checked END, updated = ? WHERE asset_id = ? AND state = 'submitting'",
                    (state, c.prev_attempts, c.prev_first, c.prev_last, outcome, detail, outcome, now, now,
                     c.asset_id),
                )

    def not_queued(self, asset_ids: Iterable[str], now: float, max_attempts: int) -> dict[str, str]:
        """Immich accepted these and queued nothing: the attempt is over. Returns each asset's outcome,
        ``not_queued`` (to be resubmitted once its window has passed) or ``gave_up`` (no attempts left)."""
        text = why_text = "Immich answered 204 but queued nothing"
        out: dict[str, str] = {}
        with self._write() as db:
            for a in asset_ids:
                r = db.execute(f"SELECT {self._columns} FROM asset WHERE asset_id = ?", (a,)).fetchone()
                if r is None or _row(r).state != "submitted":
                    continue
                e = _row(r)
                if e.attempts >= max_attempts:
                    db.execute(
                        "UPDATE asset SET state = 'gave_up', last_checked = ?, last_outcome = 'not_queued', "
                        "gave_up_reason = ?, why = 'not_queued', why_text = ?, updated = ? WHERE asset_id = ?",
                        (now, f"{text} after {e.attempts} attempt(s)", why_text, now, a),
                    )
                    out[a] = "gave_up"
                else:
                    db.execute(
                        "UPDATE asset SET state = 'not_queued', last_checked = ?, last_outcome = 'not_queued', "
                        "why = 'not_queued', why_text = ?, updated = ? WHERE asset_id = ?",
                        (now, why_text, now, a),
                    )
                    out[a] = "not_queued"
        return out

    def record(self, asset_id: str, outcome: str, detail: str, now: float, *, why: Why | None = None) -> str | None:
        """Record what a verification of a submitted asset decided (``decision.decide``).

        ``outcome``: ``fixed``; ``still_missing`` (its attempt is over, asked again later); ``gave_up``
        (its attempt is over and none are left); ``waiting`` (its attempt runs: only the check is noted).
        ``why`` says why it is still broken. Returns the outcome recorded (``unchanged`` for a
        ``still_missing`` that was already so), or None when the ledger does not track the asset as
        pending (unknown, fixed or given up, perhaps by another process).
        """
        code, text = (why.code, why.text) if why is not None else (None, None)
        keep = "COALESCE(?, why), why_text = COALESCE(?, why_text)"
        with self._write() as db:
            r = db.execute(f"SELECT {self._columns} FROM asset WHERE asset_id = ?", (asset_id,)).fetchone()
            if r is None:
                return None
            e = _row(r)
            if e.state not in PENDING:
                return None
            if outcome == "fixed":
                db.execute(
                    "UPDATE asset SET state = 'fixed', fixed_at = ?, last_checked = ?, last_outcome = 'fixed', "
                    "detail = ?, why = NULL, why_text = NULL, updated = ? WHERE asset_id = ?",
                    (now, now, detail, now, asset_id),
                )
                return "fixed"
            if outcome == "waiting" or (outcome == "still_missing" and e.state in RETRYABLE):
                db.execute(
                    f"UPDATE asset SET last_checked = ?, detail = ?, why = {keep}, updated = ? WHERE asset_id = ?",
                    (now, detail, code, text, now, asset_id),
                )
                return "waiting" if outcome == "waiting" else "unchanged"
            if outcome == "gave_up":
                reason = f"{detail} after {e.attempts} attempt(s)" + (f": {text}" if text else "")
                db.execute(
                    "UPDATE asset SET state = 'gave_up', last_checked = ?, last_outcome = 'gave_up', detail = ?, "
                    f"gave_up_reason = ?, why = {keep}, updated = ? WHERE asset_id = ?",
                    (now, detail, reason, code, text, now, asset_id),
                )
                return "gave_up"
            db.execute(
                "UPDATE asset SET state = 'still_missing', last_checked = ?, last_outcome = 'still_missing', "
                f"detail = ?, why = {keep}, updated = ? WHERE asset_id = ?",
                (now, detail, code, text, now, asset_id),
            )
            return "still_missing"

    def explain(self, whys: Mapping[str, Why], now: float) -> None:
        """Record why each asset is still broken (as the queue shows it now)."""
        with self._write() as db:
            db.executemany(
                "UPDATE asset SET why = ?, why_text = ?, updated = ? WHERE asset_id = ? AND state <> 'fixed'",
                [(w.code, w.text, now, a) for a, w in whys.items()],
            )

    def give_up(self, asset_id: str, reason: str, now: float) -> None:
        """Stop trying an asset for a reason found outside verification (e.g. its original is gone)."""
        with self._write() as db:
            db.execute(
                "UPDATE asset SET state = 'gave_up', last_outcome = 'gave_up', gave_up_reason = ?, detail = ?, "
                "updated = ? WHERE asset_id = ? AND state NOT IN ('fixed', 'gave_up')",
                (reason, reason, now, asset_id),
            )
