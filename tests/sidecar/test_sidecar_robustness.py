"""Hostile or broken peers cannot crash a sidecar: malformed requests, unknown dtypes, lying or
truncated tensor streams are rejected with an error naming the problem, and the same sidecar
process goes on serving good requests. Also: the shared token, and listening on loopback."""

from __future__ import annotations

import contextlib

import os
import socket
import threading

import pytest
import torch

from flyte_cornserve.sidecar import wire
from flyte_cornserve.sidecar.directory import Member, TensorEntry
from flyte_cornserve.sidecar.errors import AuthenticationError, ProtocolError, TensorNotFound
from flyte_cornserve.task.tensor_ref import TensorRef


def request_frame(body: bytes, *, magic: bytes = wire.MAGIC_REQUEST, version: int = wire.VERSION, length: int | None = None) -> bytes:
    return wire.FRAME.pack(magic, version, 0, len(body) if length is None else length) + body


def send_raw(sidecar, raw: bytes) -> socket.socket:
    host, port = sidecar.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(raw)
    return sock


def assert_still_serving(sidecars, sidecar) -> None:
    assert sidecar.process.poll() is None
    client = sidecars.client(sidecar)
    ref = client.put(torch.arange(10))
    assert torch.equal(client.get(ref), torch.arange(10))
    client.release(ref)


@pytest.fixture(scope="module")
def victim(module_sidecars):
    """One sidecar that every test of this module attacks; it must survive all of them."""
    return module_sidecars.start()


ALLOC_BODY = '{{"op": "alloc", "refs": [{{"id": "a", "shape": [2], "dtype": "{dtype}", "nbytes": {nbytes}}}], "pins": 1, "ttl": 9, "max_pinned": 60, "timeout": 1}}'


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic b'GET '", id="http"),
        pytest.param(request_frame(b"{}", version=9), "unsupported protocol version 9", id="version"),
        pytest.param(request_frame(b"", length=2**32 - 1), "frame body of 4294967295 bytes exceeds the limit", id="huge-length"),
        pytest.param(request_frame(b'{"op": "stats"}', length=500), "truncated frame body: connection closed after 15 of 500 bytes", id="truncated"),
        pytest.param(request_frame(b"\x80\x04\x95pickled-object"), "invalid request", id="pickle"),
        pytest.param(request_frame(b'{"op": "shutdown"}'), "Input tag 'shutdown' found using 'op' does not match", id="unknown-op"),
        pytest.param(request_frame(ALLOC_BODY.format(dtype="complex128", nbytes=32).encode()), "dtype 'complex128' is not allowed", id="unknown-dtype"),
        pytest.param(request_frame(ALLOC_BODY.format(dtype="float32", nbytes=4096).encode()), "nbytes=4096 disagrees with shape", id="nbytes-vs-shape"),
    ],
)
def test_malformed_requests_are_answered_with_an_error_and_the_sidecar_keeps_serving(module_sidecars, victim, raw: bytes, message: str) -> None:
    with send_raw(victim, raw) as sock:
        with contextlib.suppress(OSError):  # the sidecar may have answered and hung up already
            sock.shutdown(socket.SHUT_WR)  # whatever was promised, nothing more comes
        with pytest.raises(ProtocolError, match=message):
            wire.recv_reply(sock, wire.Empty, timeout=10)
        assert sock.recv(1) == b""  # and the sidecar hung up
    assert_still_serving(module_sidecars, victim)


def test_a_request_for_an_unknown_tensor_fails_but_the_connection_stays_usable(victim) -> None:
    with send_raw(victim, b"") as sock:
        wire.send_request(sock, wire.ReadRequest(id="no-such-tensor"))
        with pytest.raises(TensorNotFound, match="holds no tensor 'no-such-tensor'"):
            wire.recv_reply(sock, wire.Empty, timeout=10)
        wire.send_request(sock, wire.StatsRequest())
        assert wire.recv_reply(sock, wire.Stats, timeout=10).sidecar == victim.id


# --- a sidecar pulling from a lying peer ----------------------------------------------------------


