"""A local stand-in for the Hugging Face Hub file protocol, for tests only.

The model zoo downloads weights with the real ``huggingface_hub.hf_hub_download``. These tests run
that real client against this server (``endpoint=server.url``), which speaks the part of the Hub's
HTTP protocol the client uses for downloads:

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: ``X-Repo-Commit`` (the resolved commit),
  ``ETag`` (git blob sha1 for regular files; sha256 for LFS files, also sent as ``X-Linked-Etag``
  with ``X-Linked-Size``), ``Content-Length``, ``Accept-Ranges`` and ``Range``/206/416.
  Unknown repo / revision / file give 404 with the Hub's ``X-Error-Code`` header
  (``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``), which the client maps to its own
  exceptions.
* optionally (``HubServer(lfs_redirect=True)``) LFS files answer ``/resolve`` with a 302 to a
  second listener on another 127.0.0.1 port, like the Hub's redirect to its CDN;
* ``GET /api/models/{repo_id}[/revision/{rev}]`` and ``/api/models/{repo_id}/tree/{rev}[/{path}]``
  (used by ``snapshot_download``) and ``/api/agent-harnesses`` (an empty registry).

No ``X-Xet-*`` header and no ``Link: <...>; rel="xet-auth"`` header is ever sent, so the client
always takes its plain-HTTP path and never Xet. Every response carries ``Connection: close``, so
no idle keep-alive connection outlives a request and ``stop()`` joins every thread.

Written with the standard library only (``http.server`` + ``threading``).
"""

from __future__ import annotations

import fnmatch
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
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

__all__ = [
    "DEFAULT_LFS_PATTERNS",
    "HubRepo",
    "HubServer",
    "hub_server",
    "isolate_hf_env",
    "no_retry_sleep",
]

# The Hub's default .gitattributes puts these in LFS; the rest are regular git blobs.
DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.h5", "*.msgpack",
    "*.npy", "*.npz", "*.pkl", "*.pickle", "*.gz", "*.tar", "*.zip", "*.nii", "*.nii.gz",
)
_LFS_POINTER_SIZE = 134  # typical size of a git-lfs pointer file, reported in tree listings


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


# --------------------------------------------------------------------------------------------- repo


@dataclass(frozen=True)
class _FileView:
    """What the server sends for one file at one commit."""

    data: bytes
    etag: str  # unquoted
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)


