"""A local stand-in for the Hugging Face Hub: serves local folders as model repos over HTTP.

Point huggingface_hub at it (HF_ENDPOINT=hub.url, read when huggingface_hub is imported: set it in a
subprocess's environment) and it lists, resolves and downloads files as it does from huggingface.co:

    with serve_repos({"mistralai/Mistral-7B-v0.3": folder}, gated={"mistralai/Mistral-7B-v0.3"}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token}
        ...
        assert any(r.range for r in hub.requests_for("model-00001-of-00003.safetensors"))

The routes are the ones huggingface_hub calls (read from its source, version 2.4):

    GET       /api/models/{repo}[/revision/{rev}]     model info: sha, siblings, gated
    GET       /api/models/{repo}/tree/{rev}[/{dir}]   the file listing (?recursive=)
    HEAD|GET  /{repo}/resolve/{rev}/{path}            small files: 200 with X-Repo-Commit and ETag (git blob
                                                      id); LFS files: 302 to the CDN with X-Linked-Size and
                                                      X-Linked-Etag (sha256), as the real Hub answers
    HEAD|GET  {cdn}/lfs/{repo}/{sha256}               the LFS bytes

(huggingface_hub also asks GET /api/agent-harnesses, for its telemetry: an empty registry.)

The CDN listens on a second port and is addressed as `localhost` (the Hub as 127.0.0.1): another host,
as the real CDN is, so that huggingface_hub stops at the redirect and keeps the Authorization header
off the CDN. Both answer Range requests (206). Errors carry the Hub's
X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which huggingface_hub
turns into its typed errors. A gated repo lists its files to anyone, as on the Hub, and serves them
only with `Authorization: Bearer <token>` of an accepted token (401 without one, 403 with another).

Faults, for tests of interrupted transfers: `drop_after` sends the full Content-Length, then only the
first bytes, then closes the connection; `fail_with` answers an HTTP error status. Each applies to the
next GET of that file's bytes, in the order they were added.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_TOKEN = "hf_standin_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".h5", ".msgpack", ".onnx", ".ckpt")
LFS_MIN_BYTES = 10 << 20  # larger files go through LFS whatever their name
_CHUNK = 1 << 20
_CREATED = "2024-05-22T12:00:00.000Z"


@dataclass(frozen=True)
class Request:
    """One request as the stand-in saw it. `file` is the repo file it was about (None for the API)."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    status: int
    repo_id: str | None = None
    file: str | None = None

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class _File:
    path: str  # in the repo, '/'-separated
    local: Path
    size: int
    _sha256: str | None = None

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_BYTES

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            digest = hashlib.sha256()
            with self.local.open("rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    @property
    def git_oid(self) -> str:
        """The git blob id: of the file itself, or of its LFS pointer."""
        if self.lfs:
            data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()
        else:
            data = self.local.read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def tree_entry(self) -> dict:
        entry: dict = {"type": "file", "oid": self.git_oid, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return entry


@dataclass
class _Repo:
    repo_id: str
    files: dict[str, _File]
    commit: str
    gated: bool

    @classmethod
    def scan(cls, repo_id: str, folder: Path, gated: bool) -> _Repo:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder to serve as {repo_id}")
        files = {}
        for local in sorted(folder.rglob("*")):
            rel = local.relative_to(folder).as_posix()
            if local.is_file() and not rel.startswith((".git/", ".cache/")):
                files[rel] = _File(rel, local, local.stat().st_size)
        manifest = "\n".join(f"{f.path} {f.size} {f.local.stat().st_mtime_ns}" for f in files.values())
        commit = hashlib.sha1(f"{repo_id}\n{manifest}".encode()).hexdigest()
        return cls(repo_id, files, commit, gated)

    def directories(self) -> list[str]:
        dirs = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return sorted(dirs)


@dataclass
class _Fault:
    drop_after: int | None = None  # bytes sent before the connection is closed
    status: int | None = None  # an HTTP error status instead of the bytes


@dataclass
class HubStandIn:
    """The running stand-in: its endpoint, the requests it saw, and faults to inject."""

    url: str = ""  # the Hub endpoint: HF_ENDPOINT
    cdn_url: str = ""
    token: str = DEFAULT_TOKEN  # one token every gated repo accepts
    requests: list[Request] = field(default_factory=list)
    _repos: dict[str, _Repo] = field(default_factory=dict)
    _tokens: set[str] = field(default_factory=set)
    _faults: dict[tuple[str, str], list[_Fault]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __str__(self) -> str:
        return self.url

    def commit(self, repo_id: str) -> str:
        return self._repos[repo_id].commit

    def drop_after(self, repo_id: str, path: str, nbytes: int, times: int = 1) -> None:
        """The next `times` GETs of the file's bytes send `nbytes` of them, then close the connection."""
        self._add_fault(repo_id, path, [_Fault(drop_after=nbytes)] * times)

    def fail_with(self, repo_id: str, path: str, status: int = 503, times: int = 1) -> None:
        """The next `times` GETs of the file's bytes answer `status` instead."""
        self._add_fault(repo_id, path, [_Fault(status=status)] * times)

    def requests_for(self, path: str, method: str | None = None) -> list[Request]:
        """The requests about the repo file `path` (any repo), optionally of one method."""
        with self._lock:
            return [r for r in self.requests if r.file == path and (method is None or r.method == method)]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def _add_fault(self, repo_id: str, path: str, faults: list[_Fault]) -> None:
        if path not in self._repos[repo_id].files:
            raise KeyError(f"{repo_id} has no file {path!r}")
        with self._lock:
            self._faults.setdefault((repo_id, path), []).extend(faults)

    def _next_fault(self, repo_id: str, path: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get((repo_id, path))
            return queue.pop(0) if queue else None

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _find_repo(self, rest: str) -> tuple[_Repo | None, str, str]:
        """Split 'org/name/more...' into (repo or None, repo id, 'more...') by the longest known repo id."""
        for repo_id in sorted(self._repos, key=len, reverse=True):
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return self._repos[repo_id], repo_id, rest[len(repo_id) + 1:]
        parts = rest.split("/")
        guess = "/".join(parts[:2])
        return None, guess, "/".join(parts[2:])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubStandIn
    role: str  # "hub" or "cdn"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    # ---- routing ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self._repo_id: str | None = None
        self._file: str | None = None
        try:
            if self.role == "cdn" and path.startswith("/lfs/"):
                self._cdn(path[len("/lfs/"):])
            elif self.role == "hub" and path == "/api/agent-harnesses":  # huggingface_hub's telemetry
                self._json({"standardEnvVars": [], "harnesses": {}})
            elif self.role == "hub" and path.startswith("/api/models/"):
                self._api(path[len("/api/models/"):], query)
            elif self.role == "hub" and "/resolve/" in path:
                self._resolve(path.lstrip("/"))
            else:
                self._error(404, None, "Not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _api(self, rest: str, query: dict[str, list[str]]) -> None:
        repo, repo_id, more = self.hub._find_repo(rest)
        self._repo_id = repo_id
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if more == "" or more.startswith("revision/"):
            revision = more[len("revision/"):] if more else "main"
            if not self._revision_ok(repo, revision):
                return
            return self._json(self._model_info(repo, blobs=_true(query.get("blobs"))))
        if more.startswith("tree/"):
            revision, _, folder = more[len("tree/"):].partition("/")
            if not self._revision_ok(repo, revision):
                return
            return self._json(self._tree(repo, folder, recursive=_true(query.get("recursive"))))
        self._error(404, None, "Not found")

    def _resolve(self, rest: str) -> None:
        repo, repo_id, more = self.hub._find_repo(rest)
        self._repo_id = repo_id
        if repo is None or not more.startswith("resolve/"):
            return self._error(404, "RepoNotFound", "Repository not found")
        revision, _, path = more[len("resolve/"):].partition("/")
        self._file = path
        if not self._authorized(repo) or not self._revision_ok(repo, revision):
            return
        file = repo.files.get(path)
        if file is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}",
                               {"X-Repo-Commit": repo.commit})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{file.git_oid}"', "Accept-Ranges": "bytes"}
        if file.lfs:
            location = f"{self.hub.cdn_url}/lfs/{quote(repo.repo_id)}/{file.sha256}"
            headers.update({"Location": location, "X-Linked-Size": str(file.size),
                            "X-Linked-Etag": f'"{file.sha256}"', "Content-Length": "0"})
            return self._send(302, headers)
        self._file_bytes(repo, file, headers)

    def _cdn(self, rest: str) -> None:
        repo, repo_id, sha256 = self.hub._find_repo(rest)
        self._repo_id = repo_id
        file = next((f for f in repo.files.values() if f.lfs and f.sha256 == sha256), None) if repo else None
        if file is None:
            return self._error(404, None, "No such object")
        self._file = file.path
        self._file_bytes(repo, file, {"ETag": f'"{file.sha256}"', "Accept-Ranges": "bytes",
                                      "Content-Disposition": f'attachment; filename="{Path(file.path).name}"'})

    # ---- answers ------------------------------------------------------------------------------
    def _model_info(self, repo: _Repo, blobs: bool) -> dict:
        siblings = []
        for f in repo.files.values():
            sibling: dict = {"rfilename": f.path}
            if blobs:
                sibling.update({"size": f.size, "blobId": f.git_oid})
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(sibling)
        org = repo.repo_id.split("/")[0]
        return {
            "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": org,
            "sha": repo.commit, "lastModified": _CREATED, "createdAt": _CREATED, "private": False,
            "disabled": False, "gated": "manual" if repo.gated else False, "downloads": 0, "likes": 0,
            "tags": ["transformers", "safetensors"], "library_name": "transformers", "siblings": siblings,
        }

    def _tree(self, repo: _Repo, folder: str, recursive: bool) -> list[dict]:
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d}
                   for d in repo.directories() if wanted(d)]
        entries += [f.tree_entry() for f in repo.files.values() if wanted(f.path)]
        return entries

    def _authorized(self, repo: _Repo) -> bool:
        if not repo.gated:
            return True
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token in self.hub._tokens:
            return True
        if token is None:
            self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access "
                        "to it and be authenticated to access it. Please log in.")
        else:
            self._error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not in "
                        "the authorized list. Visit the model page to ask for access.")
        return False

    def _revision_ok(self, repo: _Repo, revision: str) -> bool:
        if revision in ("main", repo.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    def _file_bytes(self, repo: _Repo, file: _File, headers: dict[str, str]) -> None:
        start, end = 0, file.size - 1
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            parsed = _parse_range(wanted, file.size)
            if parsed is None:
                return self._send(416, {"Content-Range": f"bytes */{file.size}", "Content-Length": "0"})
            (start, end), status = parsed, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{file.size}"
        length = end - start + 1
        headers.update({"Content-Length": str(length), "Content-Type": "application/octet-stream"})
        if self.command == "HEAD":
            return self._send(status, headers)
        fault = self.hub._next_fault(repo.repo_id, file.path)
        if fault is not None and fault.status is not None:
            return self._error(fault.status, None, "Injected failure")
        limit = length if fault is None or fault.drop_after is None else min(fault.drop_after, length)
        self._send(status, headers)
        with file.local.open("rb") as f:
            f.seek(start)
            left = limit
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
        self.wfile.flush()
        if limit < length:  # the injected drop: the body stops short of Content-Length
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, data: object) -> None:
        body = json.dumps(data).encode()
        self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(body))}, body)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        headers.update(extra or {})
        self._send(status, headers, body)

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.hub._record(Request(self.role, self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                 status, self._repo_id, self._file))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)


