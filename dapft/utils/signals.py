"""Stopping a run cleanly: Ctrl-C, SIGTERM and SLURM's signals become a request that the training
loop honours at a step boundary (after saving), interrupts deferred while a checkpoint is written,
and the watchdog that ends a process whose SIGTERM is blocked in a collective."""

from __future__ import annotations

import os
import signal
import threading
import time

from dapft.utils.console import console

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


def _on_stop_signals(handler, signums: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Handle the stop signals with `handler` (only the main thread may set handlers)."""
    if threading.current_thread() is threading.main_thread():
        for s in signums:
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
    """Stopping on a signal, or done, all saved: a further stop signal (the impatient second Ctrl-C, a
    SLURM time limit's that comes as a finished worker exits) would only turn the exit into a
    traceback or a death by the signal at interpreter shutdown, where Python gives the signals it
    handles back their default action."""
    _on_stop_signals(signal.SIG_IGN, (*STOP_SIGNALS, *_also_stop_on))


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