class HubRepo:
    """An in-memory model repo with git-like history.

    ``add_commit`` applies changes on top of the branch's latest commit (files not named carry
    over; map a path to ``None`` to delete it) and returns the new 40-hex commit sha. A branch
    points at its latest commit; every commit stays reachable by its sha (full, or a unique prefix
    of 7+ characters), so a pinned sha keeps serving the old bytes after the branch moves on.
    """

    def __init__(self, repo_id: str, *, lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS):
        if not repo_id or repo_id.startswith("/") or repo_id.count("/") > 1:
            raise ValueError(f"invalid repo id {repo_id!r}: expected 'name' or 'namespace/name'")
        self.repo_id = repo_id
        self.lfs_patterns = tuple(lfs_patterns)
        self._lock = threading.RLock()
        self._commits: dict[str, dict[str, bytes]] = {}  # sha -> full snapshot {path: bytes}
        self._order: list[str] = []
        self._refs: dict[str, str] = {}  # branch or tag name -> sha

    # -- writing
    def add_commit(self, files: Mapping[str, bytes | None], branch: str = "main") -> str:
        """Commit ``files`` on ``branch`` (created from nothing if new); return the commit sha."""
        for path, data in files.items():
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"invalid path in repo: {path!r}")
            if data is not None and not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"file {path!r}: expected bytes or None, got {type(data).__name__}")
        with self._lock:
            parent = self._refs.get(branch)
            snapshot = dict(self._commits[parent]) if parent else {}
            for path, data in files.items():
                if data is None:
                    snapshot.pop(path, None)
                else:
                    snapshot[path] = bytes(data)
            digest = hashlib.sha1()
            digest.update(f"{self.repo_id}\0{branch}\0{parent}\0{len(self._order)}\0".encode())
            for path in sorted(snapshot):
                digest.update(f"{path}\0{_git_blob_sha1(snapshot[path])}\0".encode())
            sha = digest.hexdigest()
            self._commits[sha] = snapshot
            self._order.append(sha)
            self._refs[branch] = sha
            return sha

    def tag(self, name: str, revision: str = "main") -> str:
        """Point tag ``name`` at ``revision``; return the commit sha."""
        with self._lock:
            sha = self.resolve(revision)
            if sha is None:
                raise KeyError(f"unknown revision {revision!r}")
            self._refs[name] = sha
            return sha

    # -- reading
    @property
    def commits(self) -> list[str]:
        """All commit shas, oldest first."""
        with self._lock:
            return list(self._order)

    def head(self, branch: str = "main") -> str:
        with self._lock:
            return self._refs[branch]

    def resolve(self, revision: str) -> str | None:
        """Branch/tag name, full sha or unique sha prefix (7+ chars) -> full sha, else None."""
        with self._lock:
            if revision in self._refs:
                return self._refs[revision]
            rev = revision.lower()
            if rev in self._commits:
                return rev
            if 7 <= len(rev) < 40 and _is_hex(rev):
                hits = [sha for sha in self._order if sha.startswith(rev)]
                if len(hits) == 1:
                    return hits[0]
            return None

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """The full snapshot at ``revision`` (a copy)."""
        with self._lock:
            sha = self.resolve(revision)
            if sha is None:
                raise KeyError(f"unknown revision {revision!r}")
            return dict(self._commits[sha])

    def is_lfs(self, path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(path, pat)
                   for pat in self.lfs_patterns)

    def etag_for(self, path: str, data: bytes) -> str:
        """The ETag the Hub gives ``data`` stored at ``path``: sha256 if LFS, else git blob sha1."""
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else _git_blob_sha1(data)

    def _lookup(self, sha: str, path: str) -> bytes | None:
        with self._lock:
            return self._commits[sha].get(path)


# ------------------------------------------------------------------------------------------- server


@dataclass
class _Cut:
    nbytes: int
    remaining: int


