"""Reading and validating a web configuration file, listing every problem it has at once.

Each section is checked key by key; checks across keys run once a section's keys are valid (so that a
bad value is not reported a second time as a missing one), and the TLS files are loaded once the whole
``tls_server_config`` is valid.
"""

from __future__ import annotations

import difflib
import os
import ssl
from collections.abc import Mapping
from typing import Any

import yaml

from immich_thumbnail_exporter.config import strict_yaml
from immich_thumbnail_exporter.config.durations import parse_duration
from immich_thumbnail_exporter.exposition.webconfig.auth import valid_bcrypt
from immich_thumbnail_exporter.exposition.webconfig.config import WebConfig
from immich_thumbnail_exporter.exposition.webconfig.names import (
    ALLOWED_HEADERS,
    ALLOWED_HEADERS_LOWER,
    CIPHER_SUITES,
    CLIENT_AUTH_TYPES,
    CURVES,
    HTTP_KEYS,
    RATE_LIMIT_KEYS,
    TLS_KEYS,
    TLS_VERSION_NAMES,
    TLS_VERSIONS,
    TOP_KEYS,
    VERIFYING_AUTH_TYPES,
)
from immich_thumbnail_exporter.exposition.webconfig.parts import Problem, RateLimit, TLSServerConfig, error
from immich_thumbnail_exporter.exposition.webconfig.tls import MAX_FILE_BYTES, build_context, read_small_file


def load_web_config(path: str | None) -> WebConfig:
    """Read and validate a web configuration file; None or "" gives plain HTTP without auth.

    Raises WebConfigError with every problem found, one line each.
    """
    if not path:
        return WebConfig()
    problems: list[str] = []
    try:
        config = _load(path, problems)
    except Problem as exc:  # the file itself cannot be used: nothing else to check
        problems = [str(exc)]
    except RecursionError:
        problems = ["the YAML is nested too deeply"]
    if problems or config is None:
        raise error(path, problems or ["cannot be loaded"])
    return config


