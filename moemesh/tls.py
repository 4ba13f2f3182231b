"""TLS: every gRPC port, gRPC channel and Redis client of moemesh is made here.

A service has at most one certificate (and its key), which it serves its port with and presents as a client,
and the CA of the internal services:

- the gateway's port serves TLS once it has a certificate; its clients need none of their own;
- router and expert ports serve mutual TLS: a client must present a certificate the CA signed;
- internal channels (gateway -> router, router -> expert) use TLS once a CA is configured: they verify the
  server against it (the certificate's SANs must cover the address dialled, `127.0.0.1` included) and
  present the service's certificate; without a CA they are plaintext;
- a `rediss://` URL verifies Redis against the CA (and the system's CAs) and presents the certificate (for
  Redis's `tls-auth-clients`).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import redis
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from moemesh.errors import ConfigError


@dataclass(frozen=True)
class Tls:
    """One service's TLS files: paths (Redis opens them itself) and their contents, read and checked once at
    start, so that a missing or wrong file fails the start with its name rather than each connection later
    (gRPC reports a bad certificate as "Failed to bind", or as an unreachable peer)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    _pem: dict[Path, bytes] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> "Tls":
        files = {setting: path for setting, path in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)) if path}
        read = {setting: _read_pem(setting, path) for setting, path in files.items()}
        if cert and key and not _is_key_of(read["tls_key"][1], read["tls_cert"][1]):
            raise ConfigError(f"tls_key: {key} is not the private key of tls_cert {cert}")
        return cls(cert, key, ca, {files[setting]: data for setting, (data, _) in read.items()})

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials | None:
        """TLS for a port with the certificate (None: plaintext); `require_client_auth` (internal ports) also
        asks each client for a certificate that the CA signed."""
        if self.cert is None:
            return None
        pairs = [(self._pem[self.key], self._pem[self.cert])]
        if not require_client_auth:
            return grpc.ssl_server_credentials(pairs)
        return grpc.ssl_server_credentials(pairs, root_certificates=self._pem[self.ca], require_client_auth=True)

    def channel_credentials(self, system_roots: bool = False) -> grpc.ChannelCredentials | None:
        """TLS for channels once a CA is configured (None: plaintext): the server is verified against the CA,
        and the certificate, if any, presented. `system_roots`: TLS without a CA too, verifying the server
        against the system's CAs (a client of a gateway with a public certificate)."""
        if self.ca is None and not system_roots:
            return None
        ca = None if self.ca is None else self._pem[self.ca]
        cert = None if self.cert is None else self._pem[self.cert]
        key = None if self.key is None else self._pem[self.key]
        return grpc.ssl_channel_credentials(ca, key, cert)

    def redis(self, url: str, **options: Any) -> redis.Redis:
        """A Redis client of `url`; with `rediss://`, TLS verifying Redis against the CA (and the system's CAs,
        which redis-py always loads) and presenting the certificate."""
        if urlsplit(url).scheme == "rediss":
            files = {"ssl_ca_certs": self.ca, "ssl_certfile": self.cert, "ssl_keyfile": self.key}
            options |= {name: str(path) for name, path in files.items() if path is not None}
        return redis.Redis.from_url(url, **options)


PLAINTEXT = Tls()


def open_channel(target: str, credentials: grpc.ChannelCredentials | None, options: list) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def add_port(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Binds `address`; the port bound."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def _is_key_of(key: Any, chain: list[x509.Certificate]) -> bool:
    """Whether `key` is the private key of the chain's first (leaf) certificate."""
    return key.public_key() == chain[0].public_key()


def _read_pem(setting: str, path: Path) -> tuple[bytes, Any]:
    """The file's contents and what they parse to: a private key (tls_key), else a list of certificates."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path} ({exc.strerror})") from None
    if setting == "tls_key":
        kind, parse = "an unencrypted PEM private key", lambda pem: serialization.load_pem_private_key(pem, None)
    else:
        kind, parse = "a PEM certificate (chain)", x509.load_pem_x509_certificates
    try:
        return data, parse(data)
    except (ValueError, TypeError) as exc:  # TypeError: a key that needs a password
        raise ConfigError(f"{setting}: {path} is not {kind} ({exc})") from None