@dataclass(frozen=True)
class _Tamper:
    data: bytes
    keep_etag: bool


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins the per-request threads
    allow_reuse_address = True

    def __init__(self, hub: HubServer, role: str):
        self.hub = hub
        self.role = role  # "hub" or "cdn"
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 5  # socket timeout: a stuck client can hold a thread for at most this long
    server: _Listener

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def _refuse(self) -> None:
        self._dispatch(self.command)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    # -- plumbing
    def _dispatch(self, method: str) -> None:
        self.close_connection = True
        hub = self.server.hub
        hub._record(method, self.path, self.headers)
        try:
            if self.server.role == "cdn":
                hub._serve_cdn(self, method)
            else:
                hub._serve_hub(self, method)
        except _Error as err:
            self._send_error(method, err)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_error(self, method: str, err: _Error) -> None:
        body = json.dumps({"error": err.message}).encode()
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._send(method, err.status, headers, body)

    def _send(self, method: str, status: int, headers: Mapping[str, str],
              body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, method: str, payload: Any,
                   headers: Mapping[str, str] | None = None) -> None:
        self._send(method, 200, {"Content-Type": "application/json", **(headers or {})},
                   json.dumps(payload).encode())

    def _send_file(self, method: str, repo_id: str, path: str, view: _FileView,
                   headers: Mapping[str, str]) -> None:
        """200/206/416 for ``view.data``, honouring ``Range`` and any cut armed for the file."""
        total = view.size
        start, end = 0, total - 1
        status = 200
        out = dict(headers)
        out.update({"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        rng = _parse_range(self.headers.get("Range"), total)
        if rng == "unsatisfiable":
            self._send(method, 416, {**out, "Content-Range": f"bytes */{total}"})
            return
        if rng is not None:
            start, end = rng
            status = 206
            out["Content-Range"] = f"bytes {start}-{end}/{total}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        for key, value in out.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        if method == "HEAD":
            return
        cut_at = self.server.hub._take_cut(repo_id, path, start, end)
        if cut_at is None:
            self.wfile.write(view.data[start : end + 1])
            return
        # Send the body up to file offset `cut_at`, then drop the connection mid-body.
        self.wfile.write(view.data[start:cut_at])
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _parse_range(header: str | None, total: int) -> tuple[int, int] | str | None:
    """``(start, end)`` inclusive, ``"unsatisfiable"``, or None to serve the whole file."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # unsupported: serving the whole body is allowed by RFC 9110
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first.strip() == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return max(total - suffix, 0), total - 1
        start = int(first)
        end = int(last) if last.strip() else total - 1
    except ValueError:
        return None
    if start >= total or end < start:
        return "unsatisfiable"
    return start, min(end, total - 1)


class HubServer:
    """Serves ``HubRepo``s at ``http://127.0.0.1:<free port>``; use as a context manager or
    ``start()``/``stop()``.

    ``lfs_redirect=True`` (an attribute; may be flipped while running) makes LFS files answer
    ``/resolve`` with a 302 to a second listener (``cdn_url``: another port, hence another origin,
    as the Hub's CDN is): the client then reads the metadata from the 302 itself and fetches the
    bytes from the CDN without the auth header.
    """

    def __init__(self, *repos: HubRepo, lfs_redirect: bool = False):
        self.lfs_redirect = lfs_redirect
        self._repos: dict[str, HubRepo] = {}
        self._lock = threading.Lock()
        self._log: list[tuple[str, str, Any]] = []
        self._cuts: dict[tuple[str, str], _Cut] = {}
        self._tampers: dict[tuple[str, str], _Tamper] = {}
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []
        self.url = ""
        self.cdn_url = ""
        self.cache_dir: Path | None = None  # set by the `hub_server` fixture
        for repo in repos:
            self.add_repo(repo)

    # -- lifecycle
    def start(self) -> HubServer:
        if self._listeners:
            return self
        for role in ("hub", "cdn"):
            listener = _Listener(self, role)
            thread = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"hub-server-{role}", daemon=True)
            thread.start()
            self._listeners.append(listener)
            self._threads.append(thread)
        self.url, self.cdn_url = (f"http://127.0.0.1:{lst.server_address[1]}"
                                  for lst in self._listeners)
        return self

    def stop(self) -> None:
        """Stop listening and join every server thread (bounded by the handler socket timeout)."""
        for listener in self._listeners:
            listener.shutdown()
            listener.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._listeners.clear()
        self._threads.clear()

    @property
    def running(self) -> bool:
        return bool(self._listeners)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- repos
    def add_repo(self, repo: HubRepo) -> HubRepo:
        with self._lock:
            self._repos[repo.repo_id] = repo
        return repo

    def create_repo(self, repo_id: str, **kwargs: Any) -> HubRepo:
        return self.add_repo(HubRepo(repo_id, **kwargs))

    def repo(self, repo_id: str) -> HubRepo:
        return self._repos[repo_id]

    # -- fault injection
    def cut_after(self, repo_id: str, path: str, nbytes: int, times: int = 1) -> None:
        """Drop the connection once a GET body of ``path`` reaches file offset ``nbytes``, on the
        next ``times`` GETs that would cross that offset. The headers announce the full length, so
        the client sees a truncated body. A ranged GET starting at or after ``nbytes`` is cut right
        after its headers (0 body bytes)."""
        if nbytes < 0 or times < 0:
            raise ValueError("nbytes and times must be >= 0")
        with self._lock:
            if times:
                self._cuts[(repo_id, path)] = _Cut(nbytes, times)
            else:
                self._cuts.pop((repo_id, path), None)

    def tamper(self, repo_id: str, path: str, data: bytes | None, *,
               keep_etag: bool = False) -> None:
        """Serve ``data`` instead of the committed bytes of ``path`` (every revision), like a
        corrupted mirror. Sizes (``Content-Length``, ``X-Linked-Size``, ``Content-Range``) always
        match the served bytes, so the transfer looks healthy; ``ETag``/``X-Linked-Etag`` are
        computed from the served bytes too, unless ``keep_etag=True`` (the mirror then still claims
        the committed file's identity). ``data=None`` removes the tampering."""
        with self._lock:
            if data is None:
                self._tampers.pop((repo_id, path), None)
            else:
                self._tampers[(repo_id, path)] = _Tamper(bytes(data), keep_etag)

    def clear_faults(self) -> None:
        with self._lock:
            self._cuts.clear()
            self._tampers.clear()

    # -- observation
    @property
    def requests(self) -> list[tuple[str, str, Any]]:
        """``(method, raw path with query, headers)`` per request seen, oldest first; ``headers``
        is the request's ``http.client.HTTPMessage`` (case-insensitive ``.get``)."""
        with self._lock:
            return list(self._log)

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def requests_for(self, method: str | None = None,
                     contains: str = "") -> list[tuple[str, str, Any]]:
        """The logged requests with this method (any if None) whose path contains ``contains``."""
        return [r for r in self.requests if (method is None or r[0] == method) and contains in r[1]]

    # -- internals (called from handler threads)
    def _record(self, method: str, path: str, headers: Any) -> None:
        with self._lock:
            self._log.append((method, path, headers))

    def _take_cut(self, repo_id: str, path: str, start: int, end: int) -> int | None:
        """File offset at which to cut this GET body (consuming one armed cut), or None."""
        with self._lock:
            cut = self._cuts.get((repo_id, path))
            if cut is None or end < cut.nbytes:
                return None
            cut.remaining -= 1
            if cut.remaining <= 0:
                del self._cuts[(repo_id, path)]
            return max(cut.nbytes, start)

    def _view(self, repo: HubRepo, sha: str, path: str) -> _FileView | None:
        data = repo._lookup(sha, path)
        if data is None:
            return None
        with self._lock:
            tampered = self._tampers.get((repo.repo_id, path))
        if tampered is None:
            return _FileView(data, repo.etag_for(path, data), repo.is_lfs(path))
        etag = repo.etag_for(path, data if tampered.keep_etag else tampered.data)
        return _FileView(tampered.data, etag, repo.is_lfs(path))

    def _resolve(self, repo_id: str, revision: str) -> tuple[HubRepo, str]:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise _Error(404, "RepoNotFound", "Repository not found")
        sha = repo.resolve(revision)
        if sha is None:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, sha

    def _serve_hub(self, h: _Handler, method: str) -> None:
        raw_path = urlsplit(h.path).path
        if raw_path.startswith("/api/"):
            self._serve_api(h, method)
            return
        if method not in ("GET", "HEAD"):
            raise _Error(405, None, f"{method} not supported by this test server")
        before, sep, after = raw_path.partition("/resolve/")
        revision_q, slash, file_q = after.partition("/")
        if not sep or not slash or not file_q:
            raise _Error(404, None, "Not Found")
        repo_id = unquote(before.lstrip("/"))
        revision, path = unquote(revision_q), unquote(file_q)
        repo, sha = self._resolve(repo_id, revision)
        view = self._view(repo, sha, path)
        if view is None:
            raise _Error(404, "EntryNotFound", f'{path} does not exist on "{revision}"',
                         commit=sha)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{view.etag}"'}
        if view.lfs:
            headers["X-Linked-Etag"] = f'"{view.etag}"'
            headers["X-Linked-Size"] = str(view.size)
            if self.lfs_redirect:
                location = f"{self.cdn_url}/cdn-lfs/{quote(repo_id)}/{sha}/{quote(path)}"
                body = f"Found. Redirecting to {location}".encode()
                h._send(method, 302, {**headers, "Location": location,
                                      "Content-Type": "text/plain; charset=utf-8"}, body)
                return
        h._send_file(method, repo_id, path, view, headers)

    def _serve_cdn(self, h: _Handler, method: str) -> None:
        parts = urlsplit(h.path).path.split("/")
        # /cdn-lfs/{repo_id (1 or 2 segments)}/{sha}/{path...}
        if method not in ("GET", "HEAD") or len(parts) < 4 or parts[1] != "cdn-lfs":
            raise _Error(404, None, "Not Found")
        rest = parts[2:]
        sha_at = next((i for i, p in enumerate(rest[:3]) if len(p) == 40 and _is_hex(p)), None)
        if sha_at is None or sha_at == 0 or sha_at == len(rest) - 1:
            raise _Error(404, None, "Not Found")
        repo_id = unquote("/".join(rest[:sha_at]))
        path = unquote("/".join(rest[sha_at + 1 :]))
        repo, sha = self._resolve(repo_id, rest[sha_at])
        view = self._view(repo, sha, path)
        if view is None:
            raise _Error(404, None, "Not Found")
        name = quote(path.rsplit("/", 1)[-1])
        headers = {"ETag": f'"{view.etag}"',
                   "Content-Disposition": f"inline; filename*=UTF-8''{name};"}
        h._send_file(method, repo_id, path, view, headers)

    def _serve_api(self, h: _Handler, method: str) -> None:
        split = urlsplit(h.path)
        query = parse_qs(split.query)
        segments = [unquote(s) for s in split.path.split("/")[2:]]  # after "/api/"
        if method != "GET":
            raise _Error(405, None, f"{method} not supported by this test server")
        if segments == ["agent-harnesses"]:
            h._send_json(method, {"standardEnvVars": [], "harnesses": {}})
            return
        if not segments or segments[0] != "models":
            raise _Error(404, None, "Not Found")
        rest = segments[1:]
        kind_at = next((i for i in (1, 2) if i < len(rest) and rest[i] in ("revision", "tree")),
                       None)
        repo_id = "/".join(rest if kind_at is None else rest[:kind_at])
        if kind_at is None:
            repo, sha = self._resolve(repo_id, "main")
            h._send_json(method, self._model_info(repo, sha))
            return
        kind, tail = rest[kind_at], rest[kind_at + 1 :]
        if not tail:
            raise _Error(404, None, "Not Found")
        repo, sha = self._resolve(repo_id, tail[0])
        if kind == "revision":
            h._send_json(method, self._model_info(repo, sha))
            return
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        h._send_json(method, self._tree(repo, sha, "/".join(tail[1:]).strip("/"), recursive))

    def _model_info(self, repo: HubRepo, sha: str) -> dict[str, Any]:
        files = repo.files(sha)
        return {"_id": sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": sha,
                "private": False, "disabled": False, "gated": False, "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(files)]}

    def _tree(self, repo: HubRepo, sha: str, base: str, recursive: bool) -> list[dict[str, Any]]:
        files = repo.files(sha)
        prefix = f"{base}/" if base else ""
        if base and base in files:
            raise _Error(404, "EntryNotFound", f"{base} is a file, not a folder", commit=sha)
        under = {p: d for p, d in files.items() if p.startswith(prefix)}
        if base and not under:
            raise _Error(404, "EntryNotFound", f"{base} does not exist", commit=sha)
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted(under):
            rel = path[len(prefix):].split("/")
            for depth in range(1, len(rel)):
                folder = prefix + "/".join(rel[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder,
                                                "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                                "size": 0})
            if recursive or len(rel) == 1:
                view = self._view(repo, sha, path)
                assert view is not None
                entry: dict[str, Any] = {"type": "file", "path": path, "size": view.size,
                                         "oid": _git_blob_sha1(view.data)}
                if view.lfs:
                    entry["lfs"] = {"oid": view.etag, "size": view.size,
                                    "pointerSize": _LFS_POINTER_SIZE}
                entries[path] = entry
        return list(entries.values())


# ------------------------------------------------------------------------------------ test helpers


def isolate_hf_env(monkeypatch: pytest.MonkeyPatch, hf_home: Path,
                   endpoint: str | None = None) -> Path:
    """Point every huggingface_hub path at ``hf_home`` and cut it off from the real Hub.

    ``huggingface_hub.constants`` reads its environment once, at import, so setting ``HF_HOME``,
    ``HF_HUB_CACHE`` or ``HF_ENDPOINT`` after import changes nothing in this process: the module
    attributes are patched as well (the env vars are set for subprocesses). Also: no token
    (``HF_TOKEN`` unset, token file in ``hf_home``), offline mode off, telemetry off (with it on,
    the first download of a process fetches ``{ENDPOINT}/api/agent-harnesses`` and caches it
    under ``HF_HOME``). With ``endpoint``, ``constants.ENDPOINT`` and the URL template point
    there, as if the process had started with ``HF_ENDPOINT=endpoint``, so a call that forgets
    ``endpoint=`` still cannot reach huggingface.co. Returns the hub cache dir.
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
