"""The wire protocol in isolation: what is encoded decodes to the same thing; what is malformed is
rejected with an error naming the problem. (Against a live sidecar: test_sidecar_robustness.py.)"""

from __future__ import annotations

import math
import socket
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyte_cornserve.sidecar import wire
from flyte_cornserve.sidecar.errors import MemoryCapExceeded, ProtocolError
from flyte_cornserve.task.tensor_ref import DTYPE_ITEMSIZE, TensorRef


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    b.settimeout(5)
    return a, b


def _header_bytes(*, magic=wire.MAGIC_TENSOR, version=wire.VERSION, code=9, shape=(2, 3), nbytes=24, checksum=0) -> bytes:
    fixed = wire.TENSOR.pack(magic, version, code, len(shape), nbytes, checksum)
    return fixed + b"".join(wire.DIM.pack(d) for d in shape)


def test_every_allowed_dtype_has_a_distinct_wire_code() -> None:
    assert set(wire.DTYPE_CODES) == set(DTYPE_ITEMSIZE)
    assert len(set(wire.DTYPE_CODES.values())) == len(wire.DTYPE_CODES)


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(sorted(DTYPE_ITEMSIZE)), shape=st.lists(st.integers(0, 7), max_size=5).map(tuple), seed=st.integers(0, 2**32 - 1))
def test_tensor_stream_round_trips(dtype: str, shape: tuple[int, ...], seed: int) -> None:
    nbytes = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    payload = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    header = wire.TensorHeader(dtype, shape, nbytes, wire.checksum(memoryview(payload)))
    sender, receiver = _pair()
    with sender, receiver:
        wire.send_tensor(sender, header, memoryview(payload))
        assert wire.recv_tensor_header(receiver) == header
        received = np.zeros(nbytes, dtype=np.uint8)
        wire.recv_tensor_payload(receiver, memoryview(received), header.checksum)
    assert received.tobytes() == payload.tobytes()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_header_bytes(magic=b"HTTP"), "bad magic"),
        (_header_bytes(version=1), "unsupported protocol version 1"),
        (_header_bytes(code=0), "unknown dtype code 0"),
        (_header_bytes(code=200), "unknown dtype code 200"),
        (wire.TENSOR.pack(wire.MAGIC_TENSOR, wire.VERSION, 9, 255, 0, 0), "255 dimensions exceed the limit"),
        (_header_bytes(shape=(2, 3), nbytes=25), r"header says 25 bytes, but shape \(2, 3\) of float32 is 24 bytes"),
        (_header_bytes(shape=(2**62, 4), nbytes=0), "header says 0 bytes"),
        (_header_bytes()[:10], "truncated tensor header"),
        (_header_bytes()[:-3], "truncated tensor shape"),
    ],
)
def test_malformed_tensor_headers_are_rejected(raw: bytes, message: str) -> None:
    sender, receiver = _pair()
    with sender, receiver:
        sender.sendall(raw)
        sender.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match=message):
            wire.recv_tensor_header(receiver)


def test_truncated_payload_and_bad_checksum_are_rejected() -> None:
    data = memoryview(bytes(range(64)))
    sender, receiver = _pair()
    with sender, receiver:
        sender.sendall(data[:40])
        sender.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match="truncated tensor stream: connection closed after 40 of 64 bytes"):
            wire.recv_tensor_payload(receiver, memoryview(bytearray(64)), wire.checksum(data))
    sender, receiver = _pair()
    with sender, receiver:
        sender.sendall(data)
        with pytest.raises(ProtocolError, match="checksum mismatch"):
            wire.recv_tensor_payload(receiver, memoryview(bytearray(64)), wire.checksum(data) ^ 1)


def test_requests_round_trip_and_replies_carry_error_classes() -> None:
    ref = TensorRef(id="x.1", shape=(2, 2), dtype="bfloat16", nbytes=8)
    request = wire.AllocRequest(token="t", refs=[ref], pins=2, ttl=5, max_pinned=60, timeout=1)
    sender, receiver = _pair()
    with sender, receiver:
        wire.send_request(sender, request)
        assert wire.recv_request(receiver, io_timeout=5) == request
        wire.send_error(receiver, MemoryCapExceeded("no room for 8 bytes"))
        with pytest.raises(MemoryCapExceeded, match="no room for 8 bytes"):
            wire.recv_reply(sender, wire.Placement, timeout=5)


