"""Why an asset stayed broken: its original, checked as the restore report's author checked it by hand.

For each asset still broken after its attempts (a handful, never the library), the original is read
once, from inside the media root only (``InRoot``: its folder and any link resolved inside the root, the
file opened with ``O_NOFOLLOW``; a path that leads out is not read), within a time limit:

* is it there, and can it be read;
* do its first bytes say an image or a video (``sniff``: JPEG, PNG, GIF, WebP, BMP, TIFF and the RAW
  formats built on it, HEIC/HEIF/AVIF and MP4/MOV by their ``ftyp`` box, QuickTime, Matroska/WebM, AVI,
  MPEG, ...);
* is its SHA-1 ``asset.checksum``? Immich stores the content's SHA-1 for uploads. A library (external)
  asset's checksum is the SHA-1 of ``"path:" + originalPath`` instead (``checksumAlgorithm`` says
  ``sha1-path`` from v3.1; before, ``isExternal`` / ``libraryId`` and the path hash itself tell), which
  says nothing about the content: then the content is not compared.

``judge_original`` is the pure rule (facts and the database row in, a verdict out); ``read_original``
gathers the facts (blocking, a worker thread); ``check_originals`` is the async entry point for
``regenerate``'s report and serve's ledger: ``{asset id: OriginalVerdict}``, whose ``code`` is one of
``vocabulary.ORIGINAL_RESULTS`` and ``detail`` the sentence to show; ``why_of`` turns a broken one into
the ``Why`` the ledger and the reports take.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from immich_thumbnail_exporter.remediation.decision import GIVE_UP, Policy, RetryClock, Seen, decide
from immich_thumbnail_exporter.remediation.ledger import Ledger
from immich_thumbnail_exporter.remediation.report import RunReport
from immich_thumbnail_exporter.remediation.why import Why
from immich_thumbnail_exporter.scan.inroot import MISSING, OUTSIDE, InRoot
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.schema import Schema
from immich_thumbnail_exporter.vocabulary import (
    ORIGINAL_BROKEN,
    ORIGINAL_CHECKSUM_MISMATCH,
    ORIGINAL_CORRUPT,
    ORIGINAL_MISSING,
    ORIGINAL_OK,
    ORIGINAL_UNCHECKED,
    ORIGINAL_UNREADABLE,
)

HEAD_BYTES = 512
CHUNK = 1 << 20
# Time for one original: a 4 GB video hashes in well under this on a local disk. Past it the read stops
# (checked between chunks) and the verdict is ``original_unchecked``.
SECONDS_PER_ORIGINAL = 120.0
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# What a file read gave: ``read`` (size, head, sha1 when hashed), ``missing``, ``unreadable``,
# ``outside`` (its path or a link in it leads out of the media root: not read), ``refused`` (the stored
# path is outside the media location), ``timeout`` (what was read before the time ran out).
READ, MISSING_FILE, UNREADABLE, LEADS_OUT, REFUSED, TIMEOUT = (
    "read", "missing", "unreadable", "outside", "refused", "timeout")

# ISO base media (``ftyp``) brands of still images; any other brand is a video (MP4, MOV, 3GP, ...).
IMAGE_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif",
                          b"avis", b"crx ", b"jxl "})
QUICKTIME_ATOMS = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})


def sniff(head: bytes) -> str | None:
    """What a file's first bytes say it is, ``"image <format>"`` or ``"video <format>"``; None when they
    are neither (or too few)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video avi"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"IIRO", b"IIRS", b"IIU\x00"):
        return "image tiff/raw"  # TIFF, and the RAW formats built on it (DNG, NEF, CR2, ARW, ORF, RW2, PEF)
    if head.startswith((b"FUJIFILMCCD-RAW", b"FOVb", b"\x00MRM", b"II\x1a\x00\x00\x00HEAPCCDR")):
        return "image raw"
    if head[:2] == b"BM" and len(head) >= 14:
        return "image bmp"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "image jpeg-xl"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return "image jpeg-2000"
    if head[:4] == b"8BPS":
        return "image psd"
    if head[4:8] == b"ftyp" and len(head) >= 12:
        brand = head[8:12]
        return f"image {brand.decode('latin-1').strip()}" if brand in IMAGE_BRANDS else "video iso-media"
    if head[4:8] in QUICKTIME_ATOMS:
        return "video quicktime"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "video matroska/webm"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "video mpeg"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "video mpeg-ts"
    if head[:3] == b"FLV":
        return "video flv"
    if head[:8] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11":
        return "video asf/wmv"
    return None


