"""What SIGINT, SIGTERM and SIGHUP do: stop cleanly, never mid-write, and exit 130.

Outside training (`interrupt_on_signals`, which the CLI holds for every command) a signal
raises `Stopped` in the main thread, so every `finally` runs: temporary files of atomic
writes and scratch folders are removed and the run folder's lock is released. Training
(`StopSignal`) turns a signal into a flag that the loop checks after each step, saves
`last.pt` and stops. Data loader workers ignore these signals (`quiet_worker`): when a
whole process group is signalled (Slurm, systemd, Ctrl-C in a terminal), the main process
stops them itself after saving, instead of dying on a worker that vanished.

A signal that was ignored when the process started (`nohup`, a background job) stays ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal arrived outside training; a KeyboardInterrupt so that no library's
    `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


def _handled(signum: int) -> bool:
    """Whether this signal is ours to handle (not ignored by whoever started the process)."""
    return signal.getsignal(signum) is not signal.SIG_IGN


@contextmanager
def handling(handler: Any) -> Iterator[None]:
    """`handler` for every stop signal that is not ignored, the previous ones restored after
    (only the main thread receives signals; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS if _handled(sig)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Raise `Stopped` on the first stop signal; later ones are ignored while it unwinds."""

    def stop(signum: int, frame: Any) -> None:
        for sig in STOP_SIGNALS:
            if _handled(sig):
                signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    with handling(stop):
        yield


class StopSignal:
    """Turns stop signals into a flag the training loop checks after each step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._handling = handling(self._handle)

    def __enter__(self) -> StopSignal:
        self._handling.__enter__()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        self._handling.__exit__(*exc)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold stop signals back while worker processes are forked: a child starts with them
    blocked, so one sent to the whole group cannot kill it before `quiet_worker` runs."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def quiet_worker(worker_id: int = 0) -> None:
    """In a data loader worker: ignore stop signals (the main process ends the workers)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
