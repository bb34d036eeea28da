"""A fake Hugging Face Hub on 127.0.0.1: just enough of the protocol for huggingface_hub 2.4.

What the client asks for (read from huggingface_hub 2.4's ``file_download.py``):

- ``HEAD /{repo}/resolve/{revision}/{file}``: ``get_hf_file_metadata`` reads ``X-Repo-Commit``,
  ``X-Linked-Etag`` (else ``ETag``; for LFS files it is the sha256), ``X-Linked-Size`` (else
  ``Content-Length``), and raises on 404 according to ``X-Error-Code`` (``RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound``).
- ``GET`` of the same path, possibly with ``Range: bytes=N-`` (``http_get`` resumes that way);
  the answer is then ``206`` with ``Content-Range``.
- ``GET /api/models/{repo}/tree/{revision}`` (``HfApi.list_repo_files``): a JSON list of files.

Knobs per file: serve other bytes than the ones hashed (``serve``), drop the connection once the
transfer reaches byte ``cut_after`` (``cuts`` times), stall at ``stall_after`` until
``release()`` (so a test can kill the client mid-download), ignore ``Range`` (``ranges``), or
stream without end after announcing the size (``endless``).
Every request is logged in ``hub.requests``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

DEFAULT_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    content: bytes
    lfs: bool = True
    serve: bytes | None = None
    """Bytes to send instead of ``content`` (whose hash the metadata announces)."""
    cut_after: int | None = None
    """Drop the connection when the transfer reaches this byte offset of the file."""
    cuts: int = 1
    """How many times to drop it (later requests are served in full)."""
    stall_after: int | None = None
    """Send up to this offset, then hang until ``FakeHub.release()``, then drop the connection."""
    ranges: bool = True
    """Honour ``Range`` requests (some CDNs ignore them and send the whole file with 200)."""
    announced_size: int | None = None
    """The size HEAD announces for an LFS file (``X-Linked-Size``) instead of the real one."""
    endless: bool = False
    """Answer GET with no Content-Length and stream bytes until the client hangs up (HEAD still
    announces the real size): a hostile or broken server."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def git_sha1(self) -> str:
        header = f"blob {len(self.content)}\0".encode()
        return hashlib.sha1(header + self.content, usedforsecurity=False).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None
    status: int = 0
    sent: int = 0
    """Body bytes written."""


@dataclass
class FakeHub:
    commit: str = DEFAULT_COMMIT
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    requests: list[LoggedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def add_file(self, repo: str, filename: str, content: bytes, **knobs: object) -> HubFile:
        hub_file = HubFile(content, **knobs)  # type: ignore[arg-type]
        self.repos.setdefault(repo, {})[filename] = hub_file
        return hub_file

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def release(self) -> None:
        """Let stalled transfers go on (they then drop their connection)."""
        self._release.set()

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, request: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def gets(self, filename: str) -> list[LoggedRequest]:
        """The GET requests for ``filename``'s bytes."""
        return [
            r
            for r in self.requests
            if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + filename)
        ]


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, *, head: bool) -> None:
        path = urlsplit(self.path).path
        entry = LoggedRequest(self.command, path, self.headers.get("Range"))
        self.hub.log(entry)
        if match := _TREE.match(path):
            self._tree(entry, match["repo"], unquote(match["rev"]))
        elif match := _RESOLVE.match(path):
            self._resolve(entry, match["repo"], unquote(match["rev"]), unquote(match["file"]), head)
        else:
            self._error(entry, 404, None)

    def _find(self, entry: LoggedRequest, repo: str, rev: str) -> dict[str, HubFile] | None:
        files = self.hub.repos.get(repo)
        if files is None:
            self._error(entry, 404, "RepoNotFound")
            return None
        if rev not in ("main", self.hub.commit):
            self._error(entry, 404, "RevisionNotFound")
            return None
        return files

    def _tree(self, entry: LoggedRequest, repo: str, rev: str) -> None:
        files = self._find(entry, repo, rev)
        if files is None:
            return
        listing = [
            {
                "type": "file",
                "path": name,
                "size": len(f.content),
                "oid": f.git_sha1,
                **(
                    {"lfs": {"oid": f.sha256, "size": len(f.content), "pointerSize": 134}}
                    if f.lfs
                    else {}
                ),
            }
            for name, f in sorted(files.items())
        ]
        body = json.dumps(listing).encode()
        entry.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        entry.sent = len(body)

    def _resolve(self, entry: LoggedRequest, repo: str, rev: str, name: str, head: bool) -> None:
        files = self._find(entry, repo, rev)
        if files is None:
            return
        hub_file = files.get(name)
        if hub_file is None:
            self._error(entry, 404, "EntryNotFound")
            return
        body = hub_file.serve if hub_file.serve is not None else hub_file.content
        total = len(body)
        start, end = 0, total - 1
        status = 200
        if not head and hub_file.ranges and (wanted := self.headers.get("Range")):
            parsed = _RANGE.match(wanted)
            if parsed is None or int(parsed[1]) >= total:
                self._error(entry, 416, None, extra={"Content-Range": f"bytes */{total}"})
                return
            start = int(parsed[1])
            end = min(int(parsed[2]), total - 1) if parsed[2] else total - 1
            status = 206
        if hub_file.endless and not head:
            self._send_endless(entry, hub_file)
            return
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hub_file.etag}"')
        self.send_header("X-Repo-Commit", self.hub.commit)
        if hub_file.lfs:
            self.send_header("X-Linked-Etag", f'"{hub_file.sha256}"')
            announced = hub_file.announced_size
            size = len(hub_file.content) if announced is None else announced
            self.send_header("X-Linked-Size", str(size))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.end_headers()
        if head:
            return
        self._send_body(entry, hub_file, body, start, end + 1)

    ENDLESS_CAP = 1 << 30
    """Even an endless body stops here, so a client that never hangs up fails its test, not CI."""

    def _send_endless(self, entry: LoggedRequest, f: HubFile) -> None:
        entry.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.send_header("X-Repo-Commit", self.hub.commit)
        self.end_headers()
        self.close_connection = True
        chunk = (f.content * (1 + (1 << 16) // max(len(f.content), 1)))[: 1 << 16]
        try:
            while entry.sent < self.ENDLESS_CAP:
                self.wfile.write(chunk)
                entry.sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_body(
        self, entry: LoggedRequest, f: HubFile, body: bytes, start: int, stop: int
    ) -> None:
        stop_at, stall = stop, False
        if f.stall_after is not None and start < f.stall_after < stop:
            stop_at, stall = f.stall_after, True
        elif f.cut_after is not None and f.cuts > 0 and start < f.cut_after < stop:
            stop_at = f.cut_after
            f.cuts -= 1
        try:
            for offset in range(start, stop_at, 1 << 16):
                chunk = body[offset : min(offset + (1 << 16), stop_at)]
                self.wfile.write(chunk)
                entry.sent += len(chunk)
            self.wfile.flush()
            if stall:
                self.hub._release.wait(timeout=60)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if stop_at != stop:
            self.close_connection = True  # the client sees a body shorter than Content-Length

    def _error(
        self,
        entry: LoggedRequest,
        status: int,
        code: str | None,
        extra: dict[str, str] | None = None,
    ) -> None:
        entry.status = status
        body = json.dumps({"error": code or "Not Found"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", self.hub.commit)
        if code:
            self.send_header("X-Error-Code", code)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