@dataclass(frozen=True, slots=True)
class OriginalRow:
    """What the database says of an asset's original."""

    asset_id: str
    original_path: str | None
    checksum: bytes | None = None
    # ``asset."checksumAlgorithm"`` (v3.1+: ``sha1`` of the content, ``sha1-path`` of the path); None before.
    algorithm: str | None = None
    # A library (external) asset: ``isExternal`` or a ``libraryId``.
    external: bool = False


@dataclass(frozen=True, slots=True)
class OriginalFacts:
    """What reading the original found (``state`` one of READ, MISSING_FILE, UNREADABLE, LEADS_OUT,
    REFUSED, TIMEOUT); ``sha1`` None when the content was not (fully) hashed."""

    state: str
    size: int = -1
    head: bytes = b""
    sha1: bytes | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class OriginalVerdict:
    asset_id: str
    code: str  # vocabulary.ORIGINAL_RESULTS
    detail: str
    media: str | None = None  # what the header says (``sniff``)
    checksum_checked: bool = False

    @property
    def broken(self) -> bool:
        """The original itself is why regeneration cannot help."""
        return self.code in ORIGINAL_BROKEN


def why_of(verdict: OriginalVerdict) -> Why | None:
    """The reason the ledger and the reports take (``Ledger.explain``, ``Row.why``) when the original is
    why regeneration cannot help; None when it is not (``original_ok``, ``original_unchecked``)."""
    return Why(verdict.code, verdict.detail) if verdict.broken else None


def explain_rows(report: RunReport, whys: Mapping[str, Why], ledger: Ledger | None) -> None:
    """A broken original is why each of these targets stayed broken: its report row (``why``, and the
    sentence after its detail) and, when ``ledger`` is given (open for writing), its ledger entry."""
    for target, why in whys.items():
        row = report.rows.get(target)
        if row is not None:
            row.why = why.code
            row.detail = f"{row.detail}; {why.text}" if row.detail else why.text
    if ledger is not None and whys:
        ledger.explain(whys, time.time())


def give_up_on_originals(whys: Mapping[str, Why], ledger: Ledger, clock: RetryClock, policy: Policy,
                         target: str = "asset") -> list[str]:
    """The one decision (``decision.decide``) with each target's broken original as ``Seen.original``:
    an attempt under way, or a retry to come, is given up with that reason (asking again cannot help
    until the original is restored; ``--retry-gave-up`` asks again). Returns the targets given up."""
    given: list[str] = []
    entries = ledger.get(list(whys))
    now = time.time()
    for a, why in whys.items():
        e = entries.get(a)
        if e is None:
            continue
        kinds = frozenset(e.kinds)
        seen = Seen(broken=kinds, fixable=kinds, original=why.code, target=target)
        if decide(e, seen, clock.view(e), policy).action == GIVE_UP:
            ledger.give_up(a, why.text, now)
            given.append(a)
    return given


def path_checksum(original_path: str) -> bytes:
    """The checksum Immich gives a library (external) asset: the SHA-1 of its path, not of its content."""
    return hashlib.sha1(b"path:" + original_path.encode("utf-8", "surrogateescape")).digest()


