"""`read_bytes` against real sources: files, an HTTP server, moto's S3 server and a silent socket."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import fsspec
import pytest

from flyte_cornserve.executors.media import MediaError, read_bytes
from tests.media_servers import ENDLESS, UNSIZED, HttpServer, S3Server, serve_http, serve_s3

IMAGE = bytes(range(256)) * 40  # 10 KiB that no off-by-one or truncation leaves equal


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "image.png").write_bytes(IMAGE)
    return tmp_path


@pytest.fixture
def http(folder) -> Iterator[HttpServer]:
    with serve_http(folder) as server:
        yield server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    with serve_s3() as server:
        server.put("media", {"images/image.png": IMAGE})
        yield server


def _clear_s3_instances() -> None:
    """fsspec caches S3FileSystem instances, each with the endpoint its client was made with."""
    fsspec.get_filesystem_class("s3").clear_instance_cache()


@pytest.fixture
def s3(s3_server, monkeypatch) -> Iterator[S3Server]:
    """This process reads from `s3_server` with its env, and with nothing else of the environment's AWS_*."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    _clear_s3_instances()
    yield s3_server
    _clear_s3_instances()


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that accepts connections (the kernel completes them) and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/image.png"


@pytest.fixture
def refused_url() -> str:
    """A port that nobody listens on (the OS just gave it out and it was closed again)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/image.png"


def _user_error(reference: str, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as caught:
        read_bytes(reference, **kwargs)
    assert caught.value.recoverable is False, caught.value
    return caught.value


def _recoverable_error(reference: str, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as caught:
        read_bytes(reference, **kwargs)
    assert caught.value.recoverable is True, caught.value
    return caught.value


# data: URLs


def test_data_url() -> None:
    assert read_bytes("data:image/png;base64," + base64.b64encode(IMAGE).decode()) == IMAGE


def test_data_url_with_bad_base64() -> None:
    assert "not valid base64" in str(_user_error("data:image/png;base64,not*base64"))


def test_data_url_that_is_not_base64() -> None:
    assert "not ;base64" in str(_user_error("data:text/plain,hello"))


def test_data_url_without_comma() -> None:
    assert "malformed" in str(_user_error("data:image/png;base64"))


def test_huge_data_url_is_cut_short_in_the_message() -> None:
    error = _user_error("data:image/png;base64," + "*" * 100_000)
    assert len(str(error)) < 400 and "100022 characters" in str(error)


def test_data_url_over_max_bytes() -> None:
    reference = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    assert "larger than the limit of 100 bytes" in str(_user_error(reference, max_bytes=100))


# local files


def test_absolute_path(folder) -> None:
    assert read_bytes(str(folder / "image.png")) == IMAGE


def test_relative_path(folder, monkeypatch) -> None:
    monkeypatch.chdir(folder)
    assert read_bytes("image.png") == IMAGE


def test_file_uri(folder) -> None:
    assert read_bytes((folder / "image.png").as_uri()) == IMAGE


def test_missing_file(folder) -> None:
    missing = str(folder / "missing.png")
    assert str(_user_error(missing)) == f"no such file or object: {missing}"


def test_folder(folder) -> None:
    assert str(_user_error(str(folder))) == f"not a file: {folder}"


def test_file_at_exactly_max_bytes(folder) -> None:
    assert read_bytes(str(folder / "image.png"), max_bytes=len(IMAGE)) == IMAGE


def test_file_over_max_bytes(folder) -> None:
    assert "larger than the limit" in str(_user_error(str(folder / "image.png"), max_bytes=len(IMAGE) - 1))


def test_unknown_protocol() -> None:
    assert "Protocol not known: nosuchproto" in str(_user_error("nosuchproto://bucket/image.png"))


# http


def test_http(http) -> None:
    assert read_bytes(http.url + "image.png") == IMAGE


def test_http_not_found(http) -> None:
    assert str(_user_error(http.url + "missing.png")) == f"no such file or object: {http.url}missing.png"


def test_http_forbidden(http) -> None:
    http.special["/image.png"] = 403
    assert "their own credentials" in str(_user_error(http.url + "image.png"))


def test_http_server_error(http) -> None:
    http.special["/image.png"] = 500
    assert "HTTP status 500" in str(_recoverable_error(http.url + "image.png"))


def test_http_connection_refused(refused_url) -> None:
    message = str(_recoverable_error(refused_url, timeout_s=10))
    assert message.startswith(f"could not fetch {refused_url}: ") and "no answer within" not in message


def test_http_silent_server_times_out(silent_url) -> None:
    assert "no answer within 0.5 s" in str(_recoverable_error(silent_url, timeout_s=0.5))


def test_http_over_max_bytes(http) -> None:
    assert "larger than the limit" in str(_user_error(http.url + "image.png", max_bytes=len(IMAGE) - 1))


def test_http_without_content_length(http) -> None:
    http.special["/image.png"] = UNSIZED
    assert read_bytes(http.url + "image.png") == IMAGE
    assert "larger than the limit" in str(_user_error(http.url + "image.png", max_bytes=len(IMAGE) - 1))


def test_http_endless_body_stops_after_max_bytes(http) -> None:
    """Reading it all would never end: the limit has to stop the read (not the timeout)."""
    http.special["/endless.png"] = ENDLESS
    assert "larger than the limit" in str(_user_error(http.url + "endless.png", max_bytes=100_000, timeout_s=5))


# s3


def test_s3(s3) -> None:
    assert read_bytes("s3://media/images/image.png") == IMAGE


def test_s3_empty_object(s3) -> None:
    s3.put("media", {"images/empty.png": b""})
    assert read_bytes("s3://media/images/empty.png") == b""


def test_s3_missing_key(s3) -> None:
    assert str(_user_error("s3://media/images/missing.png")) == "no such file or object: s3://media/images/missing.png"


def test_s3_missing_bucket(s3) -> None:
    assert str(_user_error("s3://no-such-bucket/image.png")) == "no such file or object: s3://no-such-bucket/image.png"


@pytest.mark.parametrize("reference", ["s3://media", "s3://media/images"])
def test_s3_bucket_or_prefix(s3, reference) -> None:
    assert str(_user_error(reference)) == f"not a file: {reference}"


def test_s3_invalid_bucket_name(s3) -> None:
    assert "Invalid bucket name" in str(_user_error("s3://Not_A_Bucket!/image.png"))


def test_s3_over_max_bytes(s3) -> None:
    assert "larger than the limit" in str(_user_error("s3://media/images/image.png", max_bytes=len(IMAGE) - 1))


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"])
def test_s3_endpoint_variable_in_a_child_process(s3_server, variable) -> None:
    """What the module docstring promises: each of these points a fresh executor process at the endpoint."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env |= {name: value for name, value in s3_server.env.items() if name.startswith("AWS_") and "ENDPOINT" not in name}
    env[variable] = s3_server.endpoint_url
    code = ("import sys; from flyte_cornserve.executors.media import read_bytes; "
            "sys.stdout.buffer.write(read_bytes('s3://media/images/image.png', timeout_s=10))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == IMAGE
