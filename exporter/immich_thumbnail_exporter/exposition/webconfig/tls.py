"""TLS for the HTTP server: a server context from ``tls_server_config``, rebuilt when its files change.

Certificates, keys and the client CA file are re-read when they change on disk (checked at each
handshake), so a rotated certificate is served without a restart, as with the toolkit.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from aiohttp import web

from immich_thumbnail_exporter.exposition.webconfig.names import CIPHER_SUITES, CURVES
from immich_thumbnail_exporter.exposition.webconfig.parts import Problem, TLSServerConfig

log = logging.getLogger(__name__)

MAX_FILE_BYTES: Final = 4 * 1024 * 1024  # the config, certificate, key and CA files are small


def read_small_file(path: str) -> bytes | None:
    """The file's bytes, or None when it is larger than ``MAX_FILE_BYTES`` (``/dev/zero``, a wrong path)."""
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    return data if len(data) <= MAX_FILE_BYTES else None


def read_pem(path: str, what: str) -> bytes:
    try:
        data = read_small_file(path)
    except OSError as exc:
        raise Problem(f"tls_server_config.{what}: cannot read {path}: {exc.strerror or exc}") from None
    if data is None:
        raise Problem(f"tls_server_config.{what}: {path} is larger than {MAX_FILE_BYTES} bytes")
    return data


@contextmanager
def _pem_files(tls: TLSServerConfig) -> Iterator[tuple[str, str]]:
    """Paths of the certificate and key as PEM files, writing inline values to a private temporary dir."""
    cert_what = "cert_file" if tls.cert_file else "cert"
    key_what = "key_file" if tls.key_file else "key"
    cert = read_pem(tls.cert_file, cert_what) if tls.cert_file else (tls.cert or "").encode()
    key = read_pem(tls.key_file, key_what) if tls.key_file else (tls.key or "").encode()
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise Problem(f"tls_server_config.{cert_what}: no PEM certificate (-----BEGIN CERTIFICATE-----) found")
    if b"PRIVATE KEY-----" not in key:
        raise Problem(f"tls_server_config.{key_what}: no PEM private key (-----BEGIN ... PRIVATE KEY-----) found")
    if b"ENCRYPTED" in key:
        raise Problem(f"tls_server_config.{key_what}: the private key is encrypted; a passphrase is not supported")
    with tempfile.TemporaryDirectory(prefix="webconfig-") as tmp:
        # Load exactly the bytes checked above, from files only this process can read.
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            p = os.path.join(tmp, name)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(p)
        yield paths[0], paths[1]


def _no_passphrase() -> bytes:
    return b""  # never let OpenSSL prompt on the terminal


def build_context(tls: TLSServerConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 / TLSv1_1, when asked for
        ctx.minimum_version = tls.min_version
        ctx.maximum_version = tls.max_version

    ciphers = ":".join(tls.openssl_ciphers)
    for go_name in tls.cipher_suites:
        ossl = CIPHER_SUITES[go_name]
        if ossl is None:
            continue
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ossl)
        except ssl.SSLError:
            raise Problem(
                f"tls_server_config.cipher_suites: {go_name} ({ossl}) is not available in this OpenSSL build"
            ) from None
    if tls.min_version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 only negotiates TLS 1.0/1.1 at security level 0; the file asked for them.
        ctx.set_ciphers((ciphers or "DEFAULT") + ":@SECLEVEL=0")
    elif ciphers:
        ctx.set_ciphers(ciphers)
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    for go_name in tls.curve_preferences:
        try:
            ctx.set_ecdh_curve(CURVES[go_name])
        except (ValueError, ssl.SSLError):
            raise Problem(
                f"tls_server_config.curve_preferences: {go_name} is not available in this OpenSSL build"
            ) from None
    ctx.set_alpn_protocols(["http/1.1"])

    with _pem_files(tls) as (cert_path, key_path):
        try:
            ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)
        except ssl.SSLError as exc:
            cert_what = f"cert_file {tls.cert_file}" if tls.cert_file else "cert"
            key_what = f"key_file {tls.key_file}" if tls.key_file else "key"
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise Problem(f"tls_server_config: {key_what} does not match {cert_what}") from None
            raise Problem(f"tls_server_config: cannot load {cert_what} with {key_what}: {exc.reason or exc}") from None

    ctx.verify_mode = tls.verify_mode
    if tls.verify_mode != ssl.CERT_NONE:
        if tls.client_ca_file:
            ca = read_pem(tls.client_ca_file, "client_ca_file")
            what = f"client_ca_file {tls.client_ca_file}"
        elif tls.client_ca:
            ca = tls.client_ca.encode()
            what = "client_ca"
        else:
            ca = b""
            what = ""
        if what:
            if b"-----BEGIN CERTIFICATE-----" not in ca:
                raise Problem(f"tls_server_config: {what} contains no PEM certificate")
            try:
                ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise Problem(f"tls_server_config: cannot load {what}: {reason}") from None
        else:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)  # Go's behaviour: the system roots
    return ctx


def _fingerprint(paths: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    result: list[tuple[int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            result.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            result.append(None)
    return tuple(result)


def reloading_context(tls: TLSServerConfig) -> ssl.SSLContext:
    """A context that, at each handshake, switches to a fresh one if the watched files have changed."""
    watched = tls.watched_files
    seen = _fingerprint(watched)
    base = build_context(tls)
    if not watched:
        return base
    state: dict[str, Any] = {"seen": seen, "current": base}

    def on_client_hello(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            fp = _fingerprint(watched)
            if fp != state["seen"]:
                state["seen"] = fp  # retry on the next change, not on every handshake
                try:
                    state["current"] = build_context(tls)
                    log.info("TLS certificate files changed; reloaded them")
                except Problem as exc:
                    log.warning("TLS certificate files changed but cannot be loaded, keeping the old ones: %s", exc)
            if state["current"] is not base:
                sslobj.context = state["current"]
        except Exception:  # a failure here must not break the handshake
            log.exception("TLS certificate reload failed")

    base.sni_callback = on_client_hello
    return base


def normalise_san(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def client_san_allowed(request: web.Request, allowed: frozenset[str]) -> bool:
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:  # no certificate, or one that was not verified
        return False
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI") and value in allowed:
            return True
        if kind == "IP Address" and normalise_san(value) in allowed:
            return True
    return False