def content_checksum_applies(row: OriginalRow) -> bool:
    """Whether ``asset.checksum`` is the SHA-1 of the original's content."""
    if row.checksum is None or len(row.checksum) != 20:
        return False
    if row.algorithm is not None:
        return row.algorithm == "sha1"
    # Before checksumAlgorithm: a library asset's checksum is usually its path's; tell by computing it.
    return not (row.original_path and row.checksum == path_checksum(row.original_path))


def judge_original(row: OriginalRow, facts: OriginalFacts, limit: float = SECONDS_PER_ORIGINAL) -> OriginalVerdict:
    """The verdict on one asset's original from what reading it found. Pure."""
    a = row.asset_id
    if facts.state == REFUSED:
        return OriginalVerdict(a, ORIGINAL_UNCHECKED, "its original's path is outside the media location: not read")
    if facts.state == LEADS_OUT:
        return OriginalVerdict(a, ORIGINAL_UNCHECKED, "its original's path leads outside the media root: not read")
    if facts.state == MISSING_FILE:
        return OriginalVerdict(a, ORIGINAL_MISSING, f"its original {row.original_path} is not there")
    if facts.state == UNREADABLE:
        why = f" ({facts.error})" if facts.error else ""
        return OriginalVerdict(a, ORIGINAL_UNREADABLE, f"its original {row.original_path} cannot be read{why}")
    if facts.state == TIMEOUT and not facts.head:
        return OriginalVerdict(a, ORIGINAL_UNCHECKED, f"its original did not answer within {limit:.0f}s")
    if facts.size == 0:
        return OriginalVerdict(a, ORIGINAL_CORRUPT, f"its original {row.original_path} is empty")
    media = sniff(facts.head)
    if media is None:
        first = facts.head[:8].hex(" ")
        return OriginalVerdict(a, ORIGINAL_CORRUPT,
                               f"its original's first bytes ({first}) are neither an image nor a video")
    if not content_checksum_applies(row):
        return OriginalVerdict(a, ORIGINAL_OK, f"its original is there and reads as {media} (a library asset: "
                               "its checksum is its path's, the content is not compared)", media)
    if facts.sha1 is None:
        return OriginalVerdict(a, ORIGINAL_UNCHECKED, f"its original reads as {media}; its checksum was not "
                               f"finished within {limit:.0f}s", media)
    assert row.checksum is not None
    if facts.sha1 != row.checksum:
        return OriginalVerdict(a, ORIGINAL_CHECKSUM_MISMATCH,
                               f"its original reads as {media} but is not the file Immich stored: its SHA-1 "
                               f"{facts.sha1.hex()[:12]}... is not the asset's checksum {row.checksum.hex()[:12]}... "
                               "(replaced or damaged after upload)", media, True)
    return OriginalVerdict(a, ORIGINAL_OK, f"its original is there, reads as {media} and matches its checksum",
                           media, True)


def read_original(disk: InRoot, rel: bytes, deadline: float, hash_content: bool = True) -> OriginalFacts:
    """Blocking: read the original at ``rel`` (relative to the media root) once, inside the root only.
    Stops between chunks once ``deadline`` (``time.monotonic``) has passed."""
    found = disk.resolve(rel, follow_last=True)
    if found == OUTSIDE:
        return OriginalFacts(LEADS_OUT)
    if found == MISSING:
        return OriginalFacts(MISSING_FILE)
    if isinstance(found, str):
        return OriginalFacts(UNREADABLE, error=f"its folder cannot be read ({found})")
    if not stat.S_ISREG(found.st.st_mode):
        return OriginalFacts(UNREADABLE, error="not a regular file")
    try:
        fd = os.open(disk.local(found.rel), O_READ)
    except FileNotFoundError:
        return OriginalFacts(MISSING_FILE)
    except OSError as exc:
        return OriginalFacts(UNREADABLE, error=exc.strerror or str(exc))
    digest = hashlib.sha1() if hash_content else None
    head = b""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the lstat and the open
            return OriginalFacts(UNREADABLE, error="not a regular file")
        if digest is None:
            return OriginalFacts(READ, st.st_size, os.read(fd, HEAD_BYTES))
        while time.monotonic() <= deadline:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                return OriginalFacts(READ, st.st_size, head, digest.digest())
            if len(head) < HEAD_BYTES:
                head += chunk[: HEAD_BYTES - len(head)]
            digest.update(chunk)
        return OriginalFacts(TIMEOUT, st.st_size, head)
    except OSError as exc:
        return OriginalFacts(UNREADABLE, -1, head, error=exc.strerror or str(exc))
    finally:
        os.close(fd)


