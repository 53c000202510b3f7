"""Where and how things run: device, mixed precision, seeding, progress bars, atomic files."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def quiet_transformers() -> None:
    """dapft draws its own progress bars; transformers' per-file loading bars would interleave.
    Through the environment, which transformers reads when imported (`dapft --help` imports it not)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def pick_device(name: str | None = None):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def amp_dtype(precision: str, device):
    """bf16/fp16 autocast on GPU; float32 on CPU whatever is asked (CPU autocast is slow and inexact)."""
    if precision not in ("auto", "bf16", "fp16", "fp32", "float32", "no"):
        raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if device.type != "cuda" or precision in ("fp32", "float32", "no"):
        return None
    import torch

    if precision in ("auto", "bf16"):
        return torch.bfloat16 if (precision == "bf16" or torch.cuda.is_bf16_supported()) else torch.float16
    return torch.float16  # fp16


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_progress(disable: bool = False) -> Progress:
    """Bars that read whole in an 80-column terminal: counts and times first, at fixed widths, then
    the run's figures (loss, rate, images/s), wrapped onto a second line rather than cut."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", table_column=Column(ratio=1, overflow="fold")),
        console=console, disable=disable, transient=False,
    )


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


def software() -> dict:
    """What produced a number: dapft's version and, run from a git checkout (an editable install),
    its commit and whether dapft/ had uncommitted changes; torch, transformers and Python. A run
    records it at each start and resume, a sweep checks that its runs agree."""
    import platform
    import subprocess

    import torch
    import transformers

    from dapft import __version__

    root = Path(__file__).resolve().parent.parent
    commit = modified = None
    if (root / ".git").exists():  # a directory in a clone, a file in a worktree
        def git(*args: str) -> str | None:
            try:
                done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                      check=False, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                return None
            return done.stdout.strip() if done.returncode == 0 else None

        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", "dapft") if commit else None
        modified = None if status is None else bool(status)
    # str(): torch's version is a str subclass, which trainer_state.pt's weights-only loading refuses.
    return {"dapft": __version__, "commit": commit, "modified": modified, "torch": str(torch.__version__),
            "transformers": transformers.__version__, "python": platform.python_version()}


def software_line(entry: dict) -> str:
    """One software record in words: `dapft 0.1.0 (commit 1a2b3c4d5e), torch ..., transformers ...`."""
    code = f"dapft {entry['dapft']}"
    if entry.get("commit"):
        changed = ", with uncommitted changes" if entry.get("modified") else ""
        code += f" (commit {entry['commit'][:10]}{changed})"
    return f"{code}, torch {entry['torch']}, transformers {entry['transformers']}, Python {entry['python']}"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what SLURM, Kubernetes and `timeout` send
_also_stop_on: list[int] = []  # more, for a run's length: SIGUSR2 under submitit (a time limit's warning)


def also_stop_on(signum: int) -> None:
    """A run also saves a resumable checkpoint at the end of its step and stops on `signum`."""
    if signum not in _also_stop_on:
        _also_stop_on.append(signum)


# A SLURM worker's stops (stop_after_progress): a stop signal that came outside a run's training
# loop and is not acted on yet, whether stops wait for progress, and whether this process has saved
# anything new since it started.
_pending_stop = 0
_progress_first = False
_saved_progress = False


def stop_after_progress(signums: tuple[int, ...]) -> None:
    """For the process's life (a SLURM sweep worker): `signums` stop it only once it has saved
    something new (the evaluation before fine-tuning, a training step's checkpoint, a finished run);
    a signal that comes before (models loading, the evaluation before) waits for that. SLURM may
    send a time limit's warning up to a minute early, so with a short limit every attempt can be
    signalled within seconds of its start: stopping at once, each would be requeued without a step
    of progress, again and again. Outside a run's loop such a signal is recorded, not raised."""
    global _progress_first
    _progress_first = True
    for signum in signums:
        also_stop_on(signum)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signum, _record_stop)


def _record_stop(signum, frame) -> None:
    global _pending_stop
    if not _pending_stop:
        _pending_stop = signum
        console.print(f"{signal.Signals(signum).name}: stopping once this attempt has saved something new (the "
                      "evaluation before fine-tuning, a training step, a run)", markup=False)


def saved_progress() -> None:
    """Something new is on disk that a later attempt will not redo."""
    global _saved_progress
    _saved_progress = True


def may_stop_now() -> bool:
    """Whether a stop request may act here, before this loop's next step (stop_after_progress)."""
    return _saved_progress or not _progress_first


def pending_stop() -> int:
    """The stop signal received outside a run's loop that may act now, 0 for none."""
    return _pending_stop if may_stop_now() else 0


_pending_signal = 0
_raised_signal = 0


