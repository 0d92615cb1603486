"""Fuzz: hypothesis-generated frames to a real `cornserve sidecar` over TCP.

tests/sidecar/test_sidecar_wire.py and test_sidecar_robustness.py hold one example of each kind of
bad frame; here hypothesis generates them: random bytes, truncated headers, bad magic or version,
oversize or lying length prefixes, JSON bodies that are not requests, `alloc` requests whose refs have
a bad dtype, negative or absurd shapes, absurd `nbytes`, NaN/inf/negative ttl and timeout, and, from a
fake peer the sidecar pulls from, tensor headers with random codes, shapes, sizes and checksums.
Each connection gets a reply (an error naming the problem, or an answer to a valid request) or is
closed; the same sidecar process then still serves a normal put/get.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flyte_cornserve.sidecar import wire
from flyte_cornserve.sidecar.errors import ProtocolError, SidecarError
from flyte_cornserve.task.tensor_ref import DTYPE_ITEMSIZE

from tests.sidecar.conftest import module_sidecars  # noqa: F401  (a module's sidecars on the session's Redis)
from tests.sidecar.test_sidecar_robustness import OK_REPLY, FakePeer

REPLY_TIMEOUT_S = 15.0  # a reply or a hang-up comes at once; this only bounds a hang
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def victim(module_sidecars):
    return module_sidecars.start()


def exchange(sidecar, raw: bytes) -> SidecarError | wire.Stats | wire.Placements | wire.Placement | None:
    """Send `raw`, say nothing more, and return what the sidecar answered: an error (raised by the
    client side of the protocol), a reply, or None when it hung up without a word."""
    host, port = sidecar.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=REPLY_TIMEOUT_S) as sock:
        with contextlib.suppress(OSError):  # the sidecar may have answered and hung up already
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        try:
            sock.settimeout(REPLY_TIMEOUT_S)
            status, body = wire._recv_frame(sock, wire.MAGIC_REPLY, REPLY_TIMEOUT_S, REPLY_TIMEOUT_S)
        except wire.ConnectionClosed:
            return None
        except (ConnectionResetError, BrokenPipeError):
            return None
        except TimeoutError:
            raise AssertionError(f"the sidecar neither answered nor hung up within {REPLY_TIMEOUT_S} s: {raw[:200]!r}") from None
        if status:
            error = wire.error_from_code(status, wire._ErrorBody.model_validate_json(body).error)
            assert str(error), "an error reply without a message"
            return error
        data = json.loads(body)
        return data


def assert_still_serving(module_sidecars, sidecar) -> None:
    assert sidecar.process.poll() is None, "the sidecar process died"
    client = module_sidecars.client(sidecar)
    ref = client.put(torch.arange(10))
    assert torch.equal(client.get(ref), torch.arange(10))
    client.release(ref)


def frame(body: bytes, magic: bytes = wire.MAGIC_REQUEST, version: int = wire.VERSION, length: int | None = None) -> bytes:
    return wire.FRAME.pack(magic, version, 0, len(body) if length is None else length) + body


# --- raw bytes and broken framing -------------------------------------------------------------------

raw_frames = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.binary(min_size=1, max_size=wire.FRAME.size - 1).map(lambda b: wire.MAGIC_REQUEST[: len(b)] + b[4:]),  # truncated header
    st.builds(frame, st.binary(max_size=200), st.sampled_from([wire.MAGIC_REQUEST, wire.MAGIC_REPLY, b"CSTN", b"\0\0\0\0"]),
              st.integers(0, 255), st.one_of(st.none(), st.integers(0, 2**32 - 1))),  # bad magic/version, lying length
    st.builds(frame, st.binary(max_size=200)),  # a well-framed body that is not JSON (or not a request)
    st.builds(frame, st.binary(max_size=50), length=st.integers(wire.MAX_BODY + 1, 2**32 - 1)),  # oversize prefix
)


@FUZZ
@given(raw=raw_frames)
def test_random_and_broken_frames_get_an_error_or_a_hang_up(module_sidecars, victim, raw: bytes) -> None:
    answer = exchange(victim, raw)
    assert answer is None or isinstance(answer, (SidecarError, dict)), answer
    assert victim.process.poll() is None


# --- well-framed requests with junk fields ----------------------------------------------------------

dims = st.integers(-2**70, 2**70) | st.integers(-3, 8)
odd_floats = st.one_of(st.sampled_from([0.0, 0.5, -1.0, math.nan, math.inf, -math.inf, 1e300]))
refs = st.fixed_dictionaries(
    {
        "id": st.one_of(st.text(max_size=12), st.from_regex(r"\A[a-z0-9]{1,12}\Z")),
        "shape": st.one_of(st.lists(dims, max_size=5), st.text(max_size=5), st.integers(), st.none()),
        "dtype": st.one_of(st.sampled_from(sorted(DTYPE_ITEMSIZE)), st.text(max_size=10), st.integers()),
        "nbytes": st.one_of(st.integers(-2**70, 2**70), st.integers(-4, 256), st.text(max_size=5), st.floats()),
    },
    optional={"location": st.text(max_size=5), "checksum": st.integers(), "extra": st.text(max_size=5)},
)
requests = st.one_of(
    st.fixed_dictionaries({"op": st.just("alloc"), "refs": st.lists(refs, max_size=3),
                           "pins": st.integers(-2, 3) | st.text(max_size=3), "ttl": odd_floats,
                           "max_pinned": odd_floats, "timeout": odd_floats}),
    st.fixed_dictionaries({"op": st.sampled_from(["read", "fetch"]), "id": st.text(max_size=20)},
                          optional={"timeout": odd_floats}),
    st.fixed_dictionaries({"op": st.text(max_size=8)}, optional={"token": st.text(max_size=8) | st.integers()}),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)),
)


@FUZZ
@given(request=requests)
def test_requests_with_junk_fields_are_refused_with_a_message(module_sidecars, victim, request) -> None:
    answer = exchange(victim, frame(json.dumps(request).encode()))
    assert answer is not None, f"hung up without an error reply: {request!r}"
    if isinstance(answer, SidecarError):
        assert str(answer)
    else:  # a valid request: alloc (room for small refs), stats
        assert request.get("op") in {"alloc", "stats"}, (request, answer)
        if request["op"] == "alloc":
            assert all(isinstance(ref.get("nbytes"), int) and 0 <= ref["nbytes"] < 2**30 for ref in request["refs"])
    assert victim.process.poll() is None


# --- a peer's tensor stream ------------------------------------------------------------------------

def tensor_header(code: int, shape: list[int], nbytes: int, checksum: int) -> bytes:
    return wire.TENSOR.pack(wire.MAGIC_TENSOR, wire.VERSION, code, len(shape), nbytes, checksum) + b"".join(
        wire.DIM.pack(d) for d in shape)


headers = st.builds(
    tensor_header,
    code=st.integers(0, 255),
    shape=st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 8), max_size=6),
    nbytes=st.integers(0, 2**64 - 1) | st.integers(0, 64),
    checksum=st.integers(0, 2**64 - 1),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, cut=st.integers(0, 60), payload=st.binary(max_size=40))
def test_a_peer_sending_a_junk_tensor_header_is_refused(module_sidecars, victim, header: bytes, cut: int, payload: bytes) -> None:
    """The fake peer holds a float32[4] tensor by the directory and sends a random header (maybe cut
    short) and random bytes: the read fails with a ProtocolError, the copy's room is given back."""
    peer = FakePeer(module_sidecars, OK_REPLY + (header + payload)[: len(header) + len(payload) - cut])
    consumer = module_sidecars.client(victim)
    before = consumer.stats().used  # allocs of the test above may still hold room until their ttl
    with pytest.raises(ProtocolError) as failed:
        consumer.get(peer.tensor_id, timeout=30)
    assert str(failed.value)
    assert consumer.stats().used <= before  # the room reserved for the copy was given back
    assert victim.process.poll() is None


def test_the_sidecar_serves_normally_after_the_fuzzing(module_sidecars, victim) -> None:
    assert_still_serving(module_sidecars, victim)
    host, port = victim.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        wire.send_request(sock, wire.StatsRequest())
        stats = wire.recv_reply(sock, wire.Stats, timeout=10)
    assert stats.sidecar == victim.id and stats.waiting == 0
