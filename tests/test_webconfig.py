"""``--web.config.file``: real certificates (openssl CLI), a real aiohttp server over real TLS, no mocks."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import ssl
import subprocess
import tempfile
import textwrap
import threading
import time
import urllib.request
import warnings
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from immich_thumbnail_exporter.exposition.webconfig import (
    ALLOWED_HEADERS,
    CIPHER_SUITES,
    CLIENT_AUTH_TYPES,
    CURVES,
    WebConfig,
    WebConfigError,
    load_web_config,
)
from immich_thumbnail_exporter.exposition.webconfig import auth as webauth

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

# --------------------------------------------------------------------------------------------------------
# Throwaway PKI


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    server2_cert: Path  # same key, another certificate: for the rotation test
    client_cert: Path  # SAN DNS:scraper.example, URI:spiffe://test/scraper
    client_key: Path
    other_client_cert: Path  # same CA, SAN DNS:intruder.example, IP:127.0.0.2
    other_client_key: Path
    rogue_client_cert: Path  # another CA altogether
    rogue_client_key: Path
    rsa_cert: Path
    rsa_key: Path
    encrypted_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ec_key(name: str, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", name, cwd=cwd)


def _ca(name: str, cwd: Path) -> None:
    _ec_key(f"{name}.key", cwd)
    _openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd,
    )  # fmt: skip


def _leaf(name: str, key: str, ca: str, cn: str, san: str, usage: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-new", "-key", key, "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=cwd)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    _ca("ca", d)
    _ca("rogue-ca", d)
    for key in ("server", "client", "other", "rogue"):
        _ec_key(f"{key}.key", d)
    local = "DNS:localhost,IP:127.0.0.1"
    _leaf("server", "server.key", "ca", "localhost", local, "serverAuth", d)
    _leaf("server2", "server.key", "ca", "localhost-rotated", local, "serverAuth", d)
    _leaf("client", "client.key", "ca", "scraper", "DNS:scraper.example,URI:spiffe://test/scraper", "clientAuth", d)
    _leaf("other", "other.key", "ca", "intruder", "DNS:intruder.example,IP:127.0.0.2", "clientAuth", d)
    _leaf("rogue", "rogue.key", "rogue-ca", "scraper", "DNS:scraper.example", "clientAuth", d)
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "rsa.key", cwd=d)
    _leaf("rsa", "rsa.key", "ca", "localhost", local, "serverAuth", d)
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key", cwd=d)
    return PKI(
        dir=d,
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        server2_cert=d / "server2.crt",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        other_client_cert=d / "other.crt",
        other_client_key=d / "other.key",
        rogue_client_cert=d / "rogue.crt",
        rogue_client_key=d / "rogue.key",
        rsa_cert=d / "rsa.crt",
        rsa_key=d / "rsa.key",
        encrypted_key=d / "encrypted.key",
    )


@pytest.fixture(scope="session")
def hashes() -> dict[str, str]:
    """bcrypt hashes at the cheapest cost, for tests that are not about cost."""
    return {
        "alice": bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode(),
        "bob": bcrypt.hashpw(b"builder", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1),
    }


# --------------------------------------------------------------------------------------------------------
# Helpers


def write_config(directory: Path, content: str | Mapping[str, Any], name: str = "web.yml") -> str:
    path = directory / name
    text = content if isinstance(content, str) else yaml.safe_dump(dict(content))
    path.write_text(textwrap.dedent(text) if isinstance(content, str) else text)
    return str(path)


def tls_section(pki: PKI, **extra: Any) -> dict[str, Any]:
    return {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), **extra}


def client_context(
    pki: PKI,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
    legacy: bool = False,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if legacy:  # let the client itself speak TLS 1.0/1.1, so that only the server can refuse
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1, on purpose
        if min_version is not None:
            ctx.minimum_version = min_version
        if max_version is not None:
            ctx.maximum_version = max_version
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello from {request.path}\n")


@asynccontextmanager
async def serve(cfg: WebConfig, **middleware_kwargs: Any) -> AsyncIterator[int]:
    app = web.Application(middlewares=[cfg.middleware(**middleware_kwargs)])
    for path in ("/", "/metrics", "/healthz", "/problems"):
        app.router.add_get(path, _hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cfg.ssl_context())
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def _auth_header(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: str


async def get(
    port: int,
    path: str = "/metrics",
    *,
    ssl_ctx: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    scheme = "https" if ssl_ctx is not None else "http"
    host = "localhost" if ssl_ctx is not None else "127.0.0.1"
    headers = {**(_auth_header(*auth) if auth else {}), **(headers or {})}
    connector = aiohttp.TCPConnector(ssl=ssl_ctx if ssl_ctx is not None else False, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{scheme}://{host}:{port}{path}", headers=headers) as resp,
    ):
        return Reply(resp.status, dict(resp.headers), await resp.text())


async def handshake(port: int, ctx: ssl.SSLContext) -> tuple[str | None, str | None, bytes | None]:
    """Open a TLS connection and do one request: (version, cipher, server certificate DER).

    With TLS 1.3 a refused client certificate only shows after the handshake, so a request is sent and
    the answer read; a failure anywhere raises.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    try:
        sslobj = writer.get_extra_info("ssl_object")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        if not data.startswith(b"HTTP/1.1 "):
            raise ConnectionError(f"no HTTP answer: {data!r}")
        cipher = sslobj.cipher()
        return sslobj.version(), cipher[0] if cipher else None, sslobj.getpeercert(binary_form=True)
    finally:
        writer.close()
        with suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def assert_refused(port: int, ctx: ssl.SSLContext) -> None:
    """The server refuses the connection.

    asyncio's server drops the connection on a failed handshake without flushing OpenSSL's alert, so the
    client sees a reset or an EOF as often as an alert. A refusal by the client's own library (it could
    not even offer what it was asked to) would prove nothing, so that one fails the test.
    """
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)) as info:
        await handshake(port, ctx)
    assert "NO_PROTOCOLS_AVAILABLE" not in str(info.value)
    assert "NO_CIPHERS_AVAILABLE" not in str(info.value)


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


