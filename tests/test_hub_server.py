"""The local hub server is faithful: the REAL huggingface_hub client downloads from it.

Every test drives ``huggingface_hub.hf_hub_download`` against
``tests/hub_server.py`` on 127.0.0.1 and checks both what the client returns and which requests
it sent, so the facts the model zoo relies on (what is cached, when the network is used, how a
cut transfer is retried, which exception means what) are pinned to the installed client.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .hub_server import HubServer

REPO = "factorizer/test-model"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MiB = 1024 * 1024


def _blob(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes (so a shifted or truncated copy never matches)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def _download(server: HubServer, filename: str = WEIGHTS, **kwargs) -> str:
    kwargs.setdefault("cache_dir", server.cache_dir)
    return hf_hub_download(REPO, filename, endpoint=server.url, **kwargs)


def _methods(server: HubServer) -> list[str]:
    return [method for method, _, _ in server.requests]


def _gets(server: HubServer) -> list[tuple[str, str, object]]:
    return server.requests_for("GET")


def _repo_cache(server: HubServer) -> Path:
    return Path(server.cache_dir) / "models--factorizer--test-model"


# ------------------------------------------------------------------------------ download and cache


def test_first_download_returns_the_bytes_and_fills_the_cache(hub_server):
    weights, config = _blob(1, 4096), b'{"in_channels": 4}'
    sha = hub_server.create_repo(REPO).add_commit({WEIGHTS: weights, CONFIG: config})

    path = Path(_download(hub_server))
    assert path.read_bytes() == weights
    # Hub cache layout: snapshots/<commit>/<file> -> blobs/<etag>; refs/main holds the commit.
    assert path == _repo_cache(hub_server) / "snapshots" / sha / WEIGHTS
    assert path.resolve().name == hashlib.sha256(weights).hexdigest()  # LFS file: etag = sha256
    assert (_repo_cache(hub_server) / "refs" / "main").read_text() == sha
    assert _methods(hub_server) == ["HEAD", "GET"]
    head_headers = hub_server.requests[0][2]
    assert head_headers.get("Accept-Encoding") == "identity"
    assert head_headers.get("X-HF-Download-Counter") == "1"

    config_path = Path(_download(hub_server, CONFIG))
    assert config_path.read_bytes() == config
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    assert config_path.resolve().name == git_sha1  # regular git file: etag = git blob sha1
    assert not list((_repo_cache(hub_server) / "blobs").glob("*.incomplete"))


def test_second_call_on_a_branch_sends_one_head_and_no_get(hub_server):
    hub_server.create_repo(REPO).add_commit({WEIGHTS: _blob(2, 1000)})
    first = _download(hub_server)
    hub_server.reset_log()

    assert _download(hub_server) == first
    # A branch must be re-resolved: the client asks HEAD /resolve/main/... for the commit + etag,
    # finds the snapshot pointer, and downloads nothing.
    seen = [(m, p) for m, p, _ in hub_server.requests]
    assert seen == [("HEAD", f"/{REPO}/resolve/main/{WEIGHTS}")]


def test_second_call_pinned_to_a_sha_or_offline_sends_nothing(hub_server):
    sha = hub_server.create_repo(REPO).add_commit({WEIGHTS: _blob(3, 1000)})
    first = _download(hub_server, revision=sha)
    hub_server.reset_log()

    assert _download(hub_server, revision=sha) == first  # full sha + cached => no request at all
    assert _download(hub_server, revision=sha, local_files_only=True) == first
    # A download by sha writes no refs/main, so "main" cannot be resolved offline.
    assert not (_repo_cache(hub_server) / "refs").exists()
    with pytest.raises(LocalEntryNotFoundError):
        _download(hub_server, local_files_only=True)
    assert hub_server.requests == []

    _download(hub_server)  # online by branch: HEAD, no GET (blob known), writes refs/main
    assert _methods(hub_server) == ["HEAD"]
    hub_server.reset_log()
    assert _download(hub_server, local_files_only=True) == first  # refs/main -> sha, from disk
    assert hub_server.requests == []


def test_local_files_only_without_the_file_raises_the_offline_error(hub_server):
    hub_server.create_repo(REPO).add_commit({WEIGHTS: b"w"})
    with pytest.raises(LocalEntryNotFoundError) as err:
        _download(hub_server, local_files_only=True)
    assert isinstance(err.value, EntryNotFoundError) and isinstance(err.value, FileNotFoundError)
    assert hub_server.requests == []


# ------------------------------------------------------------------------------ revision pinning


def test_a_pinned_sha_keeps_the_old_bytes_after_main_moves_on(hub_server, tmp_path):
    repo = hub_server.create_repo(REPO)
    old_sha = repo.add_commit({WEIGHTS: b"old weights", CONFIG: b"{}"})
    assert Path(_download(hub_server)).read_bytes() == b"old weights"
    new_sha = repo.add_commit({WEIGHTS: b"new weights"})
    assert new_sha != old_sha and repo.commits == [old_sha, new_sha]

    # Same cache: main now resolves to the new commit, the old sha is still served from disk.
    assert Path(_download(hub_server)).read_bytes() == b"new weights"
    assert (_repo_cache(hub_server) / "refs" / "main").read_text() == new_sha
    assert Path(_download(hub_server, revision=old_sha)).read_bytes() == b"old weights"
    # Files not touched by a commit carry over.
    assert Path(_download(hub_server, CONFIG, revision=new_sha)).read_bytes() == b"{}"

    # Fresh cache: the server itself serves the old bytes by full sha.
    fresh = tmp_path / "fresh"
    hub_server.reset_log()
    def fresh_bytes(revision: str) -> bytes:
        return Path(_download(hub_server, revision=revision, cache_dir=fresh)).read_bytes()

    assert fresh_bytes(old_sha) == b"old weights"
    assert hub_server.requests[0][1] == f"/{REPO}/resolve/{old_sha}/{WEIGHTS}"
    assert fresh_bytes("main") == b"new weights"


# ------------------------------------------------------------------------------- cut connections


def test_a_cut_mid_file_is_retried_by_the_client_with_a_range_request(hub_server, no_retry_sleep):
    # huggingface_hub 2.4.0 writes the body in DOWNLOAD_CHUNK_SIZE (10 MiB) chunks; bytes past the
    # last whole chunk are lost when the connection drops, so it resumes from the chunk boundary.
    assert constants.DOWNLOAD_CHUNK_SIZE == 10 * MiB
    data = _blob(4, 12 * MiB)
    hub_server.create_repo(REPO).add_commit({WEIGHTS: data})
    hub_server.cut_after(REPO, WEIGHTS, 11 * MiB)

    path = _download(hub_server)  # no exception: the client retried by itself

    assert Path(path).read_bytes() == data
    gets = _gets(hub_server)
    assert [h.get("Range") for _, _, h in gets] == [None, f"bytes={10 * MiB}-"]
    assert _methods(hub_server) == ["HEAD", "GET", "GET"]
    assert no_retry_sleep == [1]  # one fixed 1 s pause before the resume
    assert not list((_repo_cache(hub_server) / "blobs").glob("*.incomplete"))


def test_a_cut_in_a_small_file_restarts_it_from_zero(hub_server, no_retry_sleep):
    data = _blob(5, 5000)
    hub_server.create_repo(REPO).add_commit({WEIGHTS: data})
    hub_server.cut_after(REPO, WEIGHTS, 2500)

    assert Path(_download(hub_server)).read_bytes() == data
    # Under 10 MiB nothing reached the file before the cut: the retry carries no Range header.
    assert [h.get("Range") for _, _, h in _gets(hub_server)] == [None, None]
    assert no_retry_sleep == [1]


def test_a_persistent_cut_raises_and_the_next_call_starts_over(hub_server, no_retry_sleep):
    data = _blob(6, 12 * MiB)
    hub_server.create_repo(REPO).add_commit({WEIGHTS: data})
    # 1 GET + 5 retries without progress exhaust the client's budget.
    hub_server.cut_after(REPO, WEIGHTS, 11 * MiB, times=6)

    with pytest.raises(httpx2.RemoteProtocolError):
        _download(hub_server)

    ranges = [h.get("Range") for _, _, h in _gets(hub_server)]
    assert ranges == [None] + [f"bytes={10 * MiB}-"] * 5
    assert no_retry_sleep == [1] * 5
    # The partial file is per-process-unique (<etag>.<uuid>.incomplete) and deleted on failure,
    # and no snapshot pointer was made: nothing survives for a later call to resume from.
    blobs = _repo_cache(hub_server) / "blobs"
    assert list(blobs.iterdir()) == []
    assert not (_repo_cache(hub_server) / "snapshots").exists() or not any(
        (_repo_cache(hub_server) / "snapshots").rglob(WEIGHTS))

    hub_server.reset_log()
    assert Path(_download(hub_server)).read_bytes() == data
    assert [h.get("Range") for _, _, h in _gets(hub_server)] == [None]  # full re-download


def test_identical_content_is_not_downloaded_twice(hub_server):
    # Blobs are keyed by etag (sha256 for LFS): the same bytes under another name or commit
    # need only the HEAD.
    data = _blob(7, 3000)
    repo = hub_server.create_repo(REPO)
    repo.add_commit({WEIGHTS: data})
    first = Path(_download(hub_server))
    repo.add_commit({"copy.safetensors": data})
    hub_server.reset_log()
    copy = Path(_download(hub_server, "copy.safetensors"))
    assert _methods(hub_server) == ["HEAD"]
    assert copy.resolve() == first.resolve() and copy.read_bytes() == data


# ------------------------------------------------------------------------------------ not found


def test_unknown_repo_file_and_revision_raise_the_clients_own_errors(hub_server):
    sha = hub_server.create_repo(REPO).add_commit({WEIGHTS: b"w"})

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/missing", WEIGHTS, endpoint=hub_server.url,
                        cache_dir=hub_server.cache_dir)
    with pytest.raises(RevisionNotFoundError):
        _download(hub_server, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        _download(hub_server, revision="0" * 40)
    with pytest.raises(RemoteEntryNotFoundError) as err:
        _download(hub_server, "missing.safetensors")
    assert isinstance(err.value, EntryNotFoundError)
    # One HEAD each, never a GET, never a retry.
    assert _methods(hub_server) == ["HEAD"] * 4
    # EntryNotFound carries X-Repo-Commit, so the client caches the file's absence for that commit.
    assert (_repo_cache(hub_server) / ".no_exist" / sha / "missing.safetensors").is_file()


def test_error_responses_carry_the_hub_error_headers(hub_server):
    hub_server.create_repo(REPO).add_commit({WEIGHTS: b"w"})
    cases = {
        f"/nobody/missing/resolve/main/{WEIGHTS}": "RepoNotFound",
        f"/{REPO}/resolve/nope/{WEIGHTS}": "RevisionNotFound",
        f"/{REPO}/resolve/main/nope.bin": "EntryNotFound",
    }
    for path, code in cases.items():
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(hub_server.url + path, timeout=5)
        assert err.value.code == 404 and err.value.headers["X-Error-Code"] == code
        err.value.close()


# ---------------------------------------------------------------------------------- wire details


def _raw(server: HubServer, path: str, method: str = "GET", **headers: str):
    request = urllib.request.Request(server.url + path, method=method, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=5)
    except urllib.error.HTTPError as err:
        response = err
    with response:
        return response.status, dict(response.headers), response.read()


def test_head_and_range_requests(hub_server):
    data = _blob(8, 100)
    sha = hub_server.create_repo(REPO).add_commit({WEIGHTS: data})
    url = f"/{REPO}/resolve/main/{WEIGHTS}"

    status, headers, body = _raw(hub_server, url, "HEAD")
    assert (status, body) == (200, b"")
    assert headers["X-Repo-Commit"] == sha
    assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"' and headers["Content-Length"] == "100"
    assert headers["Accept-Ranges"] == "bytes"
    assert not [k for k in headers if k.lower().startswith("x-xet") or k.lower() == "link"]

    assert _raw(hub_server, url, Range="bytes=10-19")[::2] == (206, data[10:20])
    status, headers, body = _raw(hub_server, url, Range="bytes=90-")
    assert (status, body, headers["Content-Range"]) == (206, data[90:], "bytes 90-99/100")
    assert _raw(hub_server, url, Range="bytes=95-200")[::2] == (206, data[95:])
    status, headers, _ = _raw(hub_server, url, Range="bytes=100-")
    assert (status, headers["Content-Range"]) == (416, "bytes */100")


def test_the_client_never_takes_the_xet_path(hub_server):
    hub_server.create_repo(REPO).add_commit({WEIGHTS: b"w" * 10})
    meta = get_hf_file_metadata(hf_hub_url(REPO, WEIGHTS, endpoint=hub_server.url))
    assert meta.xet_file_data is None
    assert (meta.size, meta.etag) == (10, hashlib.sha256(b"w" * 10).hexdigest())


# --------------------------------------------------------------------------------------- tamper


def test_tampered_bytes_are_accepted_silently_by_the_client(hub_server, tmp_path):
    good, bad = _blob(11, 2000), _blob(12, 1500)
    hub_server.create_repo(REPO).add_commit({WEIGHTS: good})

    hub_server.tamper(REPO, WEIGHTS, bad)
    path = Path(_download(hub_server))
    # Sizes and etag match what is served, so the client stores it without complaint: it does not
    # hash what it downloads. The zoo must check sha256 itself.
    assert path.read_bytes() == bad
    assert path.resolve().name == hashlib.sha256(bad).hexdigest()

    hub_server.tamper(REPO, WEIGHTS, bad, keep_etag=True)
    lying = Path(_download(hub_server, cache_dir=tmp_path / "lying"))
    # The mirror keeps claiming the committed file's sha256: the cache blob is NAMED after the
    # good hash but HOLDS the bad bytes. Blob names prove nothing.
    assert lying.read_bytes() == bad
    assert lying.resolve().name == hashlib.sha256(good).hexdigest()

    hub_server.tamper(REPO, WEIGHTS, None)
    assert Path(_download(hub_server, cache_dir=tmp_path / "clean")).read_bytes() == good


# ---------------------------------------------------------------------------------- env and setup


def test_hf_endpoint_is_read_at_import_time_only(monkeypatch):
    # Setting HF_ENDPOINT after import changes nothing; the endpoint= argument is read per call.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert not hf_hub_url(REPO, WEIGHTS).startswith("http://127.0.0.1:9")
    assert hf_hub_url(REPO, WEIGHTS, endpoint="http://127.0.0.1:9") == (
        f"http://127.0.0.1:9/{REPO}/resolve/main/{WEIGHTS}")


def test_hf_endpoint_set_before_import_reaches_the_server(hub_server):
    hub_server.create_repo(REPO).add_commit({WEIGHTS: b"from env"})
    code = ("import sys; from huggingface_hub import hf_hub_download; "
            f"sys.stdout.write(open(hf_hub_download({REPO!r}, {WEIGHTS!r}), 'rb').read().decode())")
    env = {**os.environ, "HF_ENDPOINT": hub_server.url, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout == "from env"
    assert _methods(hub_server) == ["HEAD", "GET"]
    assert any(Path(hub_server.cache_dir).glob("models--*/snapshots/*/" + WEIGHTS))


def test_stop_joins_every_thread_and_frees_the_port():
    with HubServer() as server:
        server.create_repo(REPO).add_commit({WEIGHTS: b"w"})
        assert _raw(server, f"/{REPO}/resolve/main/{WEIGHTS}")[::2] == (200, b"w")
        assert _raw(server, "/not/a/hub/path")[0] == 404
        url = server.url
    assert not [t for t in threading.enumerate() if t.name.startswith("hub-server")]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + f"/{REPO}/resolve/main/{WEIGHTS}", timeout=2)