def _load(path: str, problems: list[str]) -> WebConfig | None:
    try:
        content = read_small_file(path)
    except OSError as exc:
        raise Problem(f"cannot read web configuration file: {exc.strerror or exc}") from None
    if content is None:
        raise Problem(f"the file is larger than {MAX_FILE_BYTES} bytes; is it the right file?")
    try:
        data = strict_yaml.load(content)
    except yaml.YAMLError as exc:
        raise Problem(strict_yaml.describe(exc)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise Problem(f"expected a mapping at the top level, got {_kind(data)}")
    _check_keys(data, TOP_KEYS, "", problems)

    base_dir = os.path.dirname(os.path.abspath(path))
    tls = _parse_tls(_section(data, "tls_server_config", problems), base_dir, problems)
    http2, headers = _parse_http(_section(data, "http_server_config", problems), problems)
    users = _parse_users(data.get("basic_auth_users"), problems)
    rate_limit = _parse_rate_limit(_section(data, "rate_limit", problems), problems)
    if problems:
        return None
    return WebConfig(path=path, tls=tls, http2=http2, headers=headers, basic_auth_users=users, rate_limit=rate_limit)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _check_keys(data: Mapping[Any, Any], allowed: tuple[str, ...], where: str, problems: list[str]) -> None:
    for key in data:
        if key in allowed:
            continue
        name = f"{where}.{key}" if where else str(key)
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
        problems.append(f"unknown key {name!r}{hint}; allowed here: {', '.join(allowed)}")


def _section(data: Mapping[str, Any], name: str, problems: list[str]) -> dict[Any, Any]:
    value = data.get(name)
    if value is None:  # absent or empty: the defaults, as in Go
        return {}
    if not isinstance(value, dict):
        problems.append(f"{name}: expected a mapping, got {_kind(value)}")
        return {}
    return value


def _opt_str(data: Mapping[str, Any], key: str, where: str, problems: list[str]) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        problems.append(f"{where}.{key}: expected a string, got {_kind(value)}")
        return None
    return value


def _opt_bool(data: Mapping[str, Any], key: str, where: str, default: bool, problems: list[str]) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        problems.append(f"{where}.{key}: expected true or false, got {_kind(value)}")
        return default
    return value


def _opt_str_list(data: Mapping[str, Any], key: str, where: str, problems: list[str]) -> tuple[str, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        problems.append(f"{where}.{key}: expected a list of strings, got {_kind(value)}")
        return None
    for item in value:
        if not isinstance(item, str):
            problems.append(f"{where}.{key}: expected a list of strings, found {_kind(item)}")
            return None
    return tuple(value)


def _join_dir(base_dir: str, path: str | None) -> str | None:
    if not path:
        return None
    return os.path.normpath(os.path.join(base_dir, path))  # an absolute path stays as it is


def _parse_tls(data: Mapping[str, Any], base_dir: str, problems: list[str]) -> TLSServerConfig | None:
    w = "tls_server_config"
    before = len(problems)
    _check_keys(data, TLS_KEYS, w, problems)

    versions: dict[str, ssl.TLSVersion] = {}
    for vkey, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = _opt_str(data, vkey, w, problems) or default
        if name in TLS_VERSIONS:
            versions[vkey] = TLS_VERSIONS[name]
        else:
            problems.append(f"{w}.{vkey}: unknown TLS version {name!r}; expected one of {', '.join(TLS_VERSIONS)}")
    min_version = versions.get("min_version", ssl.TLSVersion.TLSv1_2)
    max_version = versions.get("max_version", ssl.TLSVersion.TLSv1_3)
    if len(versions) == 2 and min_version > max_version:
        problems.append(
            f"{w}: min_version {TLS_VERSION_NAMES[min_version]} is above max_version {TLS_VERSION_NAMES[max_version]}"
        )

    auth_type = _opt_str(data, "client_auth_type", w, problems)
    if auth_type is not None and auth_type not in CLIENT_AUTH_TYPES:
        problems.append(
            f"{w}.client_auth_type: unknown value {auth_type!r}; expected one of "
            + ", ".join(k for k in CLIENT_AUTH_TYPES if k != "RequireClientCert")
        )
    elif auth_type is not None and CLIENT_AUTH_TYPES[auth_type] is None:
        problems.append(
            f"{w}.client_auth_type: {auth_type} cannot be honoured here: Python's ssl module cannot require "
            "a client certificate without verifying it; use RequireAndVerifyClientCert with client_ca_file"
        )

    cipher_suites = _opt_str_list(data, "cipher_suites", w, problems) or ()
    for name in cipher_suites:
        if name not in CIPHER_SUITES:
            problems.append(
                f"{w}.cipher_suites: unknown or insecure cipher suite {name!r}; use Go names such as "
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (see Go's tls.CipherSuites())"
            )
    curves = _opt_str_list(data, "curve_preferences", w, problems) or ()
    for name in curves:
        if name not in CURVES:
            problems.append(f"{w}.curve_preferences: unknown curve {name!r}; expected one of {', '.join(CURVES)}")
    if len(curves) > 1:
        problems.append(
            f"{w}.curve_preferences: Python's ssl module can restrict the key exchange to one curve only, "
            f"not an ordered list; keep one of {', '.join(curves)}"
        )
    prefer = _opt_bool(data, "prefer_server_cipher_suites", w, True, problems)
    sans = _opt_str_list(data, "client_allowed_sans", w, problems)

    cert_file, key_file, ca_file = (_opt_str(data, k, w, problems) for k in ("cert_file", "key_file", "client_ca_file"))
    cert_text, key_text, ca_text = (_opt_str(data, k, w, problems) for k in ("cert", "key", "client_ca"))
    # The toolkit's rule: TLS is on as soon as one of these is set; otherwise plain HTTP.
    if len(problems) > before or not any((cert_file, key_file, ca_file, cert_text, key_text, ca_text, auth_type)):
        return None

    for inline, file in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if data.get(inline) and data.get(file):
            problems.append(f"{w}: set either {inline} or {file}, not both")
    if not (cert_text or cert_file):
        problems.append(f"{w}: missing one of cert or cert_file")
    if not (key_text or key_file):
        problems.append(f"{w}: missing one of key or key_file")
    auth_type = auth_type or "NoClientCert"
    if (ca_text or ca_file) and CLIENT_AUTH_TYPES[auth_type] == ssl.CERT_NONE and auth_type != "RequestClientCert":
        problems.append(
            f"{w}: client_ca_file or client_ca is set but client_auth_type is {auth_type}; "
            "set client_auth_type: RequireAndVerifyClientCert"
        )
    if sans is not None and not sans:
        problems.append(f"{w}.client_allowed_sans: the list is empty, so no client could connect")
    elif sans is not None and auth_type not in VERIFYING_AUTH_TYPES:
        problems.append(
            f"{w}.client_allowed_sans needs a verified client certificate: set client_auth_type to "
            "RequireAndVerifyClientCert or VerifyClientCertIfGiven"
        )

    tls = TLSServerConfig(
        cert_file=_join_dir(base_dir, cert_file),
        key_file=_join_dir(base_dir, key_file),
        client_ca_file=_join_dir(base_dir, ca_file),
        cert=cert_text,
        key=key_text,
        client_ca=ca_text,
        client_auth_type=auth_type,
        min_version=min_version,
        max_version=max_version,
        cipher_suites=cipher_suites,
        curve_preferences=curves,
        prefer_server_cipher_suites=prefer,
        client_allowed_sans=sans,
    )
    if cipher_suites and not tls.openssl_ciphers and tls.min_version < ssl.TLSVersion.TLSv1_3:
        problems.append(
            f"{w}.cipher_suites: lists only TLS 1.3 suites, which leaves TLS 1.2 and below with no cipher; "
            "add TLS 1.2 suites or set min_version: TLS13"
        )
    if len(problems) > before:
        return None
    try:
        build_context(tls)  # the certificate, key, CA, ciphers and curve must load now, not at first scrape
    except Problem as exc:
        problems.append(str(exc))
        return None
    return tls


def _parse_http(data: Mapping[str, Any], problems: list[str]) -> tuple[bool, tuple[tuple[str, str], ...]]:
    w = "http_server_config"
    _check_keys(data, HTTP_KEYS, w, problems)
    http2 = _opt_bool(data, "http2", w, True, problems)
    raw = data.get("headers")
    if raw is None:
        return http2, ()
    if not isinstance(raw, dict):
        problems.append(f"{w}.headers: expected a mapping of header names to values, got {_kind(raw)}")
        return http2, ()
    headers: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            problems.append(f"{w}.headers: header names must be strings, got {_kind(name)}")
            continue
        canonical = ALLOWED_HEADERS_LOWER.get(name.lower())
        if canonical is None:
            problems.append(
                f"{w}.headers: HTTP header {name!r} cannot be configured; allowed: {', '.join(ALLOWED_HEADERS)}"
            )
            continue
        if canonical in headers:
            problems.append(f"{w}.headers: {canonical} is set twice")
            continue
        if value is None or value == "":
            continue  # "unset if blank"
        if not isinstance(value, str):
            problems.append(f"{w}.headers.{canonical}: expected a string, got {_kind(value)}")
            continue
        if any(c in value for c in "\r\n\0"):
            problems.append(f"{w}.headers.{canonical}: the value contains a line break or NUL")
            continue
        allowed = ALLOWED_HEADERS[canonical]
        if allowed is not None and value not in allowed:
            problems.append(
                f"{w}.headers.{canonical}: invalid value {value!r}; expected one of {', '.join(allowed)}"
            )
            continue
        headers[canonical] = value
    return http2, tuple(headers.items())


def _parse_users(raw: Any, problems: list[str]) -> tuple[tuple[str, str], ...]:
    w = "basic_auth_users"
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        problems.append(f"{w}: expected a mapping of user names to bcrypt hashes, got {_kind(raw)}")
        return ()
    users: list[tuple[str, str]] = []
    for name, hashed in raw.items():
        if not isinstance(name, str):
            problems.append(f"{w}: user name {name!r} must be a string (quote it)")
        elif not isinstance(hashed, str) or not valid_bcrypt(hashed):
            problems.append(
                f"{w}.{name}: the password is not a bcrypt hash (expected something like $2y$10$ followed by "
                "53 characters, as printed by htpasswd -nBC 10 \"\" | tr -d ':\\n')"
            )
        else:
            users.append((name, hashed))
    return tuple(users)


def _parse_rate_limit(data: Mapping[str, Any], problems: list[str]) -> RateLimit | None:
    w = "rate_limit"
    before = len(problems)
    _check_keys(data, RATE_LIMIT_KEYS, w, problems)
    interval = 0.0
    if data.get("interval") is not None:
        try:
            # Go's yaml.v2 reads a time.Duration from a string, or from a number of nanoseconds.
            interval = parse_duration(data["interval"], zero=True, numbers="nanoseconds")
        except ValueError as exc:
            problems.append(f"{w}.interval: {exc}")
    burst = data.get("burst")
    if burst is None:
        burst = 0
    if isinstance(burst, bool) or not isinstance(burst, int):
        problems.append(f"{w}.burst: expected a whole number, got {_kind(burst)}")
    elif burst < 0:
        problems.append(f"{w}.burst: must not be negative")
    if len(problems) > before or interval == 0:
        return None  # "set to 0 to disable rate limiter"
    if burst == 0:
        problems.append(f"{w}.burst: must be at least 1 when an interval is set, or no request would pass")
        return None
    return RateLimit(interval=interval, burst=burst)
