"""All-or-nothing file writes: a temp file in the destination directory, fsync, rename.

A temp file in the *destination* directory (never ``$TMPDIR``) makes ``os.replace`` a rename
on one file system, which is atomic: a reader sees the old file or the new one, never half of
one, and a SIGKILL or a full disk mid-write leaves the previous file in place. The temp file
of a failed write is removed; one left by a SIGKILL is named ``.<name>.<pid>@<host>.tmp``
and ``remove_stale_temps`` clears it once its writer is gone.

    with atomic_path("out/last.ckpt") as tmp:   # write tmp; renamed onto the target on success
        torch.save(state, tmp)
    write_image("pred/0001.png", label)         # checked cv2 encode + atomic write
    with file_lock(cache / ".build.lock"):      # one process (or rank, or node) builds a cache
        ...
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "encode_image",
    "file_lock",
    "host_tag",
    "is_stale_temp",
    "remove_stale_temps",
    "temp_name",
    "write_image",
    "writer_is_gone",
]

# ``.<name>.<pid>@<host>.tmp`` (the host part is missing in temps of older versions).
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(@(?P<host>[A-Za-z0-9-]*))?\.tmp$")
# A temp written on another machine (shared file system) is stale only after this long.
FOREIGN_TEMP_AGE_S = 24 * 3600


def host_tag() -> str:
    """This machine's name as it appears in temp names (letters, digits and dashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]


def temp_name(path: Path) -> Path:
    """The temp file beside ``path`` that this process writes before renaming it."""
    return path.with_name(f".{path.name}.{os.getpid()}@{host_tag()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def writer_is_gone(pid: int, host: str | None, path: Path) -> bool:
    """Whether the process ``pid`` on ``host`` (None: this machine) that wrote ``path`` is gone:
    a dead process here, or, for another machine's writer (a shared file system), ``path``
    untouched for ``FOREIGN_TEMP_AGE_S``."""
    if host is None or host == host_tag():
        return pid != os.getpid() and not _alive(pid)
    try:
        return time.time() - path.stat().st_mtime > FOREIGN_TEMP_AGE_S
    except FileNotFoundError:
        return False


def is_stale_temp(path: Path) -> bool:
    """Whether ``path`` is a temp file (``temp_name``) whose writer is gone."""
    m = _TEMP_RE.match(path.name)
    return m is not None and writer_is_gone(int(m.group("pid")), m.group("host"), path)


def _fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk, or a power cut can undo it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, sync: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on a clean exit fsync it and rename it onto ``path``.

    On any exception the temp file is removed and ``path`` is left as it was; an OSError
    (full disk, size limit, permissions) is re-raised naming ``path``. ``sync=False`` skips
    the fsyncs (files inside a directory that is itself renamed into place when complete).
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and str(path) not in str(e):
            raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
        raise
    if sync:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to ``path`` all or nothing (an OSError names the path)."""
    with atomic_path(path, sync) as tmp, open(tmp, "wb") as f:
        f.write(data)


def encode_image(
    path: str | os.PathLike, image: np.ndarray, params: list[int] | None = None
) -> bytes:
    """Encode ``image`` (H, W) or (H, W, 3) BGR by ``path``'s extension; ValueError naming
    ``path`` if OpenCV cannot (``cv2.imencode`` returns False instead of raising)."""
    path = Path(path)
    try:
        ok, encoded = cv2.imencode(path.suffix or ".png", image, params or [])
    except cv2.error:
        ok = False
    if not ok:
        raise ValueError(f"could not encode a {image.dtype} {image.shape} image as {path}")
    return encoded.tobytes()


def write_image(
    path: str | os.PathLike, image: np.ndarray, params: list[int] | None = None, sync: bool = True
) -> None:
    """Encode ``image`` (H, W) or (H, W, 3) BGR by the file's extension and write it atomically.

    Unlike ``cv2.imwrite``, a failure is never silent: a failed encoding raises ValueError and
    a failed write (full disk, file size limit) raises OSError, both naming the path.
    """
    atomic_write_bytes(path, encode_image(path, image, params), sync)


def remove_stale_temps(directory: str | os.PathLike, names: Collection[str] | None = None) -> int:
    """Delete the temp files that killed writers left in ``directory`` (see ``is_stale_temp``);
    a temp whose writer still runs is kept. ``names``: only temps of these target names.

    Returns the number removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in os.scandir(directory):
        m = _TEMP_RE.match(entry.name)
        if m is None or (names is not None and m.group("name") not in names):
            continue
        path = Path(entry.path)
        if entry.is_file(follow_symlinks=False) and is_stale_temp(path):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block.

    One process at a time runs the block: the first builds a cache, the others wait, then
    find it built. The kernel drops ``flock`` locks with the file descriptor, so a killed
    builder never blocks the next run. The lock file is removed on release (while still
    held); a waiter that then holds a removed file sees that and locks the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a")  # held across the yield
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break  # the file we locked is still the lock file
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
