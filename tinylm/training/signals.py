"""Stopping on a signal: Ctrl-C (SIGINT), SIGTERM (what schedulers, `docker stop`,
systemd and a plain `kill` send) and SIGHUP (a closed terminal or ssh session) all
stop a run cleanly.

    SIGINT, SIGTERM,  during training: finish the step, save out_dir/last, exit with
    SIGHUP            128 + the signal's number (130, 143, 129: the shell's
                      convention); a second signal stops at once
    SIGKILL, a crash  nothing runs: the last checkpoint saved is what survives (every
                      save is atomic, so it is complete)

Outside the training loop (tokenizing, loading) SIGTERM and SIGHUP raise
StopRequested, as Ctrl-C raises KeyboardInterrupt, so `finally` blocks run and
temporary files are removed, instead of the process vanishing mid-write.

A signal the process was started with ignored stays ignored: `nohup` ignores
SIGHUP so that a run outlives its terminal, and a shell script's background job
ignores SIGINT. (Only the main thread receives signals, so the handlers are
installed only there; SIGHUP does not exist on Windows.)
"""

from __future__ import annotations

import contextlib
import signal
import threading

# The signals that stop a run politely; SIGINT first (Python already raises on it).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


class StopRequested(KeyboardInterrupt):
    """A stop asked for by a signal. A KeyboardInterrupt, so that code written for
    Ctrl-C (the Trainer's save on interrupt, `except KeyboardInterrupt`) handles all."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install(signums, handler) -> dict:
    """Install `handler` for each signal not ignored; {signal: the handler it replaced}."""
    previous = {}
    if _in_main_thread():
        for signum in signums:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, handler)
    return previous


def _restore(previous: dict) -> None:
    for signum, handler in previous.items():
        # None: a handler not installed from Python (an embedding program's); the
        # default action is the closest thing to put back
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _raise_stop(signum, frame):
    raise StopRequested(signum)


@contextlib.contextmanager
def stop_signals_raise():
    """While active, SIGTERM and SIGHUP raise StopRequested where the program is, as
    Ctrl-C does, instead of ending the process: cleanups run, temporary files go."""
    previous = _install(STOP_SIGNALS[1:], _raise_stop)
    try:
        yield
    finally:
        _restore(previous)


class DeferredInterrupt:
    """While active, a first stop signal only records itself (`requested`: its
    number): the loop saves and stops at the next step boundary, so a checkpoint
    never holds a half-applied update. A second one stops at once."""

    def __enter__(self):
        self.requested: int | None = None
        self._previous = _install(STOP_SIGNALS, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise StopRequested(signum)
        self.requested = signum

    def stop_if_requested(self) -> None:
        if self.requested is not None:
            raise StopRequested(self.requested)

    def __exit__(self, *exc):
        _restore(self._previous)
        return False
