"""The one file rule: when a thumbnail-type file of an asset counts as missing or broken, and why.

Both the full file check (``scan/merge.py``, fed by the walk) and the targeted check of a few assets
(``scan/targeted.py``: ``regenerate``, remediation, job verification) judge with it:

* the asset has a row in ``asset_file`` for each kind it must have (``no_record`` otherwise: Immich's
  "Missing" rule, as ``scan/inventory.py`` counts it: a thumbnail and a preview, and an edited fullsize
  for an edited asset);
* each row's path is mapped onto the media root (``PathMapper``; a path that escapes it is refused);
* what the disk holds there, in the walk's terms (``(size, flag)``: the walk's own entry, or
  ``InRoot.facts`` for a path looked at on its own), with a link followed only inside the root;
* ``file_reason`` turns those facts into the verdict: missing, empty, corrupt (the first bytes do not
  match the extension: ``walker.header_ok``), unreadable, or sound.

Whether the asset's original is still there (``original_exists``) follows the same rules: its folder is
resolved inside the root, never through a link out of it.

A face thumbnail (``person."thumbnailPath"``) is one more file judged by the same rule (``judge_person``
here, ``Merge`` in the full check).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from immich_thumbnail_exporter.scan.inroot import MISSING, InRoot
from immich_thumbnail_exporter.scan.inventory import EDITED_KIND
from immich_thumbnail_exporter.scan.walk_child import (
    HEAD_BAD,
    HEAD_UNREADABLE,
    KIND_MASK,
    UNREADABLE_DIR,
    UNREADABLE_FILE,
)
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.vocabulary import PERSON_KIND, RECORD_KINDS

# A stored path the mapper refuses (outside the media location, or not clean): targeted checks only; the
# full check counts these as ``immich_thumbnail_files_refused``.
PATH_REFUSED = "path_refused"


def file_reason(size: int, flag: int, headers: bool) -> str | None:
    """The verdict on one file from what the disk says of it (a link already followed): None when it is
    sound, else the reason. ``size`` -1: nothing there; ``flag``: the walk's entry flag, with the header
    bits when ``headers`` (``checks.verify_headers``; always on for targeted checks)."""
    base = flag & KIND_MASK
    if size < 0:
        return "file_unreadable" if base == UNREADABLE_DIR else "file_missing"
    if base == UNREADABLE_FILE:
        return "file_unreadable"
    if size == 0:
        return "file_empty"
    if headers:
        if flag & HEAD_UNREADABLE:
            return "file_unreadable"
        if flag & HEAD_BAD:
            return "file_corrupt"
    return None


def on_disk(reason: str | None) -> bool:
    """Whether a file so judged is a file on disk (counted in ``immich_thumbnail_files`` and bytes)."""
    return reason not in ("file_missing", "file_unreadable")


def judge_file(mapper: PathMapper, disk: InRoot, stored: str, headers: bool = True) -> str | None:
    """One ``asset_file`` row, looked at on its own: None when the file is sound, else the reason."""
    rel = mapper.relative(stored)
    if rel is None:
        return PATH_REFUSED
    _, (size, flag) = disk.facts(os.fsencode(rel), headers)
    return file_reason(size, flag, headers)


def original_exists(mapper: PathMapper, original: str | None, disk: InRoot | None = None) -> bool | None:
    """Whether an asset's original is still there: None when that cannot be told (outside the media
    location, an external library; its folder leads out of the root or cannot be read).

    One folder resolution (cached per ``disk``) and one ``lstat``: meant for problem assets, not for the
    whole library (``scan/originals.py`` lists folders instead)."""
    rel = mapper.relative(original)
    if rel is None:
        return None
    disk = disk if disk is not None else InRoot(mapper.root_bytes)
    folder, _, name = os.fsencode(rel).rpartition(b"/")
    real = disk.folder(folder)
    if isinstance(real, str):
        return False if real == MISSING else None
    try:
        os.lstat(disk.local(real + b"/" + name if real else name))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None
    return True


@dataclass
class AssetVerdict:
    """One asset as the database and the disk show it now."""

    asset_id: str
    exists: bool
    eligible: bool = False
    owner_id: str | None = None
    asset_type: str | None = None
    original_path: str | None = None
    original_exists: bool | None = None
    # (kind, reason, stored path) for each missing or broken thumbnail-type file.
    problems: list[tuple[str, str, str | None]] = field(default_factory=list)

    def broken(self, kinds: Iterable[str] | None = None) -> list[tuple[str, str, str | None]]:
        wanted = None if kinds is None else set(kinds)
        return [p for p in self.problems if wanted is None or p[0] in wanted]

    def describe(self, kinds: Iterable[str] | None = None) -> str:
        broken = self.broken(kinds)
        if not broken:
            return "all files present"
        return ", ".join(sorted({f"{k} {r}" for k, r, _ in broken}))

    @property
    def written(self) -> bool:
        """Every thumbnail-type file the asset should have is there and sound."""
        return self.exists and not self.problems


@dataclass(frozen=True, slots=True)
class AssetRow:
    """What the database says of one asset: itself and its thumbnail-type rows ``(kind, stored path,
    edited rendition)``. ``edited``: ``asset."isEdited"`` (v2.5+)."""

    asset_id: str
    owner_id: str
    asset_type: str
    original_path: str | None
    eligible: bool
    files: Sequence[tuple[str, str, bool]] = ()
    edited: bool = False


def judge_asset(mapper: PathMapper, disk: InRoot, asset: AssetRow, headers: bool = True) -> AssetVerdict:
    """The one rule applied to one asset: a row for each kind it must have, each row's file judged."""
    verdict = AssetVerdict(asset.asset_id, True, asset.eligible, asset.owner_id, asset.asset_type,
                           asset.original_path, original_exists(mapper, asset.original_path, disk))
    seen: set[str] = set()
    edited_seen = False
    for kind, stored, edited in asset.files:
        seen.add(kind)
        edited_seen = edited_seen or (edited and kind == EDITED_KIND)
        reason = judge_file(mapper, disk, stored, headers)
        if reason is not None:
            verdict.problems.append((kind, reason, stored))
    for kind in RECORD_KINDS:
        if kind not in seen:
            verdict.problems.append((kind, "no_record", None))
    if asset.edited and not edited_seen:
        verdict.problems.append((EDITED_KIND, "no_record", None))  # an edited asset is shown from it
    return verdict


