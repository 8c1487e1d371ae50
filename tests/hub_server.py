"""A local stand-in for the Hugging Face Hub's file downloads, for tests only.

The zoo downloads with the real ``huggingface_hub.hf_hub_download`` (``try_to_load_from_cache`` only
reads the disk) and fetches ``url`` weight sources with its own resumable downloader. The tests point
both at this server on 127.0.0.1, which serves exactly what they ask for:

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``, the revision being ``main`` or a full commit
  sha: ``X-Repo-Commit`` (the commit the client pins its cache to), ``ETag`` (sha256 for LFS-stored
  weights, git blob sha1 for other files: the client names its cache blobs after it),
  ``Content-Length`` and ``Range: bytes=START-[END]`` (206, or 416 past the end).
* 404 with the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``),
  which the client turns into its own exceptions.
* Faults: a connection cut mid-body (``cut_after``) and a mirror serving other bytes (``tamper``).
* A log of every request (method, path, headers), to show when the network was used.

Nothing else: no ``/api/`` endpoints, tags, branches but ``main``, short shas or redirects to a CDN,
since the product never asks for them. No Xet header is ever sent, so the client stays on plain HTTP,
and every response closes its connection, so ``stop()`` joins every thread.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

__all__ = ["HubRepo", "HubServer", "hub_server", "isolate_hf_env", "no_retry_sleep"]

# Stored in git LFS under the Hub's default .gitattributes; the ETag of these is their sha256.
LFS_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag_for(path: str, data: bytes) -> str:
    """The ETag the Hub gives ``data`` stored at ``path``."""
    return hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else _git_blob_sha1(data)


class HubRepo:
    """An in-memory model repo: commits on ``main``, each still served by its full sha after ``main``
    moves on (what a pinned revision relies on)."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self._lock = threading.Lock()
        self._commits: dict[str, dict[str, bytes]] = {}  # sha -> {path: bytes}, oldest first
        self._head: str | None = None

    def add_commit(self, files: Mapping[str, bytes]) -> str:
        """Commit ``files`` on top of ``main`` (files not named carry over); return the new sha."""
        with self._lock:
            snapshot = {**(self._commits[self._head] if self._head else {}), **files}
            digest = hashlib.sha1(f"{self.repo_id}\0{self._head}\0{len(self._commits)}".encode())
            for path in sorted(snapshot):
                digest.update(f"\0{path}\0{_git_blob_sha1(snapshot[path])}".encode())
            self._head = digest.hexdigest()
            self._commits[self._head] = snapshot
            return self._head

    @property
    def commits(self) -> list[str]:
        with self._lock:
            return list(self._commits)

    def resolve(self, revision: str) -> str | None:
        """``main`` or a full sha → the commit sha; None for anything else."""
        with self._lock:
            if revision == "main":
                return self._head
            return revision if revision in self._commits else None

    def file(self, sha: str, path: str) -> bytes | None:
        with self._lock:
            return self._commits[sha].get(path)


@dataclass
class _Cut:
    offset: int
    remaining: int


@dataclass(frozen=True)
class _Tamper:
    data: bytes
    keep_etag: bool


