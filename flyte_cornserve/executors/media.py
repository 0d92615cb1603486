"""The bytes behind a media reference (an image), from wherever datasets live.

A reference is a `data:` URL (base64), a local path or `file://` URI, or a URL of any protocol fsspec
knows: `http(s)://`, `s3://bucket/key`, `gs://bucket/key`, ... Local files are read directly (cheaper
than fsspec's generic path, for many small images); every other URL is read through fsspec, which
caches one filesystem instance per protocol (and thread).

Whose credentials: the executor's. fsspec reads with the environment of the executor process, not
with anything of the user who submitted the workflow. For s3:// that is botocore's standard chain:
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`), `AWS_PROFILE` and the shared
files `~/.aws/credentials` and `~/.aws/config`, an instance profile, or IRSA on Kubernetes. For an
S3-compatible store (MinIO, Ceph, ...) set `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`, which applies
to every AWS service): botocore reads it when s3fs creates its client. (fsspec's
`FSSPEC_S3_ENDPOINT_URL` works too, but only if set before fsspec is imported.) For gs:// it is
`GOOGLE_APPLICATION_CREDENTIALS` or the pod's workload identity; gs:// is not tested here (no GCS
emulator is reachable from the tests). Locally the executors inherit the environment of the process
that started the embedded stack (the first `pyflyte run`, or `cornserve up`): a variable set later,
or in another shell, reaches them only after `cornserve down`.

Every failure is a `MediaError`. `recoverable=False` where trying again cannot help (no such object,
access denied, unknown protocol, bad `data:` URL, too large); `recoverable=True` where it may
(connection refused or reset, timeouts, HTTP 5xx, other I/O errors).
"""

from __future__ import annotations

import base64
import binascii
import errno
from collections.abc import Iterator

import aiohttp
import botocore.exceptions
import fsspec
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.exceptions import FSTimeoutError

CREDENTIALS_HINT = ("the executors read with their own credentials (their environment: AWS_* variables, "
                    "~/.aws, an instance profile or IRSA for s3; GOOGLE_APPLICATION_CREDENTIALS for gs)")  # fmt: skip


class MediaError(ValueError):
    """A reference that could not be read; `recoverable` says whether trying again may succeed."""

    def __init__(self, message: str, *, recoverable: bool) -> None:
        super().__init__(message)
        self.recoverable = recoverable


def read_bytes(reference: str, *, timeout_s: float = 30.0, max_bytes: int = 64 * 2**20) -> bytes:
    """The bytes behind `reference`; a `MediaError` if there are more than `max_bytes`.

    `timeout_s` bounds the whole fetch from a remote (fsspec async: http, s3, gs, ...) filesystem,
    the retries inside s3fs and botocore included. Local files have no timeout. It blocks (it waits
    for fsspec's IO thread): from a coroutine, call it in a thread (`asyncio.to_thread`).
    """
    if reference.startswith("data:"):
        data = _decode_data_url(reference)
    elif "://" not in reference or reference.startswith("file://"):
        data = _read_local(reference, max_bytes)
    else:
        data = _fetch(reference, timeout_s, max_bytes)
    _check_size(reference, len(data), max_bytes)
    return data


def _read_local(reference: str, max_bytes: int) -> bytes:
    """A local file, read directly: fsspec's generic path costs more than reading a small image."""
    path = reference.removeprefix("file://")
    try:
        with open(path, "rb") as source:
            return source.read(max_bytes + 1)
    except FileNotFoundError:
        raise MediaError(f"no such file or object: {_short(reference)}", recoverable=False) from None
    except (IsADirectoryError, NotADirectoryError):
        raise MediaError(f"not a file: {_short(reference)}", recoverable=False) from None
    except PermissionError:
        raise MediaError(f"access denied to {_short(reference)}: {CREDENTIALS_HINT}", recoverable=False) from None
    except ValueError as exc:  # a NUL in the path
        raise MediaError(f"not a valid path: {_short(reference)} ({exc})", recoverable=False) from None
    except OSError as exc:  # a name too long, a loop of links: no retry helps; an I/O error: one may
        raise MediaError(f"cannot read {_short(reference)}: {exc.strerror or exc}",
                         recoverable=exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL)) from None


def _decode_data_url(reference: str) -> bytes:
    header, comma, payload = reference.partition(",")
    if not comma:
        raise MediaError(f"malformed data: URL (no comma): {_short(reference)}", recoverable=False)
    if not header.lower().endswith(";base64"):
        raise MediaError(f"data: URL is not ;base64: {_short(reference)}", recoverable=False)
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise MediaError(f"data: URL is not valid base64 ({exc}): {_short(reference)}", recoverable=False) from exc


