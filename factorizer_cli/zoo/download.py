"""A streaming HTTPS download that resumes a partial file, for weight sources outside the hub, and the
one file taken out of a zip archive when that is how upstream publishes its weights."""

from __future__ import annotations

import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import DownloadError

Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)
CHUNK = 1 << 20


def download_url(url: str, destination: Path, progress: Progress | None = None, timeout: float = 60) -> Path:
    """Fetch ``url`` to ``destination`` via ``destination.part``, resuming what an earlier try left.

    The part file is renamed only when complete, so ``destination`` is never a partial file.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "factorizer-cli"})
    if done:
        request.add_header("Range", f"bytes={done}-")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.headers.get_content_type() == "text/html":  # weights are never a web page
                raise DownloadError(
                    f"{url}: the server sent a web page, not the weights (a folder, sign-in or quota page); "
                    f"download the file in a browser and put it at {destination}, or use `factorizer models "
                    "import`")
            if done and response.status != 206:  # the server ignored the range: start over
                done = 0
            length = response.headers.get("Content-Length")
            total = done + int(length) if length is not None else None
            with open(part, "ab" if done else "wb") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
            if total is not None and done < total:
                raise DownloadError(f"{url}: connection closed after {done} of {total} bytes; run again to resume")
    except urllib.error.HTTPError as err:
        if err.code == 416 and done:  # "range not satisfiable": an earlier run got every byte
            os.replace(part, destination)  # (the caller's hash check follows)
            return destination
        raise DownloadError(f"{url}: download failed (HTTP {err.code} {err.reason})") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"{url}: download failed ({reason}); {done} bytes kept in {part}, run the same command again to "
            "resume"
        ) from None
    os.replace(part, destination)
    return destination



def extract_member(archive: Path, member: str, destination: Path) -> Path:
    """Write the file ``member`` of the zip ``archive`` to ``destination``, whole or not at all.

    ``member`` is the file's path in the archive, or its tail when the archive adds folders above it
    (a zip made from a folder holds ``folder/...``): one file must match. The archive's CRC is
    checked as the file is read. ``DownloadError`` for a file that is not a zip or lacks the member.
    """
    part = destination.with_name(destination.name + ".part")
    try:
        with zipfile.ZipFile(archive) as zipped:
            name = _find_member(zipped.namelist(), member, archive)
            with zipped.open(name) as source, open(part, "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
    except zipfile.BadZipFile as err:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{archive}: not a readable zip archive ({err}); the download may be a web page "
                            "rather than the weights") from None
    os.replace(part, destination)
    return destination


def _find_member(names: Sequence[str], member: str, archive: Path) -> str:
    if member in names:
        return member
    tails = [n for n in names if n.endswith("/" + member.lstrip("/"))]
    if len(tails) == 1:
        return tails[0]
    stem = member.rsplit("/", 1)[-1]
    alike = [n for n in names if n.rsplit("/", 1)[-1] == stem] or [n for n in names if not n.endswith("/")][:5]
    raise DownloadError(f"{archive}: {'several files match' if tails else 'no file'} {member!r} in the archive "
                        f"(it holds {', '.join(alike) or 'nothing'})")