class _NotFound(Exception):
    def __init__(self, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.code, self.message, self.commit = code, message, commit


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins the per-request threads
    allow_reuse_address = True

    def __init__(self, hub: HubServer):
        self.hub = hub
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # a stuck client holds a thread for at most this long
    server: _Listener

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_GET(self) -> None:
        self._serve("GET")

    def _serve(self, method: str) -> None:
        self.close_connection = True
        hub = self.server.hub
        hub._record(method, self.path, self.headers)
        try:
            hub._serve(self, method)
        except _NotFound as err:
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.commit:  # lets the client cache the file's absence at that commit
                headers["X-Repo-Commit"] = err.commit
            self.send(method, 404, headers, json.dumps({"error": err.message}).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send(self, method: str, status: int, headers: Mapping[str, str], body: bytes = b"",
             length: int | None = None) -> None:
        """Status and headers, then ``body`` unless HEAD; ``length`` announces more than is sent."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)


def _parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """``bytes=START-[END]`` → inclusive (start, end); None for no (or another kind of) Range header.

    ``ValueError`` for a start past the end (the caller answers 416).
    """
    unit, _, spec = (header or "").partition("=")
    first, dash, last = spec.partition("-")
    if unit.strip().lower() != "bytes" or not dash or not first.strip().isdigit():
        return None  # serving the whole body is always allowed (RFC 9110)
    start = int(first)
    end = min(int(last), total - 1) if last.strip().isdigit() else total - 1
    if start >= total or end < start:
        raise ValueError(f"range {header!r} outside {total} bytes")
    return start, end


class HubServer:
    """Serves ``HubRepo``s at ``self.url`` (``http://127.0.0.1:<free port>``); a context manager, or
    ``start()``/``stop()``."""

    def __init__(self) -> None:
        self._repos: dict[str, HubRepo] = {}
        self._lock = threading.Lock()
        self._log: list[tuple[str, str, Any]] = []
        self._cuts: dict[tuple[str, str], _Cut] = {}
        self._tampers: dict[tuple[str, str], _Tamper] = {}
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.cache_dir: Path | None = None  # set by the `hub_server` fixture

    def start(self) -> HubServer:
        if self._listener is None:
            self._listener = _Listener(self)
            self._thread = threading.Thread(target=self._listener.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="hub-server", daemon=True)
            self._thread.start()
            self.url = f"http://127.0.0.1:{self._listener.server_address[1]}"
        return self

    def stop(self) -> None:
        """Stop listening and join every server thread."""
        if self._listener is not None:
            self._listener.shutdown()
            self._listener.server_close()
            self._thread.join(timeout=10)
            self._listener = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def create_repo(self, repo_id: str) -> HubRepo:
        with self._lock:
            self._repos[repo_id] = HubRepo(repo_id)
            return self._repos[repo_id]

    # -- faults
    def cut_after(self, repo_id: str, path: str, offset: int, times: int = 1) -> None:
        """On the next ``times`` GETs of ``path`` whose body would pass file offset ``offset``, send the
        body up to that offset and drop the connection. The headers announce the full length, so the
        client sees a truncated body; a ranged GET starting at or after ``offset`` gets no body bytes."""
        with self._lock:
            self._cuts[(repo_id, path)] = _Cut(offset, times)

    def tamper(self, repo_id: str, path: str, data: bytes | None, *, keep_etag: bool = False) -> None:
        """Serve ``data`` instead of the committed bytes of ``path`` at every revision, like a corrupt
        mirror: sizes match the served bytes, and so does the ETag unless ``keep_etag`` (then it still
        claims the committed file's hash). ``data=None`` ends the tampering."""
        with self._lock:
            if data is None:
                self._tampers.pop((repo_id, path), None)
            else:
                self._tampers[(repo_id, path)] = _Tamper(bytes(data), keep_etag)

    def clear_faults(self) -> None:
        with self._lock:
            self._cuts.clear()
            self._tampers.clear()

    # -- the request log
    @property
    def requests(self) -> list[tuple[str, str, Any]]:
        """``(method, raw path with query, headers)`` per request, oldest first; ``headers`` is the
        request's ``http.client.HTTPMessage`` (case-insensitive ``.get``)."""
        with self._lock:
            return list(self._log)

    def requests_for(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, Any]]:
        """The logged requests with this method (any if None) whose path contains ``contains``."""
        return [r for r in self.requests if (method is None or r[0] == method) and contains in r[1]]

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    # -- serving (called from handler threads)
    def _record(self, method: str, path: str, headers: Any) -> None:
        with self._lock:
            self._log.append((method, path, headers))

    def _take_cut(self, repo_id: str, path: str, start: int, end: int) -> int | None:
        """The file offset at which to cut this body (using up one armed cut), or None."""
        with self._lock:
            cut = self._cuts.get((repo_id, path))
            if cut is None or end < cut.offset:
                return None
            cut.remaining -= 1
            if cut.remaining <= 0:
                del self._cuts[(repo_id, path)]
            return max(cut.offset, start)

    def _serve(self, h: _Handler, method: str) -> None:
        before, found, after = urlsplit(h.path).path.partition("/resolve/")
        revision, _, path = (unquote(part) for part in after.partition("/"))
        if not found or not path:
            raise _NotFound(None, "Not Found")
        repo_id = unquote(before.lstrip("/"))
        with self._lock:
            repo, tampered = self._repos.get(repo_id), self._tampers.get((repo_id, path))
        if repo is None:
            raise _NotFound("RepoNotFound", "Repository not found")
        sha = repo.resolve(revision)
        if sha is None:
            raise _NotFound("RevisionNotFound", f"Invalid rev id: {revision}")
        committed = repo.file(sha, path)
        if committed is None:
            raise _NotFound("EntryNotFound", f'{path} does not exist on "{revision}"', commit=sha)
        data = committed if tampered is None else tampered.data
        etag = etag_for(path, committed if tampered is not None and tampered.keep_etag else data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        try:
            ranged = _parse_range(h.headers.get("Range"), len(data))
        except ValueError:
            h.send(method, 416, {**headers, "Content-Range": f"bytes */{len(data)}"})
            return
        start, end = ranged or (0, len(data) - 1)
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        status = 206 if ranged else 200
        cut_at = None if method == "HEAD" else self._take_cut(repo_id, path, start, end)
        if cut_at is None:
            h.send(method, status, headers, data[start:end + 1])
            return
        h.send(method, status, headers, data[start:cut_at], length=end - start + 1)
        h.wfile.flush()
        try:
            h.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass


# ------------------------------------------------------------------------------------ test helpers


def isolate_hf_env(monkeypatch: pytest.MonkeyPatch, hf_home: Path, endpoint: str | None = None) -> Path:
    """Point every huggingface_hub path at ``hf_home`` and cut it off from the real Hub.

    ``huggingface_hub.constants`` reads its environment once, at import, so setting ``HF_HOME``,
    ``HF_HUB_CACHE`` or ``HF_ENDPOINT`` after import changes nothing in this process: the module
    attributes are patched as well (the env vars are set for subprocesses). Also: no token
    (``HF_TOKEN`` unset, token file in ``hf_home``), offline mode off, telemetry off (with it on,
    the first download of a process fetches ``{ENDPOINT}/api/agent-harnesses``, which this server
    does not serve). With ``endpoint``, ``constants.ENDPOINT`` and the URL template point there, as
    if the process had started with ``HF_ENDPOINT=endpoint``, so a call that forgets ``endpoint=``
    still cannot reach huggingface.co. Returns the hub cache dir.
    """
    from huggingface_hub import constants

    hf_home = Path(hf_home)
    cache = hf_home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(var, raising=False)
    env = {"HF_HOME": hf_home, "HF_HUB_CACHE": cache, "HF_ASSETS_CACHE": hf_home / "assets",
           "HF_XET_CACHE": hf_home / "xet", "HF_TOKEN_PATH": hf_home / "token",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    attrs: dict[str, Any] = {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    if endpoint is not None:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        attrs["ENDPOINT"] = endpoint
        attrs["HUGGINGFACE_CO_URL_TEMPLATE"] = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    for name, value in attrs.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    return cache


class _RecordingTime:
    """Stands in for ``time`` inside huggingface_hub: ``sleep`` is recorded, not slept."""

    def __init__(self, sleeps: list[float]):
        self._sleeps = sleeps

    def sleep(self, seconds: float) -> None:
        self._sleeps.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def no_retry_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make huggingface_hub's retry back-off instant; yields the list of sleeps it asked for."""
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    sleeps: list[float] = []
    monkeypatch.setattr(file_download, "time", _RecordingTime(sleeps))
    monkeypatch.setattr(_http, "time", _RecordingTime(sleeps))
    return sleeps


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A started ``HubServer`` (no repos yet: ``hub_server.create_repo(...)``) with an isolated HF
    home under ``tmp_path`` (``hub_server.cache_dir`` is the hub cache; it is also the client's
    default), stopped and all threads joined afterwards."""
    from huggingface_hub import close_session

    server = HubServer().start()
    try:
        server.cache_dir = isolate_hf_env(monkeypatch, tmp_path / "hf_home", endpoint=server.url)
        yield server
    finally:
        server.stop()
        close_session()  # drop the client's pooled connections to the dead port
