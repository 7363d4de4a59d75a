"""Nothing outside the media root is ever looked at, seen from the kernel's side.

``scan`` (and the targeted check that remediation and job verification use) runs as a subprocess under
``strace -f -e trace=%file,fchdir``, every file system call of the exporter and of its walker processes
recorded with the folder each relative name is resolved against (``-y``). The media tree is laid with
traps: thumbnails that are links to a file outside the root (absolute, and relative through ``..``), to a
FIFO outside, to a chain of links that ends outside, through a folder link that leads outside, to a path
standing for a hung mount (any call naming it would block the process on a real one), Immich's seeded
link to ``/etc/hostname``, a FIFO inside the root where a preview should be, an old-layout thumbnail in a
folder that links out, and originals in a folder that links out. No recorded call may name any of those
outside places, nor the folders above the media root. And no call naming a path in the media root is made
by the exporter's event-loop thread: every per-file call runs in a worker thread or a walker process.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from tests.conftest import ROOT, Immich

pytestmark = pytest.mark.asyncio

STRACE = shutil.which("strace")  # Debian's strace, installed by scripts/install-system-deps.sh

# A syscall line of ``strace -f -y``: "<pid> <name>(<args>" (the rest may be "<unfinished ...>").
LINE = re.compile(r"^(\d+)\s+([a-z0-9_]+)\((.*)$")
QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
DIRFD = re.compile(r"^(?:AT_FDCWD|-?\d+)<([^>]*)>")


@dataclass
class Traps:
    imm: Immich
    outside: str  # every outside target lives here
    hung: str  # a path standing for a hung mount: no call may name it
    expected: dict[str, str]  # asset id -> the reason the scan must give its trapped file
    original_out: str  # a problem asset whose original's folder links out of the root


def _link(target: str, link: str) -> None:
    if os.path.lexists(link):
        os.unlink(link)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(target, link)


def lay_files(media: str, outside: Path, hung: str, rows: list[Any]) -> tuple[list[list[Any]], dict[str, str]]:
    """Turn files of ten eligible assets into traps; returns those assets' rows and the reason each
    trapped asset must get."""
    (outside / "originals").mkdir(parents=True)
    (outside / "secret.webp").write_bytes(b"RIFF\0\0\0\0WEBP" + b"s" * 500)
    (outside / "secret.jpeg").write_bytes(b"\xff\xd8\xff" + b"s" * 500)
    os.mkfifo(outside / "trap.fifo")

    def local(row: Any) -> str:
        return media + str(row["path"])[len("/data"):]

    by_asset: dict[str, list[Any]] = {}
    for r in rows:
        if os.path.isfile(local(r)) and not os.path.islink(local(r)):
            by_asset.setdefault(r["id"], []).append(r)
    picked = [rs for rs in by_asset.values() if len(rs) == 2][:10]

    def thumb(i: int) -> str:
        return local(next(r for r in picked[i] if r["type"] == "thumbnail"))

    def preview(i: int) -> str:
        return local(next(r for r in picked[i] if r["type"] == "preview"))

    # 0: absolute link out; 1: relative link out through ".."; 2: a FIFO outside; 3: a hung mount.
    _link(str(outside / "secret.webp"), thumb(0))
    _link(os.path.relpath(outside / "secret.jpeg", os.path.dirname(preview(1))), preview(1))
    _link(str(outside / "trap.fifo"), thumb(2))
    _link(f"{hung}/thumbs/x-preview.jpeg", preview(3))
    # 4: a chain of links inside the root whose last one leads out.
    chain = os.path.join(os.path.dirname(thumb(4)), "chain-1.webp")
    _link("chain-2.webp", chain)
    _link(str(outside / "secret.webp"), os.path.join(os.path.dirname(chain), "chain-2.webp"))
    _link("chain-1.webp", thumb(4))
    # 5: through a folder link (inside thumbs/, so the walk lists it as a link) that leads out.
    owner_dir = os.path.dirname(os.path.dirname(os.path.dirname(preview(5))))
    _link(str(outside), os.path.join(owner_dir, "dirlink"))
    _link(os.path.relpath(os.path.join(owner_dir, "dirlink", "secret.jpeg"), os.path.dirname(preview(5))),
          preview(5))
    # 6: a FIFO inside the root where a preview should be: looked at, never waited on.
    os.unlink(preview(6))
    os.mkfifo(preview(6))
    # 7: an old-layout thumbnail (outside thumbs/) in a folder that links out (its row is moved there).
    _link(str(outside), os.path.join(media, "elsewhere-link"))
    # 8: the originals of asset 0 (a problem asset) and 8 in folders that link out.
    for i in (0, 8):
        folder = os.path.dirname(media + str(picked[i][0]["original"])[len("/data"):])
        aside = outside / "originals" / str(i)
        shutil.move(folder, aside)
        _link(str(aside), folder)
    reasons = ["file_unreadable"] * 6 + ["file_empty", "file_unreadable"]
    return picked, {picked[i][0]["id"]: reason for i, reason in enumerate(reasons)}


async def lay_traps(imm: Immich, base: Path) -> Traps:
    outside = base / "outside"
    hung = f"/hung-mount-{uuid.uuid4().hex}"
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        rows = await conn.fetch(
            'SELECT f."assetId"::text AS id, f.type, f.path, a."originalPath" AS original FROM asset_file f '
            'JOIN asset a ON a.id = f."assetId" WHERE a."deletedAt" IS NULL AND a.visibility <> \'hidden\' '
            "AND f.type IN ('thumbnail', 'preview') ORDER BY f.path", timeout=10)
        picked, expected = await asyncio.to_thread(lay_files, imm.media, outside, hung, rows)
        old = next(r["path"] for r in picked[7] if r["type"] == "thumbnail")
        await conn.execute("UPDATE asset_file SET path = $1 WHERE path = $2",
                           "/data/elsewhere-link/secret.webp", old, timeout=10)
    finally:
        await conn.close()
    return Traps(imm, str(outside), hung, expected, picked[0][0]["id"])


def unescape(text: str) -> str:
    return codecs.escape_decode(text.encode("latin-1", "backslashreplace"))[0].decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Call:
    pid: int
    name: str
    path: str  # as named, resolved against its folder and normalised lexically


def calls(trace: str) -> Iterator[Call]:
    """Every path a traced call named. A relative name is resolved against the folder ``-y`` printed
    for its directory descriptor (``AT_FDCWD`` included); ``readlink``'s second string is its answer,
    not a name, and only the first string of ``execve`` (its argv follows) is one."""
    cwd: dict[int, str] = {}
    for line in trace.splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        pid, name, args = int(m[1]), m[2], m[3]
        base = DIRFD.match(args)  # a directory descriptor first: the *at calls, fchdir
        if base is not None and (args.startswith("AT_FDCWD") or name == "fchdir"):
            cwd[pid] = base[1]
        if name == "fchdir":
            continue
        q = QUOTED.search(args)
        if q is None:
            continue
        path = unescape(q[1])
        if not path.startswith("/"):
            folder = base[1] if base is not None else cwd.get(pid, str(ROOT))
            path = os.path.join(folder, path) if path else folder
        path = os.path.normpath(path)
        if name == "chdir":
            cwd[pid] = path
        yield Call(pid, name, path)


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _program_folders() -> set[str]:
    """Every folder that holds, or lies above, the interpreter, its libraries or this checkout."""
    folders: set[str] = set()
    for place in (sys.executable, sys.prefix, sys.base_prefix, str(ROOT), *sys.path):
        path = os.path.normpath(os.path.abspath(place)) if place else ""
        while path and path != os.path.dirname(path):
            folders.add(path)
            path = os.path.dirname(path)
    return folders


def violations(found: list[Call], media: str, forbidden: list[str]) -> list[Call]:
    """Calls naming a forbidden place, or a folder above the media root (resolving the root's real path
    the way ``os.path.realpath`` does names each of them)."""
    above = set()
    parent = os.path.dirname(media)
    while parent != os.path.dirname(parent):
        above.add(parent)
        parent = os.path.dirname(parent)
    # The interpreter names the folders above its own files as it starts and imports (finding its prefix,
    # resolving its executable): when the checkout or the venv shares a folder with the media root (both
    # under /tmp, say), that folder is named for the program's own sake, not the media root's.
    above -= _program_folders()
    return [c for c in found if c.path in above or any(inside(c.path, f) for f in forbidden)]


def run_traced(
    args: list[str], out: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    assert STRACE is not None, "strace is missing: run scripts/install-system-deps.sh"
    trace = out / "trace.txt"
    cmd = [STRACE, "-f", "-qq", "-y", "-s", "4096", "-e", "trace=%file,fchdir", "-o", str(trace), *args]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    return subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest_asyncio.fixture
async def traps(immich_factory: Any, tmp_path: Path) -> Traps:
    imm: Immich = await immich_factory("v1.136+")
    # Folders above the root are watched too: give the root some that the program has no reason of its
    # own to name (tempfile puts it straight under /tmp, which the checkout or its venv may share).
    deep = tmp_path / "above" / "the-root"
    deep.mkdir(parents=True)
    imm.media = str(shutil.move(imm.media, str(deep / "media")))
    return await lay_traps(imm, tmp_path)


def walker_pids(trace: str) -> set[int]:
    return {
        int(line.split(None, 1)[0]) for line in trace.splitlines() if " execve(" in line and "walk_child.py" in line
    }


def check_trace(trace: str, traps: Traps) -> list[Call]:
    """The calls that named the media root; fails on any that named a place outside it, or that the
    event-loop thread (the traced program's first thread) made."""
    found = list(calls(trace))
    program = int(trace.split(None, 1)[0])  # the first line is the program's own execve
    media = os.path.normpath(traps.imm.media)
    walked = [c for c in found if inside(c.path, media)]
    assert walked, "the trace saw nothing of the media root: the parser is wrong"
    bad = violations(found, media, [traps.outside, traps.hung, "/etc/hostname"])
    assert not bad, sorted({(c.name, c.path) for c in bad})
    on_loop = [c for c in walked if c.pid == program]
    assert not on_loop, sorted({(c.name, c.path) for c in on_loop})[:40]
    return walked


async def test_scan_looks_at_nothing_outside_the_media_root(traps: Traps, tmp_path: Path) -> None:
    imm = traps.imm
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    cfg = conf_dir / "config.yaml"
    cfg.write_text(f"database: {{url: '{imm.dsn}'}}\nmedia: {{root: '{imm.media}'}}\n"
                   "checks: {verify_headers: true, check_originals: true}\n")
    res = await asyncio.to_thread(
        run_traced, [sys.executable, "-m", "immich_thumbnail_exporter", "scan", "--config.file", str(cfg),
                     "--format", "json", "--output", str(conf_dir / "report.json")], tmp_path, {})
    assert res.returncode == 0, res.stderr
    trace = (tmp_path / "trace.txt").read_text(errors="replace")
    walked = check_trace(trace, traps)
    walkers = walker_pids(trace)
    assert walkers and any(c.pid in walkers for c in walked), "no walker process was traced"
    doc = json.loads((conf_dir / "report.json").read_text())
    # The traps were judged as they are today: a link out of the root is unreadable, never followed.
    reasons = {p["asset_id"]: p["reason"] for p in doc["problems"] if p["asset_id"] in traps.expected}
    assert reasons == traps.expected, reasons
    originals = {p["asset_id"]: p["original_exists"] for p in doc["problems"] if p["asset_id"] in traps.expected}
    assert originals[traps.original_out] is None, originals  # its folder leads out: not looked at
    # Their folders are not listed: those originals are unchecked, not missing.
    assert doc["summary"]["originals_missing"] == imm.expected.originals_missing, doc["summary"]


TARGETED = """
import asyncio, json, sys
from immich_thumbnail_exporter.config import load_config
from immich_thumbnail_exporter.scan.targeted import check_assets, media_mapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource

async def main() -> None:
    dsn, root, ids = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    config = load_config(None, environ={}, overrides={"database.url": dsn, "media.root": root})
    pg = PostgresSource(config.database)
    try:
        out = await check_assets(pg, await pg.schema(), await media_mapper(pg, config.media), ids)
    finally:
        await pg.close()
    print(json.dumps({a: [v.problems, v.original_exists] for a, v in out.items()}))

asyncio.run(main())
"""


async def test_targeted_check_looks_at_nothing_outside_and_agrees_with_the_scan(traps: Traps, tmp_path: Path) -> None:
    """The check that remediation, ``regenerate`` and job verification use, on the same traps: the same
    verdicts as the full scan, and nothing outside the root looked at."""
    ids = sorted(traps.expected)
    res = await asyncio.to_thread(
        run_traced, [sys.executable, "-c", TARGETED, traps.imm.dsn, traps.imm.media, ",".join(ids)], tmp_path, {})
    assert res.returncode == 0, res.stderr
    check_trace((tmp_path / "trace.txt").read_text(errors="replace"), traps)
    verdicts = json.loads(res.stdout)
    reasons = {a: [r for _, r, _ in problems] for a, (problems, _) in verdicts.items()}
    assert reasons == {a: [r] for a, r in traps.expected.items()}, reasons
    assert verdicts[traps.original_out][1] is None
