"""What both clients connect with: the channel's credentials and options, and the API key's metadata."""

from dataclasses import dataclass
from pathlib import Path

import grpc

from moemesh.rpc import CHANNEL_OPTIONS
from moemesh.tls import Tls

# gRPC backs off reconnecting to a peer that refused it up to 2 minutes by default, failing calls at once
# meanwhile; a restarted gateway is reached again within a second instead, while the retries wait.
CLIENT_CHANNEL_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class Connection:
    """A gateway's address and how to talk to it: `api_key` is sent as `authorization: Bearer <key>`; TLS when
    `tls` or any TLS file is given, verifying the gateway against `tls_ca` (else the system's CAs), presenting
    `tls_cert` (with `tls_key`) when the gateway asks for a client certificate."""

    address: str
    api_key: str | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None: plaintext. The files are read (and checked) once, here, so a wrong path fails at once."""
        if not (self.tls or self.tls_ca or self.tls_cert):
            return None
        return Tls.load(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca).channel_credentials(system_roots=True)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