def _on_stop_signals(handler) -> None:
    """Handle both stop signals with `handler` (only the main thread may set handlers)."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, handler)


def _raise_for(signum: int):
    """Ctrl-C and SIGTERM outside the training loop (inside it, StopRequests saves a checkpoint
    first) both stop the command as Ctrl-C does, as a KeyboardInterrupt, so that data-loader workers,
    libraries and the cleanup on the way out treat them alike; which one it was is kept for the exit
    status (stopped_by_sigterm)."""
    global _raised_signal
    _raised_signal = signum
    raise KeyboardInterrupt


def stopped_by_sigterm() -> bool:
    """Whether the command stopped on SIGTERM: click and typer turn every KeyboardInterrupt into their
    own Ctrl-C answer (status 130), losing which signal it was."""
    return _raised_signal == signal.SIGTERM


def defer_interrupts() -> None:
    """Start-up: a Ctrl-C or SIGTERM while Python imports torch and transformers is recorded, not
    raised. Raised inside those imports, KeyboardInterrupt can abort the interpreter (torch's C++
    bindings terminate: exit status -6), be swallowed by a library's bare `except` (the command then
    runs to the end, status 0), or kill the process by its signal after the message (-2). A second
    signal still stops at once."""
    def record(signum, frame):
        global _pending_signal
        if _pending_signal:
            _raise_for(signum)
        _pending_signal = signum

    _on_stop_signals(record)


def deliver_interrupts() -> None:
    """The end of start-up (a command's imports done): Ctrl-C and SIGTERM raise from here on, now if
    one came during start-up."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda signum, frame: _raise_for(signum))
    if _pending_signal:
        _raise_for(_pending_signal)


def ignore_further_signals() -> None:
    """Stopping on a signal, all saved: a further Ctrl-C (the impatient second one) would only turn the
    exit into a traceback or a death by the signal at interpreter shutdown."""
    _on_stop_signals(signal.SIG_IGN)


_watchdog: list = []  # the wakeup socket pair, kept for the process's life


def end_blocked_sigterm(grace: float | None = None) -> None:
    """Under torchrun: a SIGTERM Python has not acted on after `grace` seconds (default 20, or
    $DAPFT_SIGTERM_GRACE) ends the process (exit status 143). Python runs a signal handler only
    between bytecodes, so a main thread blocked in C++ (a collective or a rendezvous waiting on a
    peer that died) would ignore torchrun's SIGTERM until its SIGKILL 30 s later, leaving no line
    about why. The C-level handler writes the signal's number to a socket (signal.set_wakeup_fd); a
    thread of its own reads it. The grace leaves the usual path (a checkpoint at the end of the
    step, then exit 143) its time."""
    import socket

    if _watchdog or threading.current_thread() is not threading.main_thread():
        return
    grace = float(os.environ.get("DAPFT_SIGTERM_GRACE", 20)) if grace is None else grace
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    _watchdog.extend([reader, writer])
    os.register_at_fork(after_in_child=_no_wakeup_fd)  # a data-loader worker's signals are not ours

    def watch() -> None:
        while signal.SIGTERM not in reader.recv(64):
            pass
        time.sleep(grace)
        os.write(2, f"SIGTERM: still blocked {grace:g} s later (waiting on another process that ended or hangs?); "
                    "exiting\n".encode())
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="dapft-sigterm-watchdog", daemon=True).start()


def _no_wakeup_fd() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # forked from another thread than the main one: not a Python main thread here
        pass


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM during fine-tuning, raised once a resumable checkpoint of the last step is
    saved. `exit_code` is the shell's for the signal (130, 143)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum, self.exit_code = int(signum), 128 + int(signum)


class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and `timeout` send before they kill) for
    the length of a run: the first asks the loop to save a resumable checkpoint at the next step
    boundary and stop (`signum` says which came); a second one stops at once. A stop recorded
    before the loop (stop_after_progress) is taken in; one the loop ended without acting on (it
    came during the last evaluation) is handed back, for the next run not to start."""

    def __init__(self, log):
        self.signum, self.log, self.previous = 0, log, {}

    def __enter__(self):
        global _pending_stop
        self.signum, _pending_stop = _pending_stop, 0
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (*STOP_SIGNALS, *_also_stop_on)}
        return self

    def __exit__(self, exc_type, *exc):
        global _pending_stop
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if exc_type is None:
            _pending_stop = self.signum

    def _handle(self, signum, frame):
        if self.signum:
            _raise_for(signum)  # the exit status is the second signal's (143 for SIGTERM), as outside the loop
        self.signum = signum
        self.log(f"{signal.Signals(signum).name}: saving a resumable checkpoint at the end of this step "
                 "(Ctrl-C again to quit at once, losing the steps since the last checkpoint)")
