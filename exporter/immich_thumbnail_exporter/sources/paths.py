"""Map paths stored in Immich's database onto the media folder as this process sees it.

Immich stores absolute paths under its media location (``/data/thumbs/...`` since v1.137,
``/usr/src/app/upload/thumbs/...`` before) and, before v1.137, relative ones (``upload/thumbs/...``)
that it resolved against its working directory ``/usr/src/app``. The exporter mounts the same volume
somewhere else (``media.root``), so each stored path is turned into a path *relative to the media
location* and joined onto the local root.

Only clean relative paths are accepted: no ``..``, ``.`` or empty segments, no NUL bytes, nothing that is
not valid Unicode text (lone surrogates). Anything else
is refused (and counted), which is what keeps a crafted or corrupt row from reading outside the root.
"""

from __future__ import annotations

import os

# Immich's working directory in its container, against which relative paths were resolved.
IMMICH_CWD = "/usr/src/app"
LEGACY_LOCATION = "/usr/src/app/upload"
DEFAULT_LOCATION = "/data"


def normalized_sql(column: str) -> str:
    """SQL giving the absolute form of a stored path, as Immich resolved it (for ORDER BY)."""
    return f"CASE WHEN left({column}, 1) = '/' THEN {column} ELSE '{IMMICH_CWD}/' || {column} END"


class PathMapper:
    """Stored path -> relative path (str) -> local path (bytes)."""

    def __init__(self, root: str, location: str) -> None:
        self.root = os.path.abspath(root)
        self.root_bytes = os.fsencode(self.root)
        self.location = location.rstrip("/") or "/"
        self._prefix = self.location + "/" if self.location != "/" else "/"
        self._plen = len(self._prefix)

    def relative(self, stored: str | None) -> str | None:
        """The path under the media location, or None when the stored path must be refused."""
        if not stored:
            return None
        path = stored if stored[0] == "/" else f"{IMMICH_CWD}/{stored}"
        if not path.startswith(self._prefix):
            return None
        rel = path[self._plen :]
        if not rel or "\x00" in rel or rel[0] == "/" or rel[-1] == "/":
            return None
        if not rel.isascii():
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: not text a database holds, nor a file name
                return None
        # Fast path: almost every stored path is clean; only split when a dot or double slash appears.
        if "/." in rel or rel[0] == "." or "//" in rel:
            for part in rel.split("/"):
                if part in ("", ".", ".."):
                    return None
        return rel

    def local(self, rel: str) -> bytes:
        return self.root_bytes + b"/" + os.fsencode(rel)

    def within_root(self, path: bytes) -> bool:
        """True when ``path`` (already resolved) lies inside the media root."""
        root = self.root_bytes
        return path == root or path.startswith(root.rstrip(b"/") + b"/")


def location_from_sample(sample: str | None) -> str | None:
    """Guess the media location from one stored thumbnail path: everything before ``/thumbs/``."""
    if not sample:
        return None
    path = sample if sample.startswith("/") else f"{IMMICH_CWD}/{sample}"
    idx = path.find("/thumbs/")
    if idx <= 0:
        return None
    return path[:idx]
