"""Domain errors, raised where a problem is detected and mapped to gRPC status codes in one place.

Each class names the gRPC status it becomes (`moemesh.rpc.map_errors` does the mapping), so that
clients can tell bad input from an overloaded or broken server. The way back is here too: `from_status` and
`from_rpc_error` turn a peer's status into the same classes, which the Python client (`moemesh.client`) raises.
"""

import grpc


class MoemeshError(Exception):
    """Base class; `code` is the gRPC status the error is reported with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(MoemeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class PermissionDenied(MoemeshError):
    """The caller may not do this (e.g. send system messages)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(MoemeshError):
    code = grpc.StatusCode.NOT_FOUND


class Aborted(MoemeshError):
    """A concurrent operation got there first (another turn of the same session)."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(MoemeshError):
    """`retry_after_ms`, when known, also goes to the client as `retry-after-ms` trailing metadata."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    @property
    def retry_after_s(self) -> float | None:
        """The server's `retry-after-ms` in seconds; None when it did not say."""
        return None if self.retry_after_ms is None else self.retry_after_ms / 1000


class Unauthenticated(MoemeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(MoemeshError):
    code = grpc.StatusCode.UNAVAILABLE


class PeerUnreachable(Unavailable):
    """A peer's stream broke (it died, hung past keepalive, or ended the stream): its calls may be resent."""


class DeadlineExceeded(MoemeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(MoemeshError):
    code = grpc.StatusCode.CANCELLED


class CheckpointError(MoemeshError):
    """A checkpoint that cannot be served: missing or mis-shaped tensor, unsupported model type."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConfigError(MoemeshError):
    """A setting or file the service was started with cannot be used (a certificate, a key file, a rules file)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE: dict[grpc.StatusCode, type[MoemeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        PermissionDenied,
        NotFound,
        Aborted,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
    )
}


def from_status(code: grpc.StatusCode, message: str) -> MoemeshError:
    """The domain error for a status a peer answered with, so it keeps its code on the way back."""
    error = _BY_CODE.get(code, MoemeshError)(message)
    error.code = code
    return error


def from_rpc_error(exc: grpc.RpcError) -> MoemeshError:
    """The domain error for a failed call (sync or asyncio), with the `retry-after-ms` trailing metadata of a
    RESOURCE_EXHAUSTED; the gRPC error stays its `__cause__`."""
    code = exc.code()
    message = exc.details() or code.name
    error = from_status(code, message)
    if isinstance(error, ResourceExhausted):
        value = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
        error.retry_after_ms = int(value) if value and str(value).isdigit() else None
    error.__cause__ = exc
    return error


def status_code(number: int) -> grpc.StatusCode:
    """`grpc.StatusCode` from its wire number (UNKNOWN for numbers gRPC does not define)."""
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)
