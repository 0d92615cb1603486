"""The TCP protocol spoken to a sidecar: small JSON control frames, and raw tensor bytes behind a
fixed binary header.

Nothing received is ever unpickled. A control frame is a fixed header (magic, version, status, body
length) followed by at most 64 KiB of JSON that a pydantic model validates. A tensor travels as a
fixed header (magic, version, dtype code, ndim, nbytes, xxh3-64 checksum, then ndim dimensions)
followed by exactly `nbytes` raw bytes, sent from and received into shared memory in large chunks
with no intermediate copy. A check that fails raises `ProtocolError` naming what was wrong, so the
sidecar drops that one connection and keeps serving the others.
"""

from __future__ import annotations

import math
import socket
import struct
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

import xxhash
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..task.tensor_ref import DTYPE_ITEMSIZE, TensorRef
from .errors import ProtocolError, SidecarError, error_from_code

MAGIC_REQUEST = b"CSRQ"
MAGIC_REPLY = b"CSRP"
MAGIC_TENSOR = b"CSTN"
VERSION = 3  # 2: `alloc` reserves room for a list of tensors; 3: `alloc` carries pins, ttl and max_pinned
ENV_TOKEN = "CORNSERVE_SIDECAR_TOKEN"  # the optional shared secret of all sidecars and their clients
MAX_BODY = 64 * 1024
MAX_NDIM = 32
CHUNK = 8 << 20  # bytes per send/recv call on the data path

FRAME = struct.Struct("!4sBBI")  # magic, version, status (0 = ok, else an error code), body length
TENSOR = struct.Struct("!4sBBBxQQ")  # magic, version, dtype code, ndim, pad, nbytes, checksum
DIM = struct.Struct("!Q")

#: Wire code of each allowed dtype. Codes are part of the protocol since version 1: never renumber them.
DTYPE_CODES: dict[str, int] = {
    "bool": 1, "uint8": 2, "int8": 3, "int16": 4, "int32": 5, "int64": 6,
    "float16": 7, "bfloat16": 8, "float32": 9, "float64": 10,
}  # fmt: skip
_DTYPE_BY_CODE = {code: name for name, code in DTYPE_CODES.items()}
if set(DTYPE_CODES) != set(DTYPE_ITEMSIZE):
    raise RuntimeError(f"wire dtype codes {sorted(DTYPE_CODES)} disagree with the allow-list {sorted(DTYPE_ITEMSIZE)}")

