"""Configuration: YAML, then environment, then flags; secrets from files; nothing printed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from immich_thumbnail_exporter.config import ConfigError, Secret, describe, load_config, parse_duration, redact_url
from tests.helpers import run_cli


def test_defaults() -> None:
    c = load_config(None, environ={})
    assert c.web.listen_address == ":9813"
    assert c.intervals.queues == 15 and c.intervals.inventory == 300 and c.intervals.files == 900
    assert c.media.location == "auto"
    assert c.redis.prefix == "immich_bull"
    assert not c.remediation.enabled
    assert not c.redis.enabled and not c.immich.enabled


def test_precedence_yaml_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("database: {host: from-yaml, port: 1111, name: yamldb}\nintervals: {files: 1h}\n")
    c = load_config(str(cfg), environ={"DB_HOSTNAME": "from-env", "DB_PORT": "2222"},
                    overrides={"database.port": 3333})
    assert c.database.host == "from-env"
    assert c.database.port == 3333
    assert c.database.name == "yamldb"
    assert c.intervals.files == 3600


def test_immich_env_names(tmp_path: Path) -> None:
    env = {
        "DB_USERNAME": "immich", "DB_PASSWORD": "pw", "DB_DATABASE_NAME": "immichdb",
        "REDIS_HOSTNAME": "redis", "REDIS_PORT": "6380", "REDIS_DBINDEX": "2",
        "IMMICH_URL": "http://immich:2283", "IMMICH_API_KEY": "key",
    }
    c = load_config(None, environ=env)
    assert (c.database.user, c.database.name) == ("immich", "immichdb")
    assert c.database.password is not None and c.database.password.get() == "pw"
    assert (c.redis.host, c.redis.port, c.redis.db) == ("redis", 6380, 2)
    assert c.redis.enabled and c.immich.enabled
    assert c.immich.api_key is not None and c.immich.api_key.get() == "key"


def test_secret_files_are_reread(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("first\n")
    c = load_config(None, environ={"DB_PASSWORD_FILE": str(secret)})
    assert c.database.password is not None
    assert c.database.password.get() == "first"
    secret.write_text("rotated")
    assert c.database.password.get() == "rotated"


def test_file_key_in_yaml(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("apikey")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"immich: {{url: 'http://x:2283', api_key_file: '{secret}'}}\n")
    c = load_config(str(cfg), environ={})
    assert c.immich.api_key is not None and c.immich.api_key.get() == "apikey"
    assert "apikey" not in repr(c) and "apikey" not in str(describe(c))


def test_both_inline_and_file_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("database: {password: x, password_file: /tmp/y}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(cfg), environ={})
    assert "either password or password_file" in str(err.value)


def test_file_suffix_only_for_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("database: {host_file: /tmp/x}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(cfg), environ={})
    assert "database.host_file: unknown key" in str(err.value)


def test_secrets_never_shown() -> None:
    c = load_config(None, environ={"DB_URL": "postgresql://u:hunter2@h/db", "REDIS_PASSWORD": "hunter3"})
    text = repr(c) + str(describe(c))
    assert "hunter2" not in text and "hunter3" not in text
    assert redact_url("postgresql://u:hunter2@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert repr(Secret("x")) == "Secret(<redacted>)"


def test_remediation_needs_api() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={}, overrides={"remediation.enabled": True})
    assert "remediation.enabled: needs immich.url" in str(err.value)


@pytest.mark.parametrize(("text", "seconds"), [("15s", 15), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), (7, 7)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5", "m", "-1s", "1x", True, None, "0s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=12), inner, max_size=4), max_leaves=12)
_sections = st.sampled_from(["database", "media", "redis", "immich", "intervals", "checks", "remediation",
                             "web", "log", "collectors", "bogus"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_sections, st.dictionaries(st.text(max_size=20), _values, max_size=5) | _values, max_size=5))
def test_fuzzed_config_only_raises_config_error(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, object]
) -> None:
    import yaml

    path = tmp_path_factory.mktemp("fuzz") / "c.yml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(str(path), environ={})
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and "\n" not in p for p in exc.problems)


def test_every_problem_is_listed_at_once_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        f"database: {{hots: db, port: 0, password_file: {missing}}}\n"
        "intervals: {files: soon}\n"
        "log: {level: loud}\n"
        "remediation: {enabled: true}\n"
        "bogus: 1\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(str(cfg), environ={})
    sections = "database, media, redis, immich, intervals, checks, remediation, web, log, collectors"
    database_keys = (
        "connect_timeout, fetch_size, host, name, password, pool_size, port, sslmode, statement_timeout, url, user"
    )
    assert sorted(err.value.problems) == sorted([
        f"bogus: unknown key (known keys: {sections})",
        f"database.hots: unknown key (known keys: {database_keys})",
        "database.port: expected a TCP port, got 0",
        f"database.password: cannot read secret file {missing}: No such file or directory",
        "intervals.files: expected a duration like 15s, 1m30s or 500ms, got 'soon'",
        "log.level: expected one of debug, info, warn, error, got 'loud'",
        "remediation.enabled: needs immich.url and immich.api_key (regeneration goes via the API)",
    ])  # fmt: skip


def test_secret_values_never_in_problems(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("database: {password: [hunter2]}\nredis: {url: {x: hunter3}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(cfg), environ={})
    assert err.value.problems == ["database.password: expected a string, got <redacted>",
                                  "redis.url: expected a string, got <redacted>"]  # fmt: skip


def test_lists_from_the_environment_and_from_yaml(tmp_path: Path) -> None:
    c = load_config(None, environ={}, overrides={"remediation.kinds": "thumbnail, preview"})
    assert c.remediation.kinds == ("thumbnail", "preview")
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={}, overrides={"remediation.reasons": ["file_missing", "bogus"]})
    assert err.value.problems == [
        "remediation.reasons: unknown reason 'bogus' (expected no_record, file_missing, file_empty, file_corrupt, "
        "file_unreadable)"
    ]


NOT_CONFIGURED_LINE = (
    "database: not configured; set it in the database section of the configuration file (--config.file), or with "
    "Immich's variables DB_URL or DB_HOSTNAME (and DB_PORT, DB_USERNAME, DB_PASSWORD, DB_DATABASE_NAME)"
)


def test_no_database_anywhere_is_a_problem_where_required(tmp_path: Path) -> None:
    media_only = tmp_path / "media.yml"
    media_only.write_text("media: {root: /data}\ndatabase:\n")  # an empty section names nothing
    for path in (None, str(media_only)):
        with pytest.raises(ConfigError) as err:
            load_config(path, environ={}, require_database=True)
        assert err.value.problems == [NOT_CONFIGURED_LINE]
        # Without the requirement (the demo, tests): Immich's compose defaults, as before.
        assert load_config(path, environ={}).database.host == "database"
    # Any one of Immich's DB_* variables names it (an Immich .env sets DB_PASSWORD, not DB_HOSTNAME) ...
    secret = tmp_path / "pw"
    secret.write_text("pw")
    for env in ({"DB_URL": "postgresql://u@h/db"}, {"DB_HOSTNAME": "db"}, {"DB_PASSWORD": "x"},
                {"DB_PASSWORD_FILE": str(secret)}, {"DB_DATABASE_NAME": "immich"}):  # fmt: skip
        assert load_config(str(media_only), environ=env, require_database=True).media.root == "/data"
    # ... as does a section with a key, or a flag.
    section = tmp_path / "db.yml"
    section.write_text("database: {host: db}\n")
    assert load_config(str(section), environ={}, require_database=True).database.host == "db"
    flag = load_config(None, environ={}, overrides={"database.url": "postgresql://u@h/db"}, require_database=True)
    assert flag.database.url is not None
    # Other problems are listed beside it.
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={}, overrides={"log.level": "loud"}, require_database=True)
    assert err.value.problems == [
        NOT_CONFIGURED_LINE,
        "log.level: expected one of debug, info, warn, error, got 'loud'",
    ]


@pytest.mark.parametrize(("value", "seconds"), [
    ("1m30s", 90), ("500ms", 0.5), ("1.5h", 5400), (".5s", 0.5), ("+2s", 2), ("0", 0), (1_500_000_000, 1.5),
    ("1d", 86400), ("250us", 0.00025),
])  # fmt: skip
def test_durations_as_go_reads_them(value: object, seconds: float) -> None:
    assert parse_duration(value, zero=True, numbers="nanoseconds") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", [1.5, "-1s", "soon", True, None, "1s2", "s", float("nan")])
def test_bad_go_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad, zero=True, numbers="nanoseconds")


def test_duration_flags_parse_with_the_same_parser() -> None:
    import argparse

    from immich_thumbnail_exporter.config import duration_argument

    assert duration_argument("1m30s") == 90
    with pytest.raises(argparse.ArgumentTypeError, match="expected a duration like 15s"):
        duration_argument("soon")



@pytest.mark.parametrize(("text", "expected"), [
    ("database:\n  host: db\n  port: 5432\n  host: other\n",
     "malformed YAML at line 4, column 3: duplicate key 'host' (first given at line 2)"),
    ("database: {host: db}\nmedia: {root: /data}\ndatabase: {host: other}\n",
     "malformed YAML at line 3, column 1: duplicate key 'database' (first given at line 1)"),
])
def test_duplicate_keys_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    """A key given twice is an error naming it, not the last one silently winning (the web configuration
    file refuses them the same way)."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(cfg), environ={})
    assert err.value.problems == [f"{cfg}: {expected}"]


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    """``<<: *anchor`` followed by a key of its own is YAML's override, not a duplicate."""
    cfg = tmp_path / "c.yml"
    cfg.write_text("database:\n  <<: {host: db, port: 1111}\n  port: 2222\n")
    c = load_config(str(cfg), environ={})
    assert (c.database.host, c.database.port) == ("db", 2222)


def test_check_config_names_a_duplicate_key_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("database:\n  host: db\nintervals:\n  files: 1h\n  files: 2h\n")
    res = run_cli("check-config", "--config.file", str(cfg))
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    duplicate = "malformed YAML at line 5, column 3: duplicate key 'files' (first given at line 4)"
    assert errors == [f"error: {cfg}: {duplicate}"]
    assert "Traceback" not in res.stderr