def check_one(mapper: PathMapper, disk: InRoot, row: OriginalRow, limit: float) -> OriginalVerdict:
    """Blocking: one asset's original read and judged."""
    rel = mapper.relative(row.original_path)
    if rel is None:
        return judge_original(row, OriginalFacts(REFUSED), limit)
    facts = read_original(disk, os.fsencode(rel), time.monotonic() + limit, content_checksum_applies(row))
    return judge_original(row, facts, limit)


async def _columns(pg: PostgresSource, table: str, timeout: float) -> set[str]:
    async with pg.connection() as conn:
        rows = await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            table, timeout=timeout)
    return {str(r[0]) for r in rows}


def originals_sql(schema: Schema, columns: set[str]) -> str:
    """``(id, original path, checksum, algorithm, external)`` of the assets ``$1`` (uuid[]), with what the
    era has (``checksumAlgorithm`` from v3.1)."""
    checksum = "a.checksum" if "checksum" in columns else "NULL::bytea"
    algorithm = 'a."checksumAlgorithm"::text' if "checksumAlgorithm" in columns else "NULL::text"
    external = [c for c in ('a."isExternal"' if "isExternal" in columns else "",
                            'a."libraryId" IS NOT NULL' if "libraryId" in columns else "") if c]
    return f"""SELECT a.id::text, a."originalPath", {checksum}, {algorithm}, ({' OR '.join(external) or 'false'})
FROM {schema.assets} a WHERE a.id = ANY($1::uuid[])"""


async def check_originals(
    pg: PostgresSource,
    schema: Schema,
    mapper: PathMapper,
    asset_ids: Iterable[str],
    *,
    limit: float = SECONDS_PER_ORIGINAL,
    timeout: float | None = None,
) -> dict[str, OriginalVerdict]:
    """Each asset's original read once and judged: ``{asset id: OriginalVerdict}`` for the ids that name
    an asset (others are left out). For the few assets still broken after their attempts: one query,
    then one worker-thread read per original, each bounded by ``limit`` seconds; once one does not answer
    (a hung mount), the rest are not tried (``original_unchecked``)."""
    ids = sorted({str(u) for u in (_uuid(a) for a in asset_ids) if u is not None})
    if not ids:
        return {}
    statement_timeout = pg.config.statement_timeout if timeout is None else timeout
    sql = originals_sql(schema, await _columns(pg, schema.assets, statement_timeout))
    async with pg.connection() as conn:
        rows = await conn.fetch(sql, [uuid.UUID(a) for a in ids], timeout=statement_timeout)
    disk: InRoot | None = None
    out: dict[str, OriginalVerdict] = {}
    hung = False
    for r in rows:
        row = OriginalRow(r[0], r[1], bytes(r[2]) if r[2] is not None else None, r[3], bool(r[4]))
        if hung:
            out[row.asset_id] = OriginalVerdict(row.asset_id, ORIGINAL_UNCHECKED,
                                                "not read: the media folder stopped answering")
            continue
        if disk is None:
            disk = await asyncio.wait_for(asyncio.to_thread(InRoot, mapper.root_bytes), limit)
        try:
            out[row.asset_id] = await asyncio.wait_for(
                asyncio.to_thread(check_one, mapper, disk, row, limit), limit + 5.0)
        except TimeoutError:
            hung = True
            out[row.asset_id] = judge_original(row, OriginalFacts(TIMEOUT), limit)
    return out


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return None
