"""The parsed web configuration's parts, and its errors."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from immich_thumbnail_exporter.exposition.webconfig.names import CIPHER_SUITES, CLIENT_AUTH_TYPES


class WebConfigError(Exception):
    """Problems with the web configuration file; ``problems`` holds one line each, naming the file."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Problem(Exception):
    """One problem, without the file name (added where the file is known)."""


def error(path: str | None, problems: list[str]) -> WebConfigError:
    """The error for ``problems`` found in the file at ``path``, each problem on one line."""
    lines = [" ".join(p.split()) for p in problems]  # one line, whatever the cause said
    return WebConfigError([f"{path}: {line}" if path else line for line in lines])


@dataclass(frozen=True)
class TLSServerConfig:
    """``tls_server_config``, validated and with file paths made absolute."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    client_ca: str | None = field(default=None, repr=False)
    client_auth_type: str = "NoClientCert"
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    cipher_suites: tuple[str, ...] = ()  # Go names, as written
    curve_preferences: tuple[str, ...] = ()  # Go names, as written
    prefer_server_cipher_suites: bool = True
    client_allowed_sans: tuple[str, ...] | None = None

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        assert mode is not None  # refused at load time
        return mode

    @property
    def openssl_ciphers(self) -> tuple[str, ...]:
        """The TLS <= 1.2 suites of ``cipher_suites`` in OpenSSL spelling (TLS 1.3 ones left out)."""
        return tuple(n for n in (CIPHER_SUITES[c] for c in self.cipher_suites) if n is not None)

    @property
    def watched_files(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


@dataclass(frozen=True)
class RateLimit:
    """``rate_limit``: a token bucket refilled with one request every ``interval`` seconds."""

    interval: float
    burst: int
