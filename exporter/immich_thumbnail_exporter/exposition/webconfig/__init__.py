"""``--web.config.file``: TLS, basic auth, extra headers and rate limiting for the HTTP server.

The file format is the one of the Prometheus exporter-toolkit (``docs/web-configuration.md``), so that a
``web-config.yml`` written for node_exporter works here too::

    tls_server_config:
      cert_file: server.crt           # relative paths resolve against this file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
      min_version: TLS12              # the default
    http_server_config:
      headers:
        X-Frame-Options: deny
    basic_auth_users:
      prometheus: $2y$10$...          # bcrypt, e.g. ``htpasswd -nBC 10 "" | tr -d ':\\n'``
    rate_limit:
      interval: 1s
      burst: 20

Where Python's ``ssl`` module cannot do what Go's ``crypto/tls`` does, the file is refused with a message
saying so rather than served with a silently different policy:

* ``client_auth_type: RequireAnyClientCert`` (and its old name ``RequireClientCert``): OpenSSL through
  Python cannot require a client certificate without verifying it.
* ``curve_preferences`` with more than one curve: Python can restrict the key exchange to one curve only.
* ``client_allowed_sans`` needs a verified client certificate, so it needs ``VerifyClientCertIfGiven`` or
  ``RequireAndVerifyClientCert``; the check runs on each request (403) rather than in the handshake.

Mapped rather than refused: ``RequestClientCert`` (Go asks for a certificate and never checks it) serves
without asking; TLS 1.3 names in ``cipher_suites`` are accepted and ignored, as Go ignores them;
``http2`` is accepted but aiohttp only speaks HTTP/1.1; ``min_version`` below TLS12 also lowers OpenSSL's
security level to 0, because OpenSSL 3 refuses TLS 1.0 and 1.1 otherwise.

Certificates, keys and the client CA file are re-read when they change on disk (checked at each
handshake), so a rotated certificate is served without a restart, as with the toolkit. The rest of the
file is read once, at start.

One module per job: ``names`` (the format's vocabulary), ``parts`` (the parsed parts, errors), ``load``
(the file, every problem listed at once, read with ``config.strict_yaml``), ``tls`` (contexts and their
reload), ``auth`` (bcrypt basic auth), ``middleware`` (all of it applied to requests, the rate limit with
``timing.RateLimiter``), ``config`` (``WebConfig``).
"""

from immich_thumbnail_exporter.exposition.webconfig.auth import DEFAULT_AUTH_TIMEOUT
from immich_thumbnail_exporter.exposition.webconfig.config import WebConfig
from immich_thumbnail_exporter.exposition.webconfig.load import load_web_config
from immich_thumbnail_exporter.exposition.webconfig.names import (
    ALLOWED_HEADERS,
    CIPHER_SUITES,
    CLIENT_AUTH_TYPES,
    CURVES,
    TLS_VERSIONS,
)
from immich_thumbnail_exporter.exposition.webconfig.parts import RateLimit, TLSServerConfig, WebConfigError

__all__ = [
    "ALLOWED_HEADERS",
    "CIPHER_SUITES",
    "CLIENT_AUTH_TYPES",
    "CURVES",
    "DEFAULT_AUTH_TIMEOUT",
    "TLS_VERSIONS",
    "RateLimit",
    "TLSServerConfig",
    "WebConfig",
    "WebConfigError",
    "load_web_config",
]
