"""One exception type for every failure a user can cause, and SIGTERM handled like Ctrl-C.

The message is a single sentence that names the cause and what to do; the CLI and the
run-job door print it as it is, never with a traceback.
"""
import signal
from contextlib import contextmanager

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM  # 143, what shells report for a process ended by SIGTERM


class SSPECTError(Exception):
    """A failure caused by the input or the environment, explained in one sentence."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or Slicer's stop): unwinds like Ctrl-C, so that every partial file is removed."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM raises ``Terminated`` in the main thread (elsewhere signals cannot be caught)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