def _true(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """'bytes=a-b', 'bytes=a-' or 'bytes=-n' -> (first, last) inclusive, or None if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            start, end = max(size - n, 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    return (start, end) if 0 <= start <= end else None


def _start(hub: HubStandIn, role: str) -> ThreadingHTTPServer:
    handler = type(f"_{role.capitalize()}Handler", (_Handler,), {"hub": hub, "role": role})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                     name=f"hub-standin-{role}").start()
    return server


@contextlib.contextmanager
def serve_repos(
    repos: Mapping[str, str | Path], gated: Iterable[str] = (), tokens: Iterable[str] = (DEFAULT_TOKEN,)
) -> Iterator[HubStandIn]:
    """Serve each folder as the model repo named by its key, at revision 'main' (and its commit hash).

    `gated`: repo ids whose files need a token from `tokens` (default: `HubStandIn.token`). The folders
    are scanned once, at the start; files under `.git/` and `.cache/` are left out.
    """
    gated = set(gated)
    unknown = gated - set(repos)
    if unknown:
        raise KeyError(f"gated repos not served: {sorted(unknown)}")
    hub = HubStandIn(_tokens=set(tokens))
    hub._repos = {rid: _Repo.scan(rid, Path(folder), rid in gated) for rid, folder in repos.items()}
    servers = [_start(hub, "hub"), _start(hub, "cdn")]
    # The CDN by another host name, as the real one: huggingface_hub follows a redirect to the Hub's own
    # host (some versions compare host names only) but not one to the CDN, and keeps the token off it.
    hub.url = f"http://127.0.0.1:{servers[0].server_address[1]}"
    hub.cdn_url = f"http://localhost:{servers[1].server_address[1]}"
    try:
        yield hub
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