# --------------------------------------------------------------------------------------------------------
# No file, plain HTTP


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_no_config_is_plain_http_without_auth() -> None:
    cfg = load_web_config(None)
    assert cfg == WebConfig() == load_web_config("")
    assert cfg.ssl_context() is None
    assert not cfg.auth_enabled
    async with serve(cfg) as port:
        reply = await get(port)
    assert reply.status == 200
    assert "WWW-Authenticate" not in reply.headers


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    for text in ("", "---\n", "tls_server_config:\nhttp_server_config:\nbasic_auth_users:\nrate_limit:\n"):
        cfg = load_web_config(write_config(tmp_path, text))
        assert cfg.tls is None and not cfg.auth_enabled and cfg.headers == () and cfg.rate_limit is None
        assert cfg.ssl_context() is None


def test_tls_section_without_certificate_keys_is_plain_http(tmp_path: Path) -> None:
    # The toolkit's rule: TLS is on only once a certificate, key, CA or client_auth_type is given.
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": {"min_version": "TLS13"}}))
    assert cfg.tls is None
    assert cfg.ssl_context() is None


# --------------------------------------------------------------------------------------------------------
# TLS versions, ciphers, curves


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_tls12_and_tls13_accepted_tls11_refused(pki: PKI, tmp_path: Path) -> None:
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki)}))
    assert cfg.tls is not None and cfg.tls.min_version == ssl.TLSVersion.TLSv1_2  # the default
    async with serve(cfg) as port:
        v12 = ssl.TLSVersion.TLSv1_2
        v13 = ssl.TLSVersion.TLSv1_3
        assert (await handshake(port, client_context(pki, min_version=v12, max_version=v12)))[0] == "TLSv1.2"
        assert (await handshake(port, client_context(pki, min_version=v13)))[0] == "TLSv1.3"
        reply = await get(port, ssl_ctx=client_context(pki))
        assert reply.status == 200 and reply.body == "hello from /metrics\n"

        v11 = ssl.TLSVersion.TLSv1_1
        legacy = client_context(pki, min_version=v11, max_version=v11, legacy=True)
        await assert_refused(port, legacy)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_min_version_tls11_really_allows_tls11(pki: PKI, tmp_path: Path) -> None:
    """The positive control for the test above: the same legacy client gets in when the file allows it."""
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki, min_version="TLS11")}))
    v11 = ssl.TLSVersion.TLSv1_1
    async with serve(cfg) as port:
        try:
            version, _, _ = await handshake(port, client_context(pki, min_version=v11, max_version=v11, legacy=True))
        except ssl.SSLError as exc:  # pragma: no cover - depends on the OpenSSL build
            if "NO_PROTOCOLS_AVAILABLE" in str(exc) or "UNSUPPORTED_PROTOCOL" in str(exc):
                pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {exc}")
            raise
    assert version == "TLSv1.1"


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_max_version_tls12_refuses_tls13_only_clients(pki: PKI, tmp_path: Path) -> None:
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki, max_version="TLS12")}))
    async with serve(cfg) as port:
        assert (await handshake(port, client_context(pki)))[0] == "TLSv1.2"
        await assert_refused(port, client_context(pki, min_version=ssl.TLSVersion.TLSv1_3))


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_min_version_tls13(pki: PKI, tmp_path: Path) -> None:
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki, min_version="TLS13")}))
    async with serve(cfg) as port:
        assert (await handshake(port, client_context(pki)))[0] == "TLSv1.3"
        await assert_refused(port, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2))


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_cipher_suites_in_go_spelling_restrict_tls12(pki: PKI, tmp_path: Path) -> None:
    tls = tls_section(
        pki,
        cipher_suites=["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"],
        prefer_server_cipher_suites=True,
    )
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls}))
    v12 = ssl.TLSVersion.TLSv1_2
    async with serve(cfg) as port:
        _, cipher, _ = await handshake(port, client_context(pki, max_version=v12))
        assert cipher == "ECDHE-ECDSA-AES256-GCM-SHA384"
        narrow = client_context(pki, max_version=v12)
        narrow.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        await assert_refused(port, narrow)
        # TLS 1.3 suites are not restricted (Go ignores cipher_suites for TLS 1.3 too).
        assert (await handshake(port, client_context(pki)))[0] == "TLSv1.3"
    ctx = cfg.ssl_context()
    assert ctx is not None and ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_rsa_certificate_and_rsa_cipher(pki: PKI, tmp_path: Path) -> None:
    tls = {
        "cert_file": str(pki.rsa_cert),
        "key_file": str(pki.rsa_key),
        "cipher_suites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"],
        "prefer_server_cipher_suites": False,
    }
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls}))
    ctx = cfg.ssl_context()
    assert ctx is not None and not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    async with serve(cfg) as port:
        _, cipher, _ = await handshake(port, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2))
    assert cipher == "ECDHE-RSA-AES128-GCM-SHA256"


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_curve_preferences_one_curve(pki: PKI, tmp_path: Path) -> None:
    cfg = load_web_config(
        write_config(tmp_path, {"tls_server_config": tls_section(pki, curve_preferences=["CurveP384"])})
    )
    async with serve(cfg) as port:
        p384 = client_context(pki)
        p384.set_ecdh_curve("secp384r1")
        assert (await handshake(port, p384))[0] == "TLSv1.3"
        p256 = client_context(pki)
        p256.set_ecdh_curve("prime256v1")
        await assert_refused(port, p256)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_http2_is_not_negotiated(pki: PKI, tmp_path: Path) -> None:
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki)}))
    assert cfg.http2  # the toolkit's default, accepted; aiohttp only has HTTP/1.1
    ctx = client_context(pki)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    async with serve(cfg) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.close()
        await writer.wait_closed()


