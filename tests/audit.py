"""An audit hook that records every file or directory opened or listed while armed, in any thread: the
file check looks at the disk in worker threads. (``lstat`` and ``readlink`` raise no audit event:
``tests/test_strace.py`` watches those from the kernel's side.)"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

# (event, path, open flags, thread id)
Seen = list[tuple[str, Any, int, int]]


@dataclass
class _Audit:
    armed: bool = False
    seen: Seen = field(default_factory=list)


_AUDIT = _Audit()


def _hook(event: str, args: tuple[Any, ...]) -> None:
    # Cheap when disarmed: this hook lives for the whole test session.
    if not _AUDIT.armed:
        return
    if event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], str | bytes):
        flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
        _AUDIT.seen.append((event, args[0], flags, threading.get_ident()))


sys.addaudithook(_hook)


class audited:
    """Record what the code under test opens or lists, in any thread."""

    def __enter__(self) -> Seen:
        _AUDIT.seen = []
        _AUDIT.armed = True
        return _AUDIT.seen

    def __exit__(self, *exc: object) -> None:
        _AUDIT.armed = False


def outside(root_real: bytes, seen: Seen) -> Seen:
    """The accesses whose real target is not inside the media root. An ``open`` with ``O_NOFOLLOW``
    cannot go through a link in its last component (it fails), so only its folder is resolved."""
    bad = []
    for event, path, flags, thread in seen:
        raw = os.fsencode(path)
        if event == "open" and flags & os.O_NOFOLLOW:
            head, _, tail = raw.rpartition(b"/")
            real = os.path.realpath(head) + b"/" + tail
        else:
            real = os.path.realpath(raw)
        if not (real == root_real or real.startswith(root_real + b"/")):
            bad.append((event, path, flags, thread))
    return bad
