"""Files and folders shared safely: atomic writes (a crash leaves the old file or the new one, never
half of one), and output folders held by flock(2) locks so that two processes never write one run."""

from __future__ import annotations

import json
import os
from pathlib import Path


class FolderInUseError(RuntimeError):
    """Another dapft process is writing the same output folder."""


_NO_LOCKS = ("dapft's locks need a filesystem with flock(2): a local disk, NFS v4 (or v3 with its lock "
             "daemon), Lustre mounted with -o flock, GPFS; choose another")


def take_lock(fd: int, path: Path, *, shared: bool = False, blocking: bool = False, flag: str = "--output") -> bool:
    """flock `fd` (open on `path`): True when taken, False when another process holds it (only
    without `blocking`). A filesystem that cannot lock is refused, naming what it needs: without
    the lock two workers would make the same run."""
    import errno
    import fcntl

    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, mode)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(f"{flag} {path.parent}: cannot take a lock there ({exc.strerror}); "
                          f"{_NO_LOCKS} {flag}") from None
        raise


class FileLock:
    """A lock file beside a folder's work (a sweep's evaluation before fine-tuning, its summary),
    held for a block: blocking, so that the second process waits for the first to finish."""

    def __init__(self, path: Path, flag: str = "--output", enabled: bool = True):
        self.path, self.flag, self.enabled, self.fd = Path(path), flag, enabled, None

    def __enter__(self) -> "FileLock":
        if self.enabled:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            take_lock(self.fd, self.path, blocking=True, flag=self.flag)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class OutputFolder:
    """The folder a command writes into, held for the command's length: made and checked writable
    before any long work (a read-only or full disk shows now, not after an hour of training), and
    locked, so that a second dapft process writing the same folder at the same time is refused at
    once, naming the holder. The lock (an flock on FOLDER/.dapft.lock) goes with the process however
    it ends. A folder this command made and left empty is removed again.

    `shared`: several processes may hold the folder at once (the workers of one sweep), and none
    may hold it alone. A folder this process holds already (a sweep's run, which the sweep locked
    before starting it) is entered again without a second lock."""

    NAME = ".dapft.lock"
    _held: dict[Path, int] = {}  # folders this process holds, and how many times entered

    def __init__(self, folder: Path, flag: str = "--output", enabled: bool = True, shared: bool = False):
        self.folder, self.flag, self.enabled, self.shared = Path(folder), flag, enabled, shared
        self.fd, self.made, self.key = None, False, None

    def __enter__(self) -> "OutputFolder":
        if not self.enabled:
            return self
        key = self.folder.resolve()
        if key in OutputFolder._held:
            OutputFolder._held[key] += 1
            self.key = key
            return self
        self.made = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.folder / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OSError(f"{self.flag} {self.folder}: cannot write there ({exc.strerror or exc}); choose another "
                          f"{self.flag}") from None
        if not take_lock(self.fd, self.folder / self.NAME, shared=self.shared, flag=self.flag):
            holder = os.pread(self.fd, 64, 0).decode("utf-8", "replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise FolderInUseError(f"{self.flag} {self.folder}: another dapft process (pid {holder}) is writing there "
                                   f"now; wait for it to end, or choose another {self.flag}")
        try:
            if not self.shared:  # the holder's pid, for the message of the one refused
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            self.__exit__()
            raise OSError(f"{self.flag} {self.folder}: cannot write there ({exc.strerror or exc}); choose another "
                          f"{self.flag}") from None
        self.key = key
        OutputFolder._held[key] = 1
        return self

    def __exit__(self, *exc) -> None:
        if self.key is not None:
            OutputFolder._held[self.key] -= 1
            if OutputFolder._held[self.key] > 0:
                self.key = None
                return
            del OutputFolder._held[self.key]
            self.key = None
        if self.fd is None:
            return
        os.close(self.fd)  # releases the lock
        self.fd = None
        if self.made and [p.name for p in self.folder.iterdir()] == [self.NAME]:
            (self.folder / self.NAME).unlink(missing_ok=True)
            self.folder.rmdir()


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
