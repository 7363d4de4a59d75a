"""Basic auth against bcrypt hashes, as the exporter-toolkit does it, without blocking the event loop."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import re
import secrets
import weakref
from typing import Final

import bcrypt
from aiohttp import web

_BCRYPT_RE: Final = re.compile(r"\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_MAX_PASSWORD: Final = 72  # bcrypt only looks at the first 72 bytes; Go truncates, so do we
_AUTH_CACHE_SIZE: Final = 100  # successful verifications remembered, like the toolkit's cache
_BCRYPT_CONCURRENCY: Final = 2  # bcrypt runs at most this many at once (the toolkit: 1)
DEFAULT_AUTH_TIMEOUT: Final = 10.0  # seconds a request may wait for its bcrypt verification


def valid_bcrypt(hashed: str) -> bool:
    match = _BCRYPT_RE.fullmatch(hashed)
    if match is None or not 4 <= int(match.group(1)) <= 31:
        return False
    # Let the bcrypt library decode the salt, at the cheapest cost (about a millisecond).
    try:
        bcrypt.hashpw(b"", f"$2b$04${hashed[7:29]}".encode())
    except ValueError:
        return False
    return True


def basic_credentials(request: web.Request) -> tuple[bytes, bytes] | None:
    header = request.headers.get("Authorization")
    if not header:
        return None
    scheme, _, param = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(param.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


def _bcrypt_check(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
    except ValueError:
        return False


class BasicAuth:
    """bcrypt verification without blocking the event loop and without telling users apart by timing.

    An unknown user name is checked against a dummy hash of the highest configured cost, so it costs as
    much as a wrong password. Successful checks are remembered (keyed by a keyed hash of user, stored
    hash and password, never the password itself) so that each scrape does not pay for bcrypt.
    Identical checks in flight at the same time share one bcrypt run.
    """

    def __init__(self, users: tuple[tuple[str, str], ...], timeout: float) -> None:
        self._users = [(name.encode(), hashed.encode()) for name, hashed in users]
        cost = max(int(hashed[4:6]) for _, hashed in users)
        # A well-formed hash nobody's password matches: a real salt of that cost and a zero digest.
        self._dummy = bcrypt.gensalt(cost) + b"." * 31
        self._timeout = timeout
        self._key = secrets.token_bytes(32)
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[bool]] = {}
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def _cache_key(self, user: bytes, hashed: bytes, password: bytes) -> bytes:
        h = hashlib.blake2b(key=self._key, digest_size=32)
        for part in (user, hashed, password):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()

    async def check(self, user: bytes, password: bytes) -> bool:
        """True when ``password`` is ``user``'s; raises TimeoutError when bcrypt takes too long."""
        match: bytes | None = None
        for name, hashed in self._users:  # no early exit: the time does not depend on the position
            if hmac.compare_digest(name, user) and match is None:
                match = hashed
        hashed = match if match is not None else self._dummy
        key = self._cache_key(user, hashed, password)
        if key in self._cache:  # only successful checks are cached
            self._cache.move_to_end(key)
            return True
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._verify(password, hashed))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        ok = await asyncio.wait_for(asyncio.shield(task), self._timeout)
        if ok and match is not None:
            self._cache[key] = None
            while len(self._cache) > _AUTH_CACHE_SIZE:
                self._cache.popitem(last=False)
            return True
        return False

    async def _verify(self, password: bytes, hashed: bytes) -> bool:
        loop = asyncio.get_running_loop()
        sem = self._semaphores.get(loop)
        if sem is None:
            sem = self._semaphores[loop] = asyncio.Semaphore(_BCRYPT_CONCURRENCY)
        async with sem:
            return await asyncio.to_thread(_bcrypt_check, password, hashed)
