"""Write a file whole or not at all, and say in one line why a write failed.

Every output of the tool (label maps, probability and component maps, PNGs, JSON and CSV reports,
model packages, training state, trust records) is written to a temporary file beside its target and
renamed over it once complete, so a reader sees the old file or the whole new one, and a killed or
failed write leaves no partial file: what makes re-running a batch job safe. The ``OSError`` of a
failed write (disk full, read-only folder, a folder where the file should be) becomes one
``OutputError`` naming the file and the fix; the other errors of the writer pass through unchanged.

Temporaries are hidden files named by host and process (``.seg.HOST-PID.RANDOM.tmp.nii.gz``), so a
later batch can delete what killed writers of this machine left (``remove_stale_temporaries``) without
touching the files of writers still at work, here or on another machine sharing the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OutputError, one_line

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def cannot_write(path: str | os.PathLike[str], err: OSError) -> str:
    """The one-line message of a failed write: the file, the system's reason, the fix."""
    return (f"{path}: cannot write ({err.strerror or one_line(err)}); check free space and permissions of "
            "the output folder")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    The temporary keeps the (lower-cased) suffix, ``.nii.gz`` included, so writers that pick a format
    by name still work. On failure the temporary is removed; an ``OSError`` becomes ``OutputError``.
    """
    path = Path(path)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        with open(temporary, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as err:
        _discard(temporary)
        raise OutputError(cannot_write(path, err)) from err
    except BaseException:
        _discard(temporary)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8, whatever the locale) whole or not at all."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, sort_keys: bool = False) -> None:
    """Write ``data`` as indented JSON (UTF-8, one trailing newline) whole or not at all."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n")


def make_folder(folder: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create ``folder`` and its parents if missing; ``OutputError`` naming it (as ``what``) if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create the {what} ({err.strerror or one_line(err)}); check the path "
                          "and the permissions of its parent") from err
    return folder


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside ``path`` that this process alone writes, keeping ``path``'s suffix.

    The name records host and process (``.<stem>.<host>-<pid>.<random>.tmp<suffix>``), so that
    ``remove_stale_temporaries`` can tell a killed writer's leftover from a writer still at work.
    """
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete the temporaries (files or folders) that killed writers of this host left in ``folder``.

    Only those of processes that no longer exist on this machine: writers still at work here, and
    those of other machines sharing the folder, are left alone. Returns how many were removed.
    """
    removed = 0
    for temporary in Path(folder).glob(".*.tmp*"):
        match = _TEMPORARY.match(temporary.name)
        if match and match.group("host") == _HOST and not _alive(int(match.group("pid"))):
            if temporary.is_dir() and not temporary.is_symlink():
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                temporary.unlink(missing_ok=True)
            removed += 1
    return removed


def _suffix(path: Path) -> str:
    """The suffix a writer may read the format from: ``.nii.gz`` (any ``.X.gz``), else the last one."""
    suffixes = [s.lower() for s in path.suffixes]
    return "".join(suffixes[-2:]) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])


def _discard(temporary: Path) -> None:
    with contextlib.suppress(OSError):  # a folder that refused the write may refuse this too
        temporary.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
