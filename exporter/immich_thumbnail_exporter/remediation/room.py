"""How much free room the ledger's state folder needs for a round, and how much it has.

The ledger is SQLite in WAL mode: a round's writes go to the write-ahead log first, which grows until a
checkpoint copies it into the database (every ``WAL_PAGES`` pages, SQLite's default), and the database
itself grows by each new asset's row. A disk that cannot take them makes every write fail ("database or
disk is full"): ``check-config`` warns ahead of that (``room_warning``).
"""

from __future__ import annotations

import os

from immich_thumbnail_exporter.config import Config

PAGE = 4096
# SQLite's wal_autocheckpoint default: the log may hold this many pages before it is copied back.
WAL_PAGES = 1000
# One asset's row with its index entries, rounded up (ids, kinds, times, detail and reason texts).
ROW_BYTES = 1024
# Writes per asset in one round: claim, accepted, queued, check.
WRITES_PER_ASSET = 4


def round_room(max_per_round: int) -> int:
    """Bytes a round may need in the state folder: a full write-ahead log before its checkpoint, every
    asset of the round written a few times (a page each, in the worst case), and their new rows."""
    return (WAL_PAGES + 1) * PAGE + max_per_round * (WRITES_PER_ASSET * PAGE + ROW_BYTES)


def free_room(directory: str) -> int | None:
    """Bytes an unprivileged writer may still use where ``directory`` is (its nearest existing parent);
    None when that cannot be read."""
    path = os.path.abspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def room_warning(config: Config) -> str | None:
    """One line when remediation is on and its state folder has less free room than a round needs."""
    rem = config.remediation
    if not rem.enabled:
        return None
    need, free = round_room(rem.max_per_round), free_room(rem.state_dir)
    if free is None or free >= need:
        return None
    return (f"remediation.state_dir {rem.state_dir}: {free // 1024} KiB free, a remediation round may need "
            f"{need // 1024} KiB: the ledger cannot be written when it fills (every round then fails)")
