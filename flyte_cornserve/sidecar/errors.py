"""What can go wrong with a tensor, as exception classes that survive the trip over the wire.

A sidecar answers a failed request with the error's numeric code and message; the client raises
the same class again, so an executor sees `MemoryCapExceeded` whether the cap was hit locally or
by the consumer's sidecar while it fetched a copy.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base class; also used for failures that need no class of their own."""

    code = 1


class ProtocolError(SidecarError):
    """Bytes on a sidecar connection that do not follow the wire protocol."""

    code = 2


class AuthenticationError(ProtocolError):
    """A request without the shared token that the sidecar was configured with."""

    code = 3


class TensorNotFound(SidecarError):
    """The tensor is not (or no longer) in the directory: evicted from the cache, expired, or its holder restarted."""

    code = 4


class TensorNotReady(SidecarError, TimeoutError):
    """The tensor was not written within the consumer's timeout."""

    code = 5


class ProducerSidecarDead(SidecarError):
    """The sidecar holding the tensor stopped heartbeating or cannot be reached; the tensor is lost."""

    code = 6


class MemoryCapExceeded(SidecarError):
    """No room under the sidecar's memory cap within the caller's timeout."""

    code = 7


class SidecarUnavailable(SidecarError, ConnectionError):
    """The client cannot reach its local sidecar."""

    code = 8


class TensorIdTaken(SidecarError):
    """A put under an id that a live tensor already has. For a content-addressed id, the tensor is
    the one the put would have made: a producer that raced another one for it."""

    code = 9


_BY_CODE = {cls.code: cls for cls in (
    SidecarError, ProtocolError, AuthenticationError, TensorNotFound, TensorNotReady,
    ProducerSidecarDead, MemoryCapExceeded, SidecarUnavailable, TensorIdTaken,
)}  # fmt: skip


def error_from_code(code: int, message: str) -> SidecarError:
    """The exception a sidecar reported with `code`; unknown codes become a plain `SidecarError`."""
    return _BY_CODE.get(code, SidecarError)(message)
