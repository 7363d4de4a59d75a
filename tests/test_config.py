"""Configuration: YAML, then environment, then flags; secrets from files; nothing printed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from immich_thumbnail_exporter.config import ConfigError, Secret, describe, load_config, parse_duration, redact_url


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
