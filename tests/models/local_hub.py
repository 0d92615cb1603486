"""A local Hugging Face hub: the part of the hub's HTTP API that `huggingface_hub.snapshot_download`
uses (huggingface_hub 2.4), serving model repos from memory, for child processes with `HF_ENDPOINT`
set to its URL.

- `GET /api/models/<repo>/revision/<rev>`: the repo's info (`sha`: its commit);
- `GET /api/models/<repo>/tree/<rev>?recursive=...`: its files (one page);
- `HEAD|GET /<repo>/resolve/<rev>/<file>`: a file, with the headers huggingface_hub needs
  (`X-Repo-Commit`, `ETag`, `Content-Length`).

A repo id it does not have is a 404 `RepoNotFound`; a gated repo is a 401 `GatedRepo` without a
token and a 403 with a wrong one (the hub's `X-Error-Code`s, which huggingface_hub turns into
`RepositoryNotFoundError` and `GatedRepoError`). It runs in a thread of the test process on
127.0.0.1 with a free port, and records each request it gets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import pathlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from urllib.parse import unquote, urlsplit

API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<what>revision|tree)/(?P<rev>[^/]+)")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


@dataclasses.dataclass
class Repo:
    files: dict[str, bytes]  # path in the repo -> contents
    token: str | None = None  # gated: only requests with this bearer token may read it

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(f"{path}\0{hashlib.sha256(self.files[path]).hexdigest()}\0".encode())
        return digest.hexdigest()


@dataclasses.dataclass
class LocalHub:
    url: str  # "http://127.0.0.1:<port>", what HF_ENDPOINT is set to
    repos: dict[str, Repo]  # repo id -> repo; add to it any time
    requests: list[tuple[str, str]]  # (method, path) of each request, in order

    def add(self, repo_id: str, folder: pathlib.Path, token: str | None = None) -> Repo:
        """Serve the files under `folder` as the model repo `repo_id` (gated by `token` if given)."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[repo_id] = repo = Repo(files, token)
        return repo


class HubHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args, hub: LocalHub, **kwargs) -> None:
        self.hub = hub
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append((self.command, path))
        match = API.fullmatch(path) or RESOLVE.fullmatch(path)
        repo = self.hub.repos.get(match["repo"]) if match else None
        if repo is None:
            return self._error(404, "RepoNotFound", body)
        if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(403 if self.headers.get("Authorization") else 401, "GatedRepo", body)
        if match["rev"] not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", body)
        if match.re is RESOLVE:
            data = repo.files.get(match["file"])
            if data is None:
                return self._error(404, "EntryNotFound", body)
            return self._send(data, "application/octet-stream", body, ETag=f'"{hashlib.sha256(data).hexdigest()}"',
                              **{"X-Repo-Commit": repo.commit})
        if match["what"] == "revision":
            info = {"id": match["repo"], "sha": repo.commit, "private": False, "gated": bool(repo.token),
                    "siblings": [{"rfilename": name} for name in repo.files]}
        else:
            info = [{"type": "file", "path": name, "size": len(data), "oid": _git_blob_id(data)}
                    for name, data in repo.files.items()]
        self._send(json.dumps(info).encode(), "application/json", body)

    def _error(self, status: int, code: str, body: bool) -> None:
        self._send(json.dumps({"error": code}).encode(), "application/json", body, status, **{"X-Error-Code": code})

    def _send(self, data: bytes, content_type: str, body: bool, status: int = 200, **headers: str) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@contextmanager
def serve_hub() -> Iterator[LocalHub]:
    """A local hub on 127.0.0.1, from a thread of this process, with no repos yet."""
    hub = LocalHub("", {}, [])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(HubHandler, hub=hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="serve_hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