#: A tensor id, constrained exactly as `TensorRef.id` is.
TensorId = Annotated[str, *TensorRef.model_fields["id"].metadata]


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly, between two frames."""


# --- control frames -------------------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Request(_Message):
    token: str = ""


class ReadRequest(_Request):
    """Sidecar to sidecar: send me the bytes of a tensor you hold."""

    op: Literal["read"] = "read"
    id: TensorId


#: tensors one `alloc` may reserve (so a request stays well under MAX_BODY)
MAX_ALLOC = 128


class AllocRequest(_Request):
    """Client to its sidecar: reserve room for these tensors (the client then writes and publishes
    them); all of them or none. `pins`: releases expected before they become CACHED; `ttl`: seconds
    they stay CACHED; `max_pinned`: seconds after which they are freed even if still PINNED."""

    op: Literal["alloc"] = "alloc"
    refs: list[TensorRef] = Field(min_length=1, max_length=MAX_ALLOC)
    pins: int = Field(ge=0)
    ttl: float = Field(ge=0, allow_inf_nan=False)
    max_pinned: float = Field(gt=0, allow_inf_nan=False)
    timeout: float = Field(ge=0)


class FetchRequest(_Request):
    """Client to its sidecar: copy a tensor held by another sidecar into your memory."""

    op: Literal["fetch"] = "fetch"
    id: TensorId
    timeout: float = Field(ge=0)


class StatsRequest(_Request):
    """Anyone: how much memory is in use."""

    op: Literal["stats"] = "stats"


Request = Annotated[ReadRequest | AllocRequest | FetchRequest | StatsRequest, Field(discriminator="op")]
_REQUEST = TypeAdapter(Request)


class Placement(_Message):
    """Where in a sidecar's arena a tensor's bytes are, under which directory key."""

    key: str
    arena: str
    offset: int = Field(ge=0)


class Placements(_Message):
    """The reply to `alloc`: one placement per tensor, in order."""

    placements: list[Placement]


class Stats(_Message):
    """A sidecar's memory use, in bytes (extents, page-aligned), its tensors by state, how many
    puts wait for room now and how many ever waited, and its evictions by reason (lru, ttl, orphan)."""

    sidecar: str
    capacity: int
    used: int
    tensors: int
    pinned: int
    pinned_bytes: int
    cached: int
    cached_bytes: int
    waiting: int
    waits: int
    evictions: dict[str, int]
    high_water: int


class Empty(_Message):
    """The reply that precedes a tensor stream."""


class _ErrorBody(_Message):
    error: str


Reply = TypeVar("Reply", bound=_Message)


def send_request(sock: socket.socket, request: _Request) -> None:
    _send_frame(sock, MAGIC_REQUEST, 0, request.model_dump_json().encode())


def recv_request(sock: socket.socket, io_timeout: float) -> Request:
    """The next request; waits for it without limit, then for the rest of it up to `io_timeout`."""
    _, body = _recv_frame(sock, MAGIC_REQUEST, idle_timeout=None, io_timeout=io_timeout)
    try:
        return _REQUEST.validate_json(body)
    except ValidationError as e:
        raise ProtocolError(f"invalid request: {_first_error(e)}") from None


def send_reply(sock: socket.socket, reply: _Message) -> None:
    _send_frame(sock, MAGIC_REPLY, 0, reply.model_dump_json().encode())


def send_error(sock: socket.socket, error: SidecarError) -> None:
    _send_frame(sock, MAGIC_REPLY, error.code, _ErrorBody(error=str(error)).model_dump_json().encode())


def recv_reply(sock: socket.socket, model: type[Reply], timeout: float | None) -> Reply:
    """The reply to a request, validated as `model`; an error reply is raised as its exception class."""
    status, body = _recv_frame(sock, MAGIC_REPLY, idle_timeout=timeout, io_timeout=timeout)
    try:
        if status:
            raise error_from_code(status, _ErrorBody.model_validate_json(body).error)
        return model.model_validate_json(body)
    except ValidationError as e:
        raise ProtocolError(f"invalid {'error' if status else model.__name__} reply: {_first_error(e)}") from None


def _send_frame(sock: socket.socket, magic: bytes, status: int, body: bytes) -> None:
    sock.sendall(FRAME.pack(magic, VERSION, status, len(body)) + body)


def _recv_frame(sock: socket.socket, magic: bytes, idle_timeout: float | None, io_timeout: float | None) -> tuple[int, bytes]:
    sock.settimeout(idle_timeout)
    first = sock.recv(FRAME.size)
    if not first:
        raise ConnectionClosed
    sock.settimeout(io_timeout)
    raw = first + recv_exact(sock, FRAME.size - len(first), "frame header")
    got_magic, version, status, length = FRAME.unpack(raw)
    _check_magic_and_version(got_magic, magic, version)
    if length > MAX_BODY:
        raise ProtocolError(f"frame body of {length} bytes exceeds the limit of {MAX_BODY}")
    return status, recv_exact(sock, length, "frame body")


def _check_magic_and_version(got: bytes, expected: bytes, version: int) -> None:
    if got != expected:
        raise ProtocolError(f"bad magic {got!r}, expected {expected!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}; this sidecar speaks version {VERSION}")


def _first_error(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ProtocolError(f"truncated {what}: connection closed after {got} of {n} bytes")
        got += k
    return bytes(buffer)


# --- tensor stream --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorHeader:
    """What precedes a tensor's raw bytes on the wire."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int

    def encode(self) -> bytes:
        if len(self.shape) > MAX_NDIM:
            raise ValueError(f"shape {self.shape} has more than {MAX_NDIM} dimensions")
        fixed = TENSOR.pack(MAGIC_TENSOR, VERSION, DTYPE_CODES[self.dtype], len(self.shape), self.nbytes, self.checksum)
        return fixed + b"".join(DIM.pack(d) for d in self.shape)


def recv_tensor_header(sock: socket.socket) -> TensorHeader:
    """Read and validate a tensor header; the payload it announces is not read yet."""
    magic, version, code, ndim, nbytes, checksum = TENSOR.unpack(recv_exact(sock, TENSOR.size, "tensor header"))
    _check_magic_and_version(magic, MAGIC_TENSOR, version)
    dtype = _DTYPE_BY_CODE.get(code)
    if dtype is None:
        raise ProtocolError(f"unknown dtype code {code}; allowed codes: {DTYPE_CODES}")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"{ndim} dimensions exceed the limit of {MAX_NDIM}")
    dims = recv_exact(sock, ndim * DIM.size, "tensor shape")
    shape = tuple(DIM.unpack_from(dims, i * DIM.size)[0] for i in range(ndim))
    expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    if nbytes != expected:
        raise ProtocolError(f"header says {nbytes} bytes, but shape {shape} of {dtype} is {expected} bytes")
    return TensorHeader(dtype, shape, nbytes, checksum)


def checksum(data: memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


def send_tensor(sock: socket.socket, header: TensorHeader, payload: memoryview) -> None:
    sock.sendall(header.encode())
    for start in range(0, len(payload), CHUNK):
        sock.sendall(payload[start : start + CHUNK])


def recv_tensor_payload(sock: socket.socket, into: memoryview, expected_checksum: int) -> None:
    """Receive exactly `len(into)` bytes into `into`, hashing each chunk while it is still in cache."""
    hasher = xxhash.xxh3_64()
    n, got = len(into), 0
    while got < n:
        k = sock.recv_into(into[got:], min(CHUNK, n - got))
        if k == 0:
            raise ProtocolError(f"truncated tensor stream: connection closed after {got} of {n} bytes")
        hasher.update(into[got : got + k])
        got += k
    if hasher.intdigest() != expected_checksum:
        raise ProtocolError(f"checksum mismatch: header says {expected_checksum:016x}, bytes hash to {hasher.intdigest():016x}")