# --------------------------------------------------------------------------------------------------------
# Files: relative paths, inline PEM, rotation


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_relative_paths_resolve_against_the_config_directory(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    (conf_dir / "certs").mkdir(parents=True)
    shutil.copy(pki.server_cert, conf_dir / "certs" / "tls.crt")
    shutil.copy(pki.server_key, conf_dir / "tls.key")
    path = write_config(conf_dir, {"tls_server_config": {"cert_file": "certs/tls.crt", "key_file": "tls.key"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_web_config(str(Path("..") / "conf" / Path(path).name))
    assert cfg.tls is not None and cfg.tls.cert_file == str(conf_dir / "certs" / "tls.crt")
    async with serve(cfg) as port:
        assert (await get(port, ssl_ctx=client_context(pki))).status == 200


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_inline_cert_key_and_client_ca(pki: PKI, tmp_path: Path) -> None:
    tls = {
        "cert": pki.server_cert.read_text(),
        "key": pki.server_key.read_text(),
        "client_ca": pki.ca.read_text(),
        "client_auth_type": "RequireAndVerifyClientCert",
    }
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls}))
    assert "PRIVATE KEY" not in repr(cfg)
    async with serve(cfg) as port:
        ok = client_context(pki, cert=pki.client_cert, key=pki.client_key)
        assert (await get(port, ssl_ctx=ok)).status == 200
        await assert_refused(port, client_context(pki))


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_rotated_certificate_is_served_without_restart(pki: PKI, tmp_path: Path) -> None:
    cert = tmp_path / "tls.crt"
    key = tmp_path / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    cfg = load_web_config(
        write_config(tmp_path, {"tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"}})
    )
    async with serve(cfg) as port:
        assert (await handshake(port, client_context(pki)))[2] == der(pki.server_cert)

        new = tmp_path / "new.crt"
        shutil.copy(pki.server2_cert, new)
        os.replace(new, cert)  # an atomic swap, as kubelet and cert-manager do
        assert (await handshake(port, client_context(pki)))[2] == der(pki.server2_cert)

        # A broken rotation keeps the last good certificate.
        cert.write_text("not a certificate\n")
        st = cert.stat()
        os.utime(cert, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert (await handshake(port, client_context(pki)))[2] == der(pki.server2_cert)


# --------------------------------------------------------------------------------------------------------
# Client certificates


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_require_and_verify_client_cert(pki: PKI, tmp_path: Path) -> None:
    tls = tls_section(pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(pki.ca))
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls}))
    async with serve(cfg) as port:
        good = client_context(pki, cert=pki.client_cert, key=pki.client_key)
        assert (await get(port, ssl_ctx=good)).status == 200
        assert (await get(port, "/healthz", ssl_ctx=good)).status == 200
        for ctx in (
            client_context(pki),  # no certificate
            client_context(pki, cert=pki.rogue_client_cert, key=pki.rogue_client_key),  # unknown CA
        ):
            for tls13 in (False, True):
                if not tls13:
                    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
                else:
                    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
                await assert_refused(port, ctx)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_verify_client_cert_if_given(pki: PKI, tmp_path: Path) -> None:
    tls = tls_section(pki, client_auth_type="VerifyClientCertIfGiven", client_ca_file=str(pki.ca))
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls}))
    async with serve(cfg) as port:
        assert (await get(port, ssl_ctx=client_context(pki))).status == 200
        good = client_context(pki, cert=pki.client_cert, key=pki.client_key)
        assert (await get(port, ssl_ctx=good)).status == 200
        rogue = client_context(pki, cert=pki.rogue_client_cert, key=pki.rogue_client_key)
        await assert_refused(port, rogue)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_client_allowed_sans(pki: PKI, tmp_path: Path) -> None:
    tls = tls_section(
        pki,
        client_auth_type="VerifyClientCertIfGiven",
        client_ca_file=str(pki.ca),
        client_allowed_sans=["spiffe://test/scraper", "127.0.0.9"],
    )
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls}))
    async with serve(cfg) as port:
        good = client_context(pki, cert=pki.client_cert, key=pki.client_key)
        assert (await get(port, ssl_ctx=good)).status == 200
        other = client_context(pki, cert=pki.other_client_cert, key=pki.other_client_key)
        assert (await get(port, ssl_ctx=other)).status == 403
        assert (await get(port, "/healthz", ssl_ctx=other)).status == 403  # a TLS policy: every path
        assert (await get(port, ssl_ctx=client_context(pki))).status == 403  # no certificate at all

    tls["client_allowed_sans"] = ["127.0.0.2"]  # an IP SAN
    cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls}))
    async with serve(cfg) as port:
        assert (await get(port, ssl_ctx=other)).status == 200
        assert (await get(port, ssl_ctx=good)).status == 403


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_request_client_cert_serves_without_checking(pki: PKI, tmp_path: Path) -> None:
    cfg = load_web_config(
        write_config(tmp_path, {"tls_server_config": tls_section(pki, client_auth_type="RequestClientCert")})
    )
    async with serve(cfg) as port:
        assert (await get(port, ssl_ctx=client_context(pki))).status == 200