def _fetch(reference: str, timeout_s: float, max_bytes: int) -> bytes:
    try:
        fs, path = fsspec.url_to_fs(reference)
    except (ValueError, ImportError) as exc:  # "Protocol not known: ...", or its package is missing
        raise MediaError(f"cannot read {_short(reference)}: {exc}", recoverable=False) from exc
    try:
        if isinstance(fs, AsyncFileSystem):
            return sync(fs.loop, _fetch_async, reference, fs, path, max_bytes, timeout=timeout_s)
        _check_info(reference, fs.info(path), max_bytes)
        return fs.cat_file(path, start=0, end=max_bytes + 1)
    except MediaError:
        raise
    except FSTimeoutError as exc:  # raised by sync() when timeout_s runs out
        message = f"could not fetch {_short(reference)}: no answer within {timeout_s} s"
        raise MediaError(message, recoverable=True) from exc
    except Exception as exc:
        raise _classify(reference, exc) from exc


async def _fetch_async(reference: str, fs: AsyncFileSystem, path: str, max_bytes: int) -> bytes:
    size = _check_info(reference, await fs._info(path), max_bytes)
    if size == 0:  # S3 refuses a ranged read of an empty object (416 InvalidRange)
        return b""
    if size is not None:
        return await fs._cat_file(path, start=0, end=max_bytes + 1)
    # An HTTP server that sends no Content-Length may also ignore Range: stream, stop after max_bytes + 1.
    stream = await fs.open_async(path, "rb")
    try:
        chunks, left = [], max_bytes + 1
        while left and (chunk := await stream.read(left)):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        await stream.close()
    return b"".join(chunks)


def _check_info(reference: str, info: dict, max_bytes: int) -> int | None:
    """The size the filesystem reports (None: unknown), once folders and objects over max_bytes are refused."""
    if info.get("type") == "directory":  # a folder, s3://bucket, s3://bucket/prefix
        raise MediaError(f"not a file: {_short(reference)}", recoverable=False)
    _check_size(reference, info.get("size"), max_bytes)
    return info.get("size")


def _check_size(reference: str, size: int | None, max_bytes: int) -> None:
    if size is not None and size > max_bytes:
        raise MediaError(f"{_short(reference)} is larger than the limit of {max_bytes} bytes", recoverable=False)


# Failures on the way to an answer (none came): worth another try.
_TRANSIENT = (TimeoutError, ConnectionError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
              botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)  # fmt: skip


def _classify(reference: str, exc: Exception) -> MediaError:
    """User error or transient, from the exception and its causes. The chain matters: fsspec's http
    filesystem turns any failure of its HEAD/GET probe (a 403, a refused connection) into a
    FileNotFoundError raised from the aiohttp error, and s3fs turns botocore's ClientError into
    FileNotFoundError / PermissionError / OSError raised while handling it."""
    ref = _short(reference)
    causes = list(_causes(exc))
    status = next((s for s in map(_http_status, causes) if s is not None), None)
    if status in (404, 410):
        return MediaError(f"no such file or object: {ref}", recoverable=False)
    if status in (401, 403):
        return MediaError(f"access denied to {ref}: {CREDENTIALS_HINT}", recoverable=False)
    if status is not None:
        transient = status >= 500 or status in (408, 429)  # 408 Request Timeout, 429 Too Many Requests
        return MediaError(f"could not fetch {ref}: HTTP status {status}", recoverable=transient)
    transient = [e for e in causes if isinstance(e, _TRANSIENT)]
    if transient:
        why = transient[-1]  # the innermost: "Cannot connect to host ...", not "FileNotFoundError(url)"
        return MediaError(f"could not fetch {ref}: {str(why) or type(why).__name__}", recoverable=True)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return MediaError(f"no such file or object: {ref}", recoverable=False)
    if isinstance(exc, (PermissionError, botocore.exceptions.NoCredentialsError)):
        return MediaError(f"access denied to {ref}: {CREDENTIALS_HINT}", recoverable=False)
    if isinstance(exc, (ValueError, botocore.exceptions.ParamValidationError)):
        return MediaError(f"cannot read {ref}: {exc}", recoverable=False)
    return MediaError(f"could not fetch {ref}: {exc}", recoverable=True)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> int | None:
    """The status a server answered with: aiohttp's (http) or botocore's (s3) error. aiohttp also raises
    ClientResponseError(400) from the parse error for a response it cannot parse: that is no answer."""
    if isinstance(exc, aiohttp.ClientResponseError) and exc.__cause__ is None:
        return exc.status
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _short(reference: str, limit: int = 200) -> str:
    return reference if len(reference) <= limit else f"{reference[:limit]}... ({len(reference)} characters)"
