"""One engine process behind the door: `python -m sspect run-job JOB.json`, JSON lines on stdout.

Nothing here blocks the caller: a thread reads the process's stdout into a queue, and the caller
(the widget's timer, a console loop, or `wait()`) takes the events with `poll()`. stderr, where
the engine and its libraries print tracebacks and warnings, goes to a log file beside the job
and is never shown raw to the user. Cancel kills the whole process tree: the Slicer launcher
(`PythonSlicer`) starts the real interpreter as a child, so killing only the launcher would
leave the worker running.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import DoorError

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
_END = object()  # the reader thread's end-of-stream marker


def default_python() -> str:
    """The interpreter that runs the engine: Slicer's `PythonSlicer` when on PATH, else this one."""
    return shutil.which("PythonSlicer") or sys.executable


# Windows process-creation flags (winbase.h), spelled out so that the options a launch would use
# on Windows can be built, and checked, on any system.
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


def background_process_options(os_name: str | None = None) -> dict:
    """The Popen keyword arguments for a process that runs behind Slicer, for every launch (engine
    runs, the method listing, nvidia-smi, pip). On Windows: no console window (closing one would kill
    the job; Slicer's launchConsoleProcess hides it too) and its own process group; elsewhere its
    own session, so that a cancel can kill the whole group."""
    if (os_name or os.name) == "nt":
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def parse_event_line(line: str) -> dict | None:
    """One stdout line as an event; anything that is not a JSON event becomes a 'log' event."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return {"event": "log", "message": line}
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return {"event": "log", "message": line}
    return event


class EngineRun:
    """A running (or finished) engine job.

    ``state`` is 'running', 'done', 'failed' or 'cancelled'; ``result`` is the engine's 'result'
    event (files, unit, provenance) once done; ``error`` is one sentence when it failed.
    """

    def __init__(self, job_path, python_executable: str | None = None, env: dict | None = None,
                 log_path=None):
        self.job_path = Path(job_path)
        self.python_executable = python_executable or default_python()
        self.log_path = Path(log_path) if log_path else self.job_path.parent / "engine.log"
        self.command = [self.python_executable, "-m", "sspect", "run-job", str(self.job_path)]
        self.state = RUNNING
        self.result: dict | None = None
        self.error: str | None = None
        self.events: list[dict] = []  # every event received so far, in order
        self.progress = 0.0
        self.message = ""
        self.warnings: list[str] = []
        self.returncode: int | None = None
        self._queue: queue.Queue = queue.Queue()
        self._ended = False
        self._cancel_requested = False

        environment = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}}
        environment.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        try:
            self.process = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                text=True, bufsize=1, encoding="utf-8", errors="replace", env=environment, **background_process_options())
        except OSError as error:
            self._log.close()
            raise DoorError(f"The engine could not be started with {self.python_executable} ({error.strerror or error}); "
                            "check the Python interpreter set for the module.") from None
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read_stdout, name=f"sspect-engine-{self.pid}", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"<EngineRun pid={self.pid} state={self.state} progress={self.progress:.2f} job={self.job_path}>"

    # -- the reader thread ---------------------------------------------------------------------
    def _read_stdout(self) -> None:
        try:
            for line in self.process.stdout:
                event = parse_event_line(line)
                if event is not None:
                    self._queue.put(event)
        except (OSError, ValueError):  # the pipe closed under us (cancel)
            pass
        finally:
            self._queue.put(_END)

    # -- the caller's side ---------------------------------------------------------------------
    def poll(self) -> list[dict]:
        """Every event received since the last poll, without blocking; updates state, result, error."""
        received = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                self._ended = True
                continue
            if self.state != RUNNING:
                continue  # after a cancel, nothing more counts
            self._take(item)
            received.append(item)
        if self.state == RUNNING and self._ended and self.process.poll() is not None:
            self._finish()  # stdout is closed and the process has exited: settle, without blocking
        return received

    def _take(self, event: dict) -> None:
        self.events.append(event)
        kind = event["event"]
        if kind == "progress":
            try:
                self.progress = max(0.0, min(1.0, float(event.get("fraction", self.progress))))
            except (TypeError, ValueError):
                pass
            self.message = str(event.get("message", self.message))
        elif kind == "warning":
            self.warnings.append(str(event.get("message", "")))
        elif kind == "result":
            self.result = event
        elif kind == "error":
            self.error = _one_line(event.get("message")) or "The engine reported an error without a message."

    def _finish(self) -> None:
        """stdout has ended and the process has exited: settle the state."""
        self.returncode = self.process.wait()
        self._reader.join(timeout=5)
        self._close()
        if self.result is not None and self.returncode == 0 and self.error is None:
            self.state = DONE
            return
        self.state = FAILED
        if self.error is None:
            self.error = (f"The engine stopped with exit code {self.returncode} without a result; "
                          f"its log is {self.log_path}.")

    def wait(self, timeout: float | None = None, on_event=None) -> str:
        """Block until the job ends (or ``timeout`` seconds pass); returns the state.

        ``on_event(event)`` is called for every event as it arrives. Ctrl-C cancels the job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                for event in self.poll():
                    if on_event is not None:
                        on_event(event)
                if self.state != RUNNING:
                    return self.state
                if deadline is not None and time.monotonic() >= deadline:
                    return self.state
                time.sleep(0.02)
        except KeyboardInterrupt:
            self.cancel()
            raise

    def cancel(self) -> str:
        """Kill the engine and every process it started; result files already complete stay."""
        if self.state != RUNNING:
            return self.state
        self._cancel_requested = True
        self.state = CANCELLED
        self._kill_tree()
        try:
            self.returncode = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(timeout=5)
        self._close()
        while True:  # drop what the killed process left in the queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        return self.state

    def _kill_tree(self) -> None:
        pid = self.process.pid
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            try:
                parent = psutil.Process(pid)
                children = parent.children(recursive=True)
            except psutil.NoSuchProcess:
                children, parent = [], None
            for process in children:  # children first, so none is re-parented and missed
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            if parent is not None:
                try:
                    parent.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(children + ([parent] if parent is not None else []), timeout=10)
        if os.name == "posix":
            try:  # the session's process group holds every descendant that did not start its own
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        elif psutil is None:
            try:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, timeout=30,
                               **background_process_options())
            except (OSError, subprocess.SubprocessError):
                self.process.kill()

    def _close(self) -> None:
        for stream in (self.process.stdout, self._log):
            try:
                if stream is not None and not stream.closed:
                    stream.close()
            except OSError:
                pass


def _one_line(message) -> str:
    return " ".join(str(message or "").split())