# --------------------------------------------------------------------------------------------------------
# Basic auth, headers, rate limit


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_basic_auth_over_tls_with_headers(pki: PKI, hashes: dict[str, str], tmp_path: Path) -> None:
    doc = {
        "tls_server_config": tls_section(pki),
        "http_server_config": {
            "headers": {
                "X-Frame-Options": "deny",
                "x-content-type-options": "nosniff",  # names are matched case-insensitively
                "Strict-Transport-Security": "max-age=31536000",
                "Content-Security-Policy": "",  # blank: unset
            }
        },
        "basic_auth_users": hashes,
    }
    cfg = load_web_config(write_config(tmp_path, doc))
    assert cfg.auth_enabled
    assert "$2" not in repr(cfg)
    ctx = client_context(pki)
    async with serve(cfg) as port:
        ok = await get(port, ssl_ctx=ctx, auth=("alice", "wonderland"))
        assert ok.status == 200 and ok.body == "hello from /metrics\n"
        assert (await get(port, ssl_ctx=ctx, auth=("bob", "builder"))).status == 200  # a $2y$ hash
        assert (await get(port, ssl_ctx=ctx, auth=("alice", "wonderland"))).status == 200  # from the cache

        refused = [
            await get(port, ssl_ctx=ctx, auth=("alice", "wrong")),
            await get(port, ssl_ctx=ctx, auth=("mallory", "wonderland")),
            await get(port, ssl_ctx=ctx, auth=("alice", "builder")),  # bob's password
            await get(port, ssl_ctx=ctx),  # no header
            await get(port, "/", ssl_ctx=ctx),
            await get(port, "/problems", ssl_ctx=ctx),
            await get(port, ssl_ctx=ctx, headers={"Authorization": "Bearer abc"}),
            await get(port, ssl_ctx=ctx, headers={"Authorization": "Basic !!!not-base64"}),
            await get(port, ssl_ctx=ctx, headers={"Authorization": "Basic " + base64.b64encode(b"alice").decode()}),
            await get(port, ssl_ctx=ctx, headers=_auth_header("alice", "wonderland" + "x" * 100)),
            await get(port, ssl_ctx=ctx, headers=_auth_header("", "")),
        ]
        for reply in refused:
            assert reply.status == 401
            assert reply.headers["WWW-Authenticate"] == "Basic"
            assert reply.headers["X-Frame-Options"] == "deny"

        health = await get(port, "/healthz", ssl_ctx=ctx)
        assert health.status == 200 and "WWW-Authenticate" not in health.headers
        missing = await get(port, "/nope", ssl_ctx=ctx, auth=("alice", "wonderland"))
        assert missing.status == 404

    for reply in [ok, health, missing, *refused]:
        assert reply.headers["X-Frame-Options"] == "deny"
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert "Content-Security-Policy" not in reply.headers


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_custom_open_paths(hashes: dict[str, str], tmp_path: Path) -> None:
    cfg = load_web_config(write_config(tmp_path, {"basic_auth_users": hashes}))
    async with serve(cfg, open_paths=frozenset({"/healthz", "/"})) as port:
        assert (await get(port, "/")).status == 200
        assert (await get(port, "/healthz")).status == 200
        assert (await get(port, "/metrics")).status == 401
        assert (await get(port, "/healthz/")).status == 401  # exact paths only
    async with serve(cfg, open_paths=frozenset()) as port:
        assert (await get(port, "/healthz")).status == 401


def _hash(password: bytes, cost: int) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(cost)).decode()


