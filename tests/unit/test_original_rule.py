"""``remediation/original.py``: an original's header, checksum and readability judged from made-up bytes."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from immich_thumbnail_exporter.remediation.original import (
    LEADS_OUT,
    MISSING_FILE,
    READ,
    REFUSED,
    TIMEOUT,
    UNREADABLE,
    OriginalFacts,
    OriginalRow,
    check_one,
    judge_original,
    path_checksum,
    read_original,
    sniff,
    why_of,
)
from immich_thumbnail_exporter.scan.inroot import InRoot
from immich_thumbnail_exporter.sources.paths import PathMapper

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 100 + b"\xff\xd9"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50


def ftyp(brand: bytes) -> bytes:
    return b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00" + brand + b"mif1"


@pytest.mark.parametrize(("head", "want"), [
    (JPEG, "image jpeg"),
    (PNG, "image png"),
    (b"GIF89a" + b"\x00" * 10, "image gif"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "image webp"),
    (b"RIFF\x10\x00\x00\x00AVI LIST", "video avi"),
    (b"II*\x00\x08\x00\x00\x00", "image tiff/raw"),  # TIFF, DNG, NEF, CR2, ARW
    (b"MM\x00*\x00\x00\x00\x08", "image tiff/raw"),
    (b"IIRO\x08\x00\x00\x00", "image tiff/raw"),  # Olympus ORF
    (b"FUJIFILMCCD-RAW 0201", "image raw"),
    (ftyp(b"heic"), "image heic"),
    (ftyp(b"avif"), "image avif"),
    (ftyp(b"crx "), "image crx"),  # Canon CR3
    (ftyp(b"isom"), "video iso-media"),
    (ftyp(b"qt  "), "video iso-media"),
    (b"\x00\x00\x00\x08wide\x00\x00\x00\x00mdat", "video quicktime"),
    (b"\x1aE\xdf\xa3\x9fB\x86\x81", "video matroska/webm"),
    (b"\x00\x00\x01\xba\x44\x00", "video mpeg"),
    (b"BM" + b"\x00" * 20, "image bmp"),
    (b"", None),
    (b"\xff\xd8", None),  # too short for JPEG's marker
    (b"<html><body>404 not found</body></html>", None),
    (b"\x00" * 64, None),
    (b"PK\x03\x04" + b"\x00" * 20, None),  # a zip is not a photo
])
def test_sniff(head: bytes, want: str | None) -> None:
    assert sniff(head) == want


SHA = hashlib.sha1(JPEG).digest()
OTHER = hashlib.sha1(PNG).digest()
ROW = OriginalRow("a1", "/data/upload/u/a1.jpg", SHA, None, False)


@pytest.mark.parametrize(("row", "facts", "code", "says"), [
    (ROW, OriginalFacts(READ, len(JPEG), JPEG[:512], SHA), "original_ok", "matches its checksum"),
    (ROW, OriginalFacts(READ, len(PNG), PNG, OTHER), "original_checksum_mismatch", "is not the file Immich stored"),
    (ROW, OriginalFacts(MISSING_FILE), "original_missing", "is not there"),
    (ROW, OriginalFacts(UNREADABLE, error="Permission denied"), "original_unreadable", "Permission denied"),
    (ROW, OriginalFacts(READ, 0, b"", hashlib.sha1(b"").digest()), "original_corrupt", "is empty"),
    (ROW, OriginalFacts(READ, 40, b"<html>gone</html>", OTHER), "original_corrupt", "neither an image nor a video"),
    (ROW, OriginalFacts(LEADS_OUT), "original_unchecked", "leads outside the media root"),
    (ROW, OriginalFacts(REFUSED), "original_unchecked", "outside the media location"),
    (ROW, OriginalFacts(TIMEOUT), "original_unchecked", "did not answer"),
    (ROW, OriginalFacts(TIMEOUT, 10**10, JPEG[:512]), "original_unchecked", "not finished"),
    # v3.1+: the algorithm says whether the checksum is the content's.
    (OriginalRow("a1", "/lib/a.jpg", SHA, "sha1", True), OriginalFacts(READ, 9, PNG, OTHER),
     "original_checksum_mismatch", "SHA-1"),
    (OriginalRow("a1", "/lib/a.jpg", path_checksum("/lib/a.jpg"), "sha1-path", True),
     OriginalFacts(READ, 9, PNG, None), "original_ok", "a library asset"),
    # Before v3.1: a library asset's path hash is recognised, and its content is not compared.
    (OriginalRow("a1", "/lib/a.jpg", path_checksum("/lib/a.jpg"), None, True),
     OriginalFacts(READ, 9, PNG, None), "original_ok", "a library asset"),
    # A checksum that is not a SHA-1 (no column in this schema): nothing to compare with.
    (OriginalRow("a1", "/data/a.jpg", None), OriginalFacts(READ, 9, PNG, None), "original_ok", "not compared"),
])
def test_judge_original(row: OriginalRow, facts: OriginalFacts, code: str, says: str) -> None:
    verdict = judge_original(row, facts)
    assert verdict.code == code, verdict
    assert says in verdict.detail, verdict.detail
    assert verdict.broken == (code in ("original_missing", "original_unreadable", "original_corrupt",
                                       "original_checksum_mismatch"))
    why = why_of(verdict)
    assert (why.code if why else None) == (code if verdict.broken else None)


@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "upload" / "u").mkdir(parents=True)
    (root / "upload" / "u" / "good.jpg").write_bytes(JPEG)
    (root / "upload" / "u" / "swapped.jpg").write_bytes(PNG)
    (root / "upload" / "u" / "empty.jpg").write_bytes(b"")
    (tmp_path / "secret.jpg").write_bytes(JPEG)
    os.symlink(tmp_path / "secret.jpg", root / "upload" / "u" / "out.jpg")
    os.symlink("good.jpg", root / "upload" / "u" / "in.jpg")
    (root / "upload" / "u" / "folder.jpg").mkdir()
    return root


@pytest.mark.parametrize(("name", "code"), [
    ("good.jpg", "original_ok"),
    ("in.jpg", "original_ok"),  # a link inside the root is followed
    ("swapped.jpg", "original_checksum_mismatch"),
    ("empty.jpg", "original_corrupt"),
    ("gone.jpg", "original_missing"),
    ("out.jpg", "original_unchecked"),  # a link out of the root is never followed
    ("folder.jpg", "original_unreadable"),
])
def test_check_one_reads_inside_the_root_only(media: Path, name: str, code: str) -> None:
    mapper = PathMapper(str(media), "/data")
    row = OriginalRow("a1", f"/data/upload/u/{name}", SHA)
    assert check_one(mapper, InRoot(mapper.root_bytes), row, 30.0).code == code


def test_a_path_outside_the_location_is_not_read(media: Path) -> None:
    mapper = PathMapper(str(media), "/data")
    verdict = check_one(mapper, InRoot(mapper.root_bytes), OriginalRow("a1", "/data/../etc/passwd", SHA), 30.0)
    assert verdict.code == "original_unchecked"


def test_the_read_stops_at_its_deadline(media: Path) -> None:
    facts = read_original(InRoot(os.fsencode(media)), b"upload/u/good.jpg", time.monotonic() - 1)
    assert facts.state == TIMEOUT and facts.sha1 is None
    assert judge_original(ROW, facts).code == "original_unchecked"