class FakePeer:
    """Poses as the sidecar holding a 16-byte float32 tensor and answers the read with `answer`."""

    SHAPE, DTYPE, NBYTES = (4,), "float32", 16

    def __init__(self, sidecars, answer: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.answer = answer
        self.id = f"fake-{os.urandom(4).hex()}"
        self.tensor_id = f"from-{self.id}"
        threading.Thread(target=self._serve_one, daemon=True).start()
        member = Member(id=self.id, address="127.0.0.1:%d" % self.listener.getsockname()[1], host=socket.gethostname(),
                        pid=os.getpid(), shm_dir="/dev/shm", arena=f"cornserve_{self.id}_0", capacity=1 << 20)  # fmt: skip
        sidecars.directory.heartbeat(member, ttl=60)
        ref = TensorRef(id=self.tensor_id, shape=self.SHAPE, dtype=self.DTYPE, nbytes=self.NBYTES, location=self.id)
        entry = TensorEntry(ref=ref, holder=self.id, arena=member.arena, offset=0, pins=1, ttl=0, max_pinned=60)
        assert sidecars.directory.publish(self.tensor_id, entry)

    def _serve_one(self) -> None:
        with self.listener:
            conn, _ = self.listener.accept()
            with conn:
                wire.recv_request(conn, io_timeout=10)
                conn.sendall(self.answer)


GOOD_PAYLOAD = bytes(range(16))
OK_REPLY = wire.FRAME.pack(wire.MAGIC_REPLY, wire.VERSION, 0, 2) + b"{}"


def tensor_header(*, code: int = wire.DTYPE_CODES["float32"], shape=(4,), nbytes: int = 16, checksum: int | None = None) -> bytes:
    checksum = wire.checksum(memoryview(GOOD_PAYLOAD)) if checksum is None else checksum
    fixed = wire.TENSOR.pack(wire.MAGIC_TENSOR, wire.VERSION, code, len(shape), nbytes, checksum)
    return fixed + b"".join(wire.DIM.pack(d) for d in shape)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param(b"", "closed the connection without replying", id="no-reply"),
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\n", "bad magic b'HTTP'", id="not-a-reply"),
        pytest.param(wire.FRAME.pack(wire.MAGIC_REPLY, wire.VERSION, 4, 5) + b"oops!", "invalid error reply", id="bad-error-reply"),
        pytest.param(OK_REPLY + b"NOPE" + tensor_header()[4:] + GOOD_PAYLOAD, "bad magic b'NOPE'", id="header-magic"),
        pytest.param(OK_REPLY + tensor_header(code=99) + GOOD_PAYLOAD, "unknown dtype code 99", id="unknown-dtype"),
        pytest.param(OK_REPLY + tensor_header(nbytes=20) + GOOD_PAYLOAD, r"header says 20 bytes, but shape \(4,\) of float32 is 16 bytes", id="nbytes-vs-shape"),
        pytest.param(OK_REPLY + tensor_header(shape=(2, 2)) + GOOD_PAYLOAD, r"announced .* \('float32', \(2, 2\), 16\) .* the directory says \('float32', \(4,\), 16\)", id="header-vs-directory"),
        pytest.param(OK_REPLY + tensor_header(shape=(2**40,), nbytes=2**42), r"announced .* 4398046511104\)", id="4-TiB-claim"),
        pytest.param(OK_REPLY + tensor_header()[:9], "truncated tensor header", id="truncated-header"),
        pytest.param(OK_REPLY + tensor_header() + GOOD_PAYLOAD[:9], "truncated tensor stream: connection closed after 9 of 16 bytes", id="truncated-payload"),
        pytest.param(OK_REPLY + tensor_header(checksum=12345) + GOOD_PAYLOAD, "checksum mismatch", id="bad-checksum"),
    ],
)
def test_a_sidecar_rejects_bad_tensor_streams_from_a_peer_and_keeps_serving(module_sidecars, victim, answer: bytes, message: str) -> None:
    peer = FakePeer(module_sidecars, answer)
    consumer = module_sidecars.client(victim)
    with pytest.raises(ProtocolError, match=message):
        consumer.get(peer.tensor_id, timeout=30)
    assert consumer.stats().pinned == 0  # the room reserved for the copy was given back
    assert_still_serving(module_sidecars, victim)


def test_a_well_behaved_stream_through_the_same_path_is_accepted(module_sidecars, victim) -> None:
    """The control for the test above: the fake peer itself is right when it tells the truth."""
    peer = FakePeer(module_sidecars, OK_REPLY + tensor_header() + GOOD_PAYLOAD)
    consumer = module_sidecars.client(victim)
    got = consumer.get(peer.tensor_id, timeout=30)
    assert got.numpy().tobytes() == GOOD_PAYLOAD
    consumer.release(peer.tensor_id)


# --- shared token and listening address -----------------------------------------------------------


def test_the_shared_token_is_required_from_clients_and_peers(sidecars) -> None:
    a, b = sidecars.start(token="s3cret"), sidecars.start(token="s3cret")
    outsider = sidecars.start(token="other")
    ref = sidecars.client(a, token="s3cret").put(torch.arange(100))
    assert torch.equal(sidecars.client(b, token="s3cret").get(ref), torch.arange(100))
    with pytest.raises(AuthenticationError, match="wrong or missing sidecar token"):
        sidecars.client(a).put(torch.arange(3))
    with pytest.raises(AuthenticationError, match="wrong or missing sidecar token"):
        sidecars.client(outsider, token="other").get(ref)  # the outsider's read is refused by a
    assert_still_serving_with_token(sidecars, a, "s3cret")


def assert_still_serving_with_token(sidecars, sidecar, token: str) -> None:
    client = sidecars.client(sidecar, token=token)
    assert torch.equal(client.get(client.put(torch.ones(3))), torch.ones(3))


def test_sidecars_listen_on_loopback_by_default(sidecars) -> None:
    sidecar = sidecars.start()
    host, _ = sidecar.address.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert sidecars.directory.member(sidecar.id).address == sidecar.address