class BcryptRuns:
    """Every bcrypt check the auth middleware runs: the thread it ran on, the cost of the hash, and the
    /healthz replies another client got while it ran. The figures (how long each took) are in
    ``python -m bench.webauth``; the tests assert what can be counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[int] = []
        self.costs: list[int] = []
        self.running = 0
        self.answered_meanwhile = 0
        real = webauth._bcrypt_check

        def counted(password: bytes, hashed: bytes) -> bool:
            self.threads.append(threading.get_ident())
            self.costs.append(int(hashed[4:6]))
            self.running += 1
            try:
                return real(password, hashed)
            finally:
                self.running -= 1

        monkeypatch.setattr(webauth, "_bcrypt_check", counted)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_bcrypt_cost_is_paid_once_and_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = BcryptRuns(monkeypatch)
    slow = _hash(b"correct horse", 13)  # about half a second per check on a laptop
    cfg = load_web_config(write_config(tmp_path, {"basic_auth_users": {"prometheus": slow}}))
    async with serve(cfg) as port:
        # Another thread polls /healthz while bcrypt runs: a blocked event loop could not answer it
        # until bcrypt ended. (An asyncio client on this loop would be blocked too, and could not tell.)
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as resp:
                    assert resp.status == 200
                    if runs.running:
                        runs.answered_meanwhile += 1

        poller = asyncio.create_task(asyncio.to_thread(poll))
        assert (await get(port, auth=("prometheus", "correct horse"))).status == 200
        stop.set()
        await poller
        assert len(runs.threads) == 1 and runs.threads[0] != threading.get_ident(), runs.threads
        assert runs.answered_meanwhile > 0, "no /healthz answered while bcrypt ran: the event loop was held"

        # Paid once: the next scrapes are answered from the cache, without a bcrypt run.
        for _ in range(5):
            assert (await get(port, auth=("prometheus", "correct horse"))).status == 200
        assert len(runs.threads) == 1, runs.threads

        # Concurrent identical checks share one bcrypt run: two identical wrong ones cost one run and
        # both fail (a failure is never cached); the right ones are still answered from the cache.
        replies = await asyncio.gather(
            *(get(port, auth=("prometheus", "correct horse")) for _ in range(4)),
            *(get(port, auth=("prometheus", "wrong")) for _ in range(2)),
        )
        assert [r.status for r in replies] == [200] * 4 + [401] * 2
        assert len(runs.threads) == 2, runs.threads
        assert (await get(port, auth=("prometheus", "wrong"))).status == 401
        assert len(runs.threads) == 3, runs.threads


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_unknown_user_costs_as_much_as_a_wrong_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown user runs the same bcrypt, at the configured cost, as a wrong password: no early
    "no such user". (How long each takes: ``python -m bench.webauth``.)"""
    runs = BcryptRuns(monkeypatch)
    users = {"prometheus": _hash(b"pw", 11), "grafana": _hash(b"pw", 10)}
    cfg = load_web_config(write_config(tmp_path, {"basic_auth_users": users}))
    async with serve(cfg) as port:
        for i in range(3):
            assert (await get(port, auth=("prometheus", f"nope{i}"))).status == 401
            assert runs.costs[-1] == 11
            assert (await get(port, auth=(f"nobody{i}", f"nope{i}"))).status == 401
            # The highest configured cost: an unknown name is never cheaper than any known one.
            assert runs.costs[-1] == 11, runs.costs
    assert len(runs.costs) == 6, runs.costs


AUTH_TIMEOUT = 0.2


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_bcrypt_timeout_gives_503_quickly(tmp_path: Path) -> None:
    very_slow = _hash(b"pw", 14)  # about a second per check
    cfg = load_web_config(write_config(tmp_path, {"basic_auth_users": {"prometheus": very_slow}}))
    async with serve(cfg, auth_timeout=AUTH_TIMEOUT) as port:
        t = time.perf_counter()
        reply = await get(port, auth=("prometheus", "pw"))
        assert reply.status == 503
        # The deadline the middleware promises: its timeout, plus a margin for the request itself.
        assert time.perf_counter() - t < AUTH_TIMEOUT + 0.8
        assert (await get(port, "/healthz")).status == 200


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_rate_limit(tmp_path: Path) -> None:
    cfg = load_web_config(write_config(tmp_path, "rate_limit:\n  interval: 1h\n  burst: 2\n"))
    assert cfg.rate_limit is not None and cfg.rate_limit.interval == 3600
    async with serve(cfg) as port:
        assert [(await get(port)).status for _ in range(3)] == [200, 200, 429]
        assert (await get(port, "/healthz")).status == 200  # open paths are not limited
    for text in ("rate_limit:\n  interval: 0\n  burst: 5\n", "rate_limit:\n  interval: '0s'\n", "rate_limit: {}\n"):
        assert load_web_config(write_config(tmp_path, text)).rate_limit is None
    cfg = load_web_config(write_config(tmp_path, "rate_limit:\n  interval: 1m30.5s\n  burst: 1\n"))
    assert cfg.rate_limit is not None and cfg.rate_limit.interval == pytest.approx(90.5)
    cfg = load_web_config(write_config(tmp_path, "rate_limit:\n  interval: 500000000\n  burst: 1\n"))  # ns
    assert cfg.rate_limit is not None and cfg.rate_limit.interval == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------------
# Bad files: one clear line each


