"""One run per directory: an exclusive lock on out_dir/.lock, held for the whole run.

Two processes training into one directory would replace each other's checkpoints
(last/ from one, best/ from the other), interleave their log.jsonl and trip over
each other's temporary files. So a run takes an advisory `fcntl.flock` on
out_dir/.lock before it writes anything (the token cache included) and keeps it
until it ends; a second run into the same directory is refused with one line
naming the holder.

The kernel drops a flock when its process ends, however it ends (a crash, kill -9,
power loss), so a stale .lock file never blocks a later run: there is nothing to
clean up. The file stays; it holds the holder's pid and host, for the message.

Not covered: Windows has no fcntl, and there the lock is skipped (runs are not
protected from each other); on a network file system whose flock is not shared
between machines (some NFS setups) two machines are not kept apart either.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
LOCK_FORMAT = "tinylm-run-lock"

# flock is "not supported" on a few file systems; the run then goes on unlocked
# rather than not at all (as on Windows)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirectoryBusy(RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    """`RunLock(out_dir).acquire()` ... `.release()` (or `with RunLock(out_dir):`).

    acquire() creates the directory if needed and raises RunDirectoryBusy when
    another process (or another RunLock in this one) holds it. `enforced` is False
    where no lock could be taken (Windows, a file system without flock).
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.enforced = False
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        # O_NOFOLLOW: a .lock planted as a symbolic link must not make us write elsewhere
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise RunDirectoryBusy(
                f"{self.directory} is in use by another tinylm run ({holder}; lock file "
                f"{self.path}): wait for it to end, or choose another --out") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _UNSUPPORTED:
                return self
            raise
        self._fd, self.enforced = fd, True
        _write_holder(fd)
        return self

    def release(self) -> None:
        """Closing the file drops the lock (the file itself stays: see the module doc)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def __del__(self):
        self.release()


def _write_holder(fd: int) -> None:
    """Say who holds the lock, for the message a refused run prints. Best effort:
    on a full disk the lock holds all the same, the message just lacks the pid."""
    text = json.dumps({"format": LOCK_FORMAT, "pid": os.getpid(), "host": socket.gethostname()})
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (text + "\n").encode("utf-8"), 0)
    except OSError:
        pass


def is_lock_file(path) -> bool:
    """True when `path` is a .lock that tinylm wrote: its holder's record, or empty
    (a holder that died before writing it). A mark of a run directory."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except OSError:
        return False
    return not raw or _parse_holder(raw) is not None


def _parse_holder(raw: bytes) -> dict | None:
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != LOCK_FORMAT:
        return None
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(host, str):
        return None
    # the file may come from anywhere: keep the host name printable and short
    host = "".join(c for c in host if c.isprintable())[:64]
    return {"pid": pid, "host": host}


def _describe_holder(fd: int) -> str:
    try:
        info = _parse_holder(os.pread(fd, 4096, 0))
    except OSError:
        info = None
    if info is None:
        return "pid unknown"
    here = info["host"] == socket.gethostname()
    return f"pid {info['pid']}" + ("" if here else f" on host {info['host']}")


class NoLock:
    """What the ranks other than 0 of a data-parallel run hold: rank 0 holds the lock
    for the whole job, and they write nothing."""

    enforced = False
    held = False

    def acquire(self) -> NoLock:
        return self

    def release(self) -> None:
        pass
