"""Start a server process, wait until it answers, stop it: the one way this project runs servers.

The team server (`captioning.tracking.team_server`: PostgreSQL and `mlflow server`),
the tests' OpenSSH server and `mlflow models serve` all go through
`ServerProcess`. It starts the command in a session of its own, so that
stopping it reaches every process the server forked (uvicorn workers,
PostgreSQL backends, `runuser` children); stopping sends the server's own
shutdown signal to the whole group and SIGKILLs what is left after a grace
period. A readiness check is a plain callable (an HTTP probe, an open TCP
port); a server that exits before it is ready fails with the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

LOG_TAIL_CHARS = 3000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it; bind soon after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> Callable[[], bool]:
    """A readiness check: something accepts TCP connections on host:port."""

    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            return False

    return check


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: GET `url` answers 200."""

    def check() -> bool:
        import requests

        try:
            return requests.get(url, timeout=2.0).status_code == 200
        except requests.RequestException:
            return False

    return check


class ServerProcess:
    """One server command in its own process group, as a context manager.

    ready: returns True once the server serves; stop_signal: what asks the
    server to shut down cleanly (PostgreSQL's fast shutdown is SIGINT; its
    SIGTERM waits for every client to leave).
    """

    def __init__(
        self,
        command: Sequence[str | Path],
        ready: Callable[[], bool],
        log_path: str | Path,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        ready_timeout_s: float = 120.0,
        stop_signal: int = signal.SIGTERM,
        name: str | None = None,
    ):
        self.command = [str(part) for part in command]
        self.ready = ready
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.ready_timeout_s = ready_timeout_s
        self.stop_signal = stop_signal
        self.name = name or Path(self.command[0]).name
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        """Start the command and return once `ready()` holds; on any failure nothing is left running."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} before it was ready\n"
                    f"{self.tail()}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        raise TimeoutError(
            f"{self.name} not ready within {self.ready_timeout_s:.0f} s\n{self.tail()}"
        )

    def tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the server's log, for failure messages."""
        if not self.log_path.exists():
            return f"({self.log_path} does not exist)"
        text = self.log_path.read_text(errors="replace")
        return f"--- {self.log_path} (tail) ---\n{text[-chars:]}"

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, not a shutdown."""
        self._signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop(self, grace_s: float = 20.0) -> None:
        """Ask the group to shut down, then SIGKILL whatever is still there after `grace_s`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
        # Children can outlive the leader (a worker, a PostgreSQL backend): the group goes too.
        self._signal_group(signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()

    def _signal_group(self, signum: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)  # the session this object started
