"""Refusing a port that is already in use, with one line that names it.

Without this a second `moemesh up` on a busy port came up: gRPC servers set SO_REUSEPORT by default, so both
gateways bound the port and the kernel split new connections between two unrelated clusters. Servers now
bind without SO_REUSEPORT (`moemesh.rpc.SERVER_OPTIONS`), and this check turns the refusal into a clear error
before gRPC logs its own. It binds as the servers do, with SO_REUSEADDR: connections of a previous run left in
TIME_WAIT (a restarted router on its fixed port) do not hold the port, a listening socket does.
"""

import errno
import socket

from moemesh.errors import ConfigError


def ensure_free(what: str, host: str, port: int) -> None:
    """ConfigError naming `what`, host and port if something listens there (port 0, any free one: no check)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{what}: cannot resolve host {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, address in dict.fromkeys(infos):  # every address the name has (localhost: two)
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"{what}: port {port} on {host} is already in use (another moemesh up?); "
                        "choose another port, or 0 for a free one"
                    ) from None
                # Any other error (an address family the host lacks) is left to the server's own bind.
