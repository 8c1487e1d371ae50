"""A streaming HTTPS download that resumes a partial file, for weight sources outside the hub."""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable
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

