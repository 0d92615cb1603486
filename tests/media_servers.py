"""Real servers that media references point at: a folder over HTTP and an S3 API (moto's server).

Both run in threads of the test process, listen on loopback with a free port and stop when their
`with` block ends. They are usable from child processes too: `serve_http` yields a URL, `serve_s3`
an `env` to start a child process with.
"""

from __future__ import annotations

import dataclasses
import http.server
import pathlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import botocore.config
import botocore.session

UNSIZED = "unsized"
ENDLESS = "endless"


class FolderHandler(http.server.SimpleHTTPRequestHandler):
    """Serves `directory` (HTTP/1.0: one request per connection), except for the paths in `special`.

    `special` maps a path ("/broken.png") to a status that it answers instead (500, 403, ...), or to
    UNSIZED (its file is sent without Content-Length, as many dynamic servers do) or ENDLESS (zeros,
    without Content-Length, until the client hangs up).
    """

    def __init__(self, *args, special: dict[str, int | str], **kwargs) -> None:
        self.special = special
        super().__init__(*args, **kwargs)

    def send_head(self):
        how = self.special.get(self.path)
        if isinstance(how, int):
            self.send_error(how)
            return None
        if how == ENDLESS:
            self.send_response(200)
            self.end_headers()
            if self.command == "GET":
                self._send_zeros()
            return None
        return super().send_head()

    def send_header(self, keyword: str, value: str) -> None:
        if not (keyword == "Content-Length" and self.special.get(self.path) == UNSIZED):
            super().send_header(keyword, value)

    def _send_zeros(self) -> None:
        try:
            while True:
                self.wfile.write(bytes(2**16))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass


@dataclasses.dataclass
class HttpServer:
    url: str  # "http://127.0.0.1:<port>/"
    special: dict[str, int | str]  # path -> status, UNSIZED or ENDLESS (see FolderHandler); change it any time


@contextmanager
def serve_http(folder: pathlib.Path) -> Iterator[HttpServer]:
    """Serves `folder` over HTTP on 127.0.0.1 from a thread of this process."""
    special: dict[str, int | str] = {}
    handler = partial(FolderHandler, directory=str(folder), special=special)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="serve_http", daemon=True)
    thread.start()
    try:
        yield HttpServer(f"http://127.0.0.1:{server.server_address[1]}/", special)
    finally:
        server.shutdown()
        server.server_close()  # also joins the threads that handle requests
        thread.join()


# The environment variable that points botocore (and so s3fs) at a non-AWS endpoint. It is read when
# a client is created, so it also works when set in-process (unlike fsspec's FSSPEC_S3_ENDPOINT_URL,
# which fsspec reads once at import).
ENDPOINT_VARIABLE = "AWS_ENDPOINT_URL_S3"


@dataclasses.dataclass
class S3Server:
    endpoint_url: str
    env: dict[str, str]  # fake credentials, region and endpoint: what a client process needs

    def put(self, bucket: str, files: dict[str, bytes]) -> None:
        """Creates `bucket` (if it does not exist yet) and uploads `files` (key -> bytes) into it."""
        client = self._client()
        try:
            if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                client.create_bucket(Bucket=bucket)
            for key, data in files.items():
                client.put_object(Bucket=bucket, Key=key, Body=data)
        finally:
            client.close()

    def read(self, bucket: str, key: str) -> bytes:
        client = self._client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        finally:
            client.close()

    @property
    def flytekit_env(self) -> dict[str, str]:
        """The same server and credentials for flytekit's data persistence (its own variables)."""
        return {**self.env, "FLYTE_AWS_ENDPOINT": self.endpoint_url,
                "FLYTE_AWS_ACCESS_KEY_ID": self.env["AWS_ACCESS_KEY_ID"],
                "FLYTE_AWS_SECRET_ACCESS_KEY": self.env["AWS_SECRET_ACCESS_KEY"]}

    def _client(self):
        return botocore.session.Session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(retries={"max_attempts": 1}),
        )


@contextmanager
def serve_s3() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1, in a thread of this process; its socket is bound before this
    yields, so clients (child processes too) can connect at once."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            ENDPOINT_VARIABLE: url,
        }
        yield S3Server(url, env)
    finally:
        server.stop()