@dataclass
class PersonVerdict:
    """One person's face thumbnail as the database and the disk show it now (``check_people``).

    ``problems``: ``(kind, reason, stored path)`` as an asset's, kind always ``person``: ``no_record``
    when ``thumbnailPath`` is ``''`` (Immich has not written one yet, or its "Missing" job will), else the
    file rule's reason. ``face_asset_id``: the asset holding the person's current feature face
    (``person."faceAssetId"`` -> the face's ``"assetId"``), the asset Immich crops the thumbnail from and
    the one ``PUT /api/people/{id}`` names to ask for it again; None when the person has none."""

    person_id: str
    exists: bool
    owner_id: str | None = None
    path: str | None = None
    face_asset_id: str | None = None
    original_path: str | None = None
    original_exists: bool | None = None
    problems: list[tuple[str, str, str | None]] = field(default_factory=list)

    def broken(self, kinds: Iterable[str] | None = None) -> list[tuple[str, str, str | None]]:
        return [p for p in self.problems if kinds is None or p[0] in set(kinds)]

    def describe(self, kinds: Iterable[str] | None = None) -> str:
        broken = self.broken(kinds)
        return ", ".join(sorted({f"{k} {r}" for k, r, _ in broken})) if broken else "face thumbnail present"

    @property
    def written(self) -> bool:
        """The person's face thumbnail is there and sound."""
        return self.exists and not self.problems

    @property
    def eligible(self) -> bool:
        """As ``AssetVerdict.eligible``: every person there counts (people have no eligibility rule), so a
        caller judging finished jobs reads both verdicts alike."""
        return self.exists


@dataclass(frozen=True, slots=True)
class PersonRow:
    """What the database says of one person: its stored thumbnail path and its feature face's asset."""

    person_id: str
    owner_id: str
    thumbnail_path: str
    face_asset_id: str | None = None
    original_path: str | None = None


def judge_person(mapper: PathMapper, disk: InRoot, person: PersonRow, headers: bool = True) -> PersonVerdict:
    """The one file rule applied to one person's face thumbnail."""
    verdict = PersonVerdict(person.person_id, True, person.owner_id, person.thumbnail_path or None,
                            person.face_asset_id, person.original_path,
                            original_exists(mapper, person.original_path, disk))
    if not person.thumbnail_path:
        verdict.problems.append((PERSON_KIND, "no_record", None))
        return verdict
    reason = judge_file(mapper, disk, person.thumbnail_path, headers)
    if reason is not None:
        verdict.problems.append((PERSON_KIND, reason, person.thumbnail_path))
    return verdict