BAD_CONFIGS: list[tuple[str, str, tuple[str, ...]]] = [
    ("unknown top key", "basic_auth_user:\n  a: b\n", ("unknown key", "basic_auth_user", "basic_auth_users")),
    ("unknown tls key", "tls_server_config:\n  certfile: x\n", ("unknown key", "tls_server_config.certfile")),
    ("unknown http key", "http_server_config:\n  http3: true\n", ("unknown key", "http_server_config.http3")),
    ("unknown rate key", "rate_limit:\n  every: 1s\n", ("unknown key", "rate_limit.every")),
    ("non-string key", "1: x\n", ("unknown key", "1")),
    ("bad yaml", "tls_server_config: [\n", ("malformed YAML", "line")),
    ("tabs", "basic_auth_users:\n\talice: x\n", ("malformed YAML",)),
    ("duplicate key", "basic_auth_users:\n  a: x\n  a: y\n", ("duplicate key", "'a'")),
    ("two documents", "a: 1\n---\nb: 2\n", ("malformed YAML",)),
    ("top list", "- a\n- b\n", ("expected a mapping at the top level", "a list")),
    ("top scalar", "hello\n", ("expected a mapping at the top level",)),
    ("section scalar", "tls_server_config: yes\n", ("tls_server_config", "expected a mapping")),
    ("bad hash", "basic_auth_users:\n  alice: hunter2\n", ("basic_auth_users.alice", "not a bcrypt hash")),
    ("md5 hash", "basic_auth_users:\n  alice: $apr1$abc$def\n", ("not a bcrypt hash",)),
    ("short hash", "basic_auth_users:\n  alice: $2y$10$abc\n", ("not a bcrypt hash",)),
    ("bad cost", "basic_auth_users:\n  alice: '$2y$99$" + "a" * 53 + "'\n", ("not a bcrypt hash",)),
    ("hash not string", "basic_auth_users:\n  alice: 12\n", ("basic_auth_users.alice", "not a bcrypt hash")),
    ("hash null", "basic_auth_users:\n  alice:\n", ("not a bcrypt hash",)),
    ("user int", "basic_auth_users:\n  123: $2y$10$abc\n", ("user name 123", "quote")),
    ("users list", "basic_auth_users:\n  - alice\n", ("basic_auth_users", "expected a mapping")),
    ("forbidden header", "http_server_config:\n  headers:\n    Authorization: x\n",
     ("'Authorization'", "cannot be configured")),
    ("content-type header", "http_server_config:\n  headers:\n    Content-Type: text/html\n",
     ("'Content-Type'", "cannot be configured")),
    ("bad frame option", "http_server_config:\n  headers:\n    X-Frame-Options: allowall\n",
     ("X-Frame-Options", "invalid value", "deny")),
    ("bad nosniff", "http_server_config:\n  headers:\n    X-Content-Type-Options: sniff\n",
     ("X-Content-Type-Options", "nosniff")),
    ("header twice", "http_server_config:\n  headers:\n    X-Frame-Options: deny\n    x-frame-options: deny\n",
     ("set twice",)),
    ("header newline", "http_server_config:\n  headers:\n    X-XSS-Protection: \"1\\r\\nSet-Cookie: a\"\n",
     ("line break",)),
    ("header int", "http_server_config:\n  headers:\n    X-XSS-Protection: 1\n", ("expected a string",)),
    ("headers list", "http_server_config:\n  headers: [a]\n", ("headers", "expected a mapping")),
    ("http2 string", "http_server_config:\n  http2: 'yes'\n", ("http_server_config.http2", "true or false")),
    ("bad min version", "tls_server_config:\n  min_version: TLS1.2\n", ("min_version", "unknown TLS version", "TLS12")),
    ("bad max version", "tls_server_config:\n  max_version: SSL3\n", ("max_version", "unknown TLS version")),
    ("min above max", "tls_server_config:\n  min_version: TLS13\n  max_version: TLS12\n", ("above",)),
    ("version int", "tls_server_config:\n  min_version: 12\n", ("min_version", "expected a string")),
    ("unknown cipher", "tls_server_config:\n  cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256]\n",
     ("cipher_suites", "ECDHE-RSA-AES128-GCM-SHA256")),
    ("insecure cipher", "tls_server_config:\n  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
     ("unknown or insecure cipher suite",)),
    ("ciphers not list", "tls_server_config:\n  cipher_suites: TLS_AES_128_GCM_SHA256\n", ("expected a list",)),
    ("unknown curve", "tls_server_config:\n  curve_preferences: [P256]\n", ("unknown curve", "CurveP256")),
    ("two curves", "tls_server_config:\n  curve_preferences: [X25519, CurveP256]\n", ("one curve",)),
    ("prefer string", "tls_server_config:\n  prefer_server_cipher_suites: 'no'\n", ("true or false",)),
    ("missing cert", "tls_server_config:\n  key_file: {key}\n", ("missing one of cert or cert_file",)),
    ("missing key", "tls_server_config:\n  cert_file: {cert}\n", ("missing one of key or key_file",)),
    ("auth type alone", "tls_server_config:\n  client_auth_type: NoClientCert\n", ("missing one of cert",)),
    ("cert file absent", "tls_server_config:\n  cert_file: nope.crt\n  key_file: {key}\n",
     ("cert_file", "cannot read", "nope.crt", "No such file")),
    ("key file absent", "tls_server_config:\n  cert_file: {cert}\n  key_file: /nonexistent/k.pem\n",
     ("key_file", "cannot read", "/nonexistent/k.pem")),
    ("cert is a dir", "tls_server_config:\n  cert_file: {dir}\n  key_file: {key}\n", ("cannot read", "directory")),
    ("cert endless", "tls_server_config:\n  cert_file: /dev/zero\n  key_file: {key}\n", ("cert_file", "larger than")),
    ("key mismatch", "tls_server_config:\n  cert_file: {cert}\n  key_file: {other_key}\n", ("does not match",)),
    ("cert not pem", "tls_server_config:\n  cert_file: {key}\n  key_file: {key}\n", ("no PEM certificate",)),
    ("key not pem", "tls_server_config:\n  cert_file: {cert}\n  key_file: {cert}\n", ("no PEM private key",)),
    ("encrypted key", "tls_server_config:\n  cert_file: {cert}\n  key_file: {encrypted_key}\n",
     ("encrypted", "passphrase")),
    ("both cert and cert_file", "tls_server_config:\n  cert: x\n  cert_file: {cert}\n  key_file: {key}\n",
     ("either cert or cert_file",)),
    ("unknown auth type", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_auth_type: Always\n",
     ("client_auth_type", "'Always'", "RequireAndVerifyClientCert")),
    ("require any", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAnyClientCert\n",
     ("RequireAnyClientCert", "cannot be honoured")),
    ("ca without auth", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {ca}\n",
     ("client_ca_file", "NoClientCert")),
    ("ca absent", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: ca-nope.crt\n"
     "  client_auth_type: RequireAndVerifyClientCert\n", ("client_ca_file", "cannot read", "ca-nope.crt")),
    ("ca not pem", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n", ("client_ca_file", "no PEM certificate")),
    ("sans without verify", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_allowed_sans: [a]\n", ("client_allowed_sans", "verified client certificate")),
    ("sans empty", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_allowed_sans: []\n"
     "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca}\n", ("client_allowed_sans", "empty")),
    ("only tls13 ciphers", "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", ("only TLS 1.3 suites",)),
    ("bad duration", "rate_limit:\n  interval: soon\n  burst: 1\n", ("rate_limit.interval", "expected a duration")),
    ("negative duration", "rate_limit:\n  interval: -1s\n  burst: 1\n", ("must not be negative",)),
    ("float duration", "rate_limit:\n  interval: 1.5\n  burst: 1\n", ("rate_limit.interval", "duration")),
    ("zero burst", "rate_limit:\n  interval: 1s\n", ("rate_limit.burst", "at least 1")),
    ("burst string", "rate_limit:\n  interval: 1s\n  burst: many\n", ("rate_limit.burst", "whole number")),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config(pki: PKI, tmp_path: Path, text: str, expected: tuple[str, ...]) -> None:
    values = {
        "cert": pki.server_cert,
        "key": pki.server_key,
        "other_key": pki.client_key,
        "encrypted_key": pki.encrypted_key,
        "ca": pki.ca,
        "dir": pki.dir,
    }
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    path = write_config(tmp_path, text)
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    message = str(info.value)
    assert message.startswith(path + ": ")
    assert "\n" not in message
    for word in expected:
        assert word in message, message
    assert "$2" not in message.replace("$2y$10$", "")  # never echo a configured hash


def test_every_problem_of_the_file_is_listed(tmp_path: Path) -> None:
    """One line per problem, every section, in one load (a bad value is not also called missing)."""
    path = write_config(tmp_path, """\
        basic_auth_user: {a: b}
        tls_server_config:
          certfile: x
          min_version: TLS1.2
          cert_file: 12
        http_server_config:
          headers: {Authorization: x, X-Frame-Options: allowall}
        basic_auth_users:
          alice: hunter2
          bob: $2y$10$abc
        rate_limit: {interval: soon, burst: many}
        """)
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    not_bcrypt = ("the password is not a bcrypt hash (expected something like $2y$10$ followed by 53 characters, "
                  "as printed by htpasswd -nBC 10 \"\" | tr -d ':\\n')")  # fmt: skip
    assert info.value.problems == [f"{path}: {line}" for line in [
        "unknown key 'basic_auth_user' (did you mean 'basic_auth_users'?); allowed here: tls_server_config, "
        "http_server_config, basic_auth_users, rate_limit",
        "unknown key 'tls_server_config.certfile' (did you mean 'cert_file'?); allowed here: cert, key, client_ca, "
        "cert_file, key_file, client_auth_type, client_ca_file, cipher_suites, curve_preferences, min_version, "
        "max_version, prefer_server_cipher_suites, client_allowed_sans",
        "tls_server_config.min_version: unknown TLS version 'TLS1.2'; expected one of TLS10, TLS11, TLS12, TLS13",
        "tls_server_config.cert_file: expected a string, got a number",
        "http_server_config.headers: HTTP header 'Authorization' cannot be configured; allowed: "
        "Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, X-XSS-Protection, Content-Security-Policy",
        "http_server_config.headers.X-Frame-Options: invalid value 'allowall'; expected one of deny, sameorigin",
        f"basic_auth_users.alice: {not_bcrypt}",
        f"basic_auth_users.bob: {not_bcrypt}",
        "rate_limit.interval: expected a duration like 15s, 1m30s or 500ms, got 'soon'",
        "rate_limit.burst: expected a whole number, got a string",
    ]]  # fmt: skip
    assert str(info.value) == "; ".join(info.value.problems)


@pytest.mark.parametrize("target", ["missing", "directory", "unreadable", "not-utf8"])
def test_bad_config_file_itself(tmp_path: Path, target: str) -> None:
    path = tmp_path / "web.yml"
    if target == "directory":
        path.mkdir()
    elif target == "unreadable":
        path.write_text("{}\n")
        path.chmod(0)
        if os.access(path, os.R_OK):
            pytest.skip("running as root: the file stays readable")
    elif target == "not-utf8":
        path.write_bytes(b"basic_auth_users:\n  \xff\xfe: x\n")
    with pytest.raises(WebConfigError) as info:
        load_web_config(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert {"missing": "No such file", "directory": "directory", "unreadable": "Permission denied",
            "not-utf8": "malformed YAML"}[target] in message  # fmt: skip


def test_ssl_context_reports_files_gone_after_load(pki: PKI, tmp_path: Path) -> None:
    cert = tmp_path / "tls.crt"
    shutil.copy(pki.server_cert, cert)
    cfg = load_web_config(
        write_config(tmp_path, {"tls_server_config": {"cert_file": "tls.crt", "key_file": str(pki.server_key)}})
    )
    cert.unlink()
    with pytest.raises(WebConfigError, match=r"cert_file: cannot read .*tls\.crt"):
        cfg.ssl_context()


def test_every_documented_name_is_accepted(pki: PKI, tmp_path: Path) -> None:
    for version in ("TLS10", "TLS11", "TLS12", "TLS13"):
        cfg = load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki, min_version=version)}))
        assert cfg.ssl_context() is not None
    for name in CIPHER_SUITES:
        suites = [name, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]
        load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki, cipher_suites=suites)}))
    for curve in CURVES:
        load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki, curve_preferences=[curve])}))
    for auth_type, mode in CLIENT_AUTH_TYPES.items():
        tls = tls_section(pki, client_auth_type=auth_type)
        if mode not in (None, ssl.CERT_NONE):
            tls["client_ca_file"] = str(pki.ca)
        path = write_config(tmp_path, {"tls_server_config": tls})
        if mode is None:
            with pytest.raises(WebConfigError, match="cannot be honoured"):
                load_web_config(path)
        else:
            ctx = load_web_config(path).ssl_context()
            assert ctx is not None and ctx.verify_mode == mode
    headers = {name: (allowed[0] if allowed else "x") for name, allowed in ALLOWED_HEADERS.items()}
    cfg = load_web_config(write_config(tmp_path, {"http_server_config": {"headers": headers, "http2": False}}))
    assert dict(cfg.headers) == headers and not cfg.http2
    # The toolkit's own sample file, with its certificate files next to it.
    shutil.copy(pki.server_cert, tmp_path / "server.crt")
    shutil.copy(pki.server_key, tmp_path / "server.key")
    sample = """\
        tls_server_config:
          cert_file: server.crt
          key_file: server.key
        basic_auth_users:
          alice: $2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze
          bob: $2y$10$hLqFl9jSjoAAy95Z/zw8Ye8wkdMBM8c5Bn1ptYqP/AXyV0.oy0S8m
        rate_limit:
          interval: "1s"
          burst: 20
        """
    cfg = load_web_config(write_config(tmp_path, sample))
    assert cfg.auth_enabled and cfg.tls_enabled and cfg.rate_limit is not None


