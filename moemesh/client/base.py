"""What the sync and the asyncio client share: their settings, and the attempts of each call."""

from pathlib import Path

from moemesh.client.connection import CLIENT_CHANNEL_OPTIONS, Connection
from moemesh.client.retry import DEFAULT_RETRY, Attempts, RetryPolicy


class ClientBase:
    """`address`: the gateway's host:port. `timeout_s`: each call's deadline, retries included (None: none),
    unless the call names its own. `retry`: see `RetryPolicy` (`NO_RETRY` to see every error at once). The
    TLS files and `api_key`: see `Connection`. Sampling keywords of the calls are the fields of `Sampling`
    (max_new_tokens, temperature, top_p, top_k, seed, stop, return_logprobs, ignore_eos)."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: Path | str | None = None,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        timeout_s: float | None = 120.0,
        retry: RetryPolicy = DEFAULT_RETRY,
    ):
        def path(value: Path | str | None) -> Path | None:
            return None if value is None else Path(value)

        self.connection = Connection(address, api_key, tls, path(tls_ca), path(tls_cert), path(tls_key))
        self.timeout_s, self.retry = timeout_s, retry
        self._credentials = self.connection.credentials()
        self._options = CLIENT_CHANNEL_OPTIONS

    def _attempts(self, timeout_s: float | None) -> Attempts:
        return Attempts(self.retry, self.timeout_s if timeout_s is None else timeout_s)
