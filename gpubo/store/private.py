"""Private temporary directories that outlive no process for long.

A private store (``Manager(store=None)``) and a stress run's stores live in
a temporary directory that is deleted when they close. A process killed
before that (SIGKILL, or SIGTERM without a handler) leaves it behind, with
its preallocated files. So each such directory holds ``gpubo.private``,
``flock``-ed by its owner for as long as it lives; a directory whose marker
nobody holds belongs to a dead process, and :func:`sweep` deletes it. The
next private directory's creation sweeps, and so does ``gpubo fsck
--clean-tmp``.

The marker is made under a temporary name, locked, then renamed into
place, so a sweeper never sees an unlocked marker of a live directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile

__all__ = ["MARKER", "PrivateDir", "sweep"]

log = logging.getLogger(__name__)

MARKER = "gpubo.private"
_PREFIXES = ("gpubo-store-", "gpubo-stress-", "gpubo-bench-")


class PrivateDir:
    """A temporary directory ``gpubo-<kind>-*`` held by this process until
    :meth:`remove`.

    Raises (constructor):
        OSError: the directory or its marker cannot be made.
    """

    def __init__(self, prefix: str, parent: str | None = None) -> None:
        self.path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        tmp = os.path.join(self.path, MARKER + ".new")
        try:
            self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self._fd, f"{os.getpid()}\n".encode())
            os.rename(tmp, os.path.join(self.path, MARKER))
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        swept = sweep(parent, keep=self.path)
        if swept:
            log.info("removed %d private director(y/ies) left by dead processes: %s", len(swept), swept)

    def remove(self) -> None:
        """Delete the directory, then let go of it. Idempotent."""
        if self._fd < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)
        self._fd = -1


def sweep(parent: str | None = None, keep: str | None = None) -> list[str]:
    """Delete the private directories under ``parent`` (the temporary
    directory by default) whose owner is gone; the paths deleted."""
    root = parent if parent is not None else tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(_PREFIXES)]
    except OSError:
        return []
    swept = []
    for name in names:
        path = os.path.join(root, name)
        if path == keep:
            continue
        try:
            fd = os.open(os.path.join(path, MARKER), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # not ours, or not yet made: leave it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                log.debug("cannot lock %s: %s", path, e)
            os.close(fd)
            continue  # its owner is alive
        try:
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    return swept