# --------------------------------------------------------------------------------------------------------
# Whatever the file holds, the only exception is WebConfigError


_KEYS = [
    "tls_server_config", "http_server_config", "basic_auth_users", "rate_limit", "cert", "key", "client_ca",
    "cert_file", "key_file", "client_auth_type", "client_ca_file", "cipher_suites", "curve_preferences",
    "min_version", "max_version", "prefer_server_cipher_suites", "client_allowed_sans", "http2", "headers",
    "interval", "burst", "X-Frame-Options", "Content-Security-Policy", "alice",
]  # fmt: skip
_WORDS = [
    "TLS12", "TLS13", "TLS10", "RequireAndVerifyClientCert", "NoClientCert", "VerifyClientCertIfGiven",
    "X25519", "TLS_AES_128_GCM_SHA256", "deny", "nosniff", "1s", "0", "-1s", "1.5h", "$2y$04$",
    "$2b$04$" + "a" * 53, "/dev/null", ".", "", "web.yml", "\u00e9\u0000",
]  # fmt: skip

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.sampled_from(_WORDS),
    st.text(max_size=20),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=8), st.integers()), children, max_size=5),
    ),
    max_leaves=25,
)
_documents = st.dictionaries(st.sampled_from(_KEYS[:4]) | st.text(max_size=10), _values, max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_documents)
def test_random_mappings_only_ever_raise_web_config_error(doc: dict[Any, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "web.yml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, allow_unicode=True)
        try:
            cfg = load_web_config(path)
        except WebConfigError as exc:
            assert str(exc).startswith(path) and "\n" not in str(exc)
        else:
            cfg.ssl_context()
            cfg.middleware()


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"%@` \n\tab1$#,?")), max_size=60))
def test_random_yaml_text_only_ever_raises_web_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "web.yml")
        with open(path, "w") as f:
            f.write(text)
        try:
            load_web_config(path)
        except WebConfigError as exc:
            assert "\n" not in str(exc)