def _frame(body: bytes, *, magic=wire.MAGIC_REQUEST, version=wire.VERSION, length: int | None = None) -> bytes:
    return wire.FRAME.pack(magic, version, 0, len(body) if length is None else length) + body


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
        (_frame(b"{}", version=7), "unsupported protocol version 7"),
        (_frame(b"", length=2**31), "exceeds the limit"),
        (_frame(b'{"op": "stats"', length=100), "truncated frame body"),
        (_frame(b"\x80\x03pickle"), "invalid request"),
        (_frame(b'{"op": "delete_everything"}'), "invalid request: body: Input tag 'delete_everything'"),
        (_frame(b'{"op": "read", "id": "../etc/passwd"}'), "invalid request: read.id: String should match pattern"),
        (
            _frame(b'{"op": "alloc", "refs": [{"id": "a", "shape": [2], "dtype": "complex64", "nbytes": 16}], "pins": 1, "ttl": 1, "max_pinned": 9, "timeout": 1}'),
            "dtype 'complex64' is not allowed",
        ),
        (
            _frame(b'{"op": "alloc", "refs": [{"id": "a", "shape": [2], "dtype": "float32", "nbytes": 9}], "pins": 1, "ttl": 1, "max_pinned": 9, "timeout": 1}'),
            "nbytes=9 disagrees with shape",
        ),
        (
            _frame(b'{"op": "alloc", "refs": [{"id": "a", "shape": [2], "dtype": "float32", "nbytes": 8}], "pins": -1, "ttl": 1, "max_pinned": 9, "timeout": 1}'),
            "alloc.pins: Input should be greater than or equal to 0",
        ),
        (
            _frame(b'{"op": "alloc", "refs": [{"id": "a", "shape": [2], "dtype": "float32", "nbytes": 8}], "pins": 0, "ttl": -1, "max_pinned": 9, "timeout": 1}'),
            "alloc.ttl: Input should be greater than or equal to 0",
        ),
        (
            _frame(b'{"op": "alloc", "refs": [{"id": "a", "shape": [2], "dtype": "float32", "nbytes": 8}], "pins": 0, "ttl": 0, "max_pinned": 0, "timeout": 1}'),
            "alloc.max_pinned: Input should be greater than 0",
        ),
        (
            _frame(b'{"op": "alloc", "refs": [{"id": "a", "shape": [2], "dtype": "float32", "nbytes": 8}], "pins": 1, "ttl": 0, "consumers": 1, "max_pinned": 9, "timeout": 1}'),
            "alloc.consumers: Extra inputs are not permitted",
        ),
        (
            _frame(b'{"op": "alloc", "refs": [], "pins": 1, "ttl": 1, "max_pinned": 9, "timeout": 1}'),
            "alloc.refs: List should have at least 1 item",
        ),
    ],
)
def test_malformed_requests_are_rejected(raw: bytes, message: str) -> None:
    sender, receiver = _pair()
    with sender, receiver:
        sender.sendall(raw)
        sender.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match=message):
            wire.recv_request(receiver, io_timeout=5)


def test_clean_close_between_requests_is_not_an_error() -> None:
    sender, receiver = _pair()
    with receiver:
        sender.close()
        with pytest.raises(wire.ConnectionClosed):
            wire.recv_request(receiver, io_timeout=5)


def test_header_struct_layout_is_stable() -> None:
    """The tensor header, unchanged since version 1 of the protocol: 4-byte magic, version, dtype code, ndim, pad, nbytes, checksum."""
    assert wire.TENSOR.size == 4 + 1 + 1 + 1 + 1 + 8 + 8
    assert struct.unpack("!Q", _header_bytes(shape=(5,), nbytes=20)[wire.TENSOR.size :])[0] == 5
