"""A real `mlflow models serve` on loopback, for the serving tests and the load benchmark.

`ScoringServer` runs `mlflow models serve --env-manager local` for a model URI
on a free 127.0.0.1 port through `captioning.server_process.ServerProcess`
(its own process group, ready once `/ping` answers, the whole group stopped
on exit). `process_tree_rss` sums the resident memory of a process and its
descendants (the server forks uvicorn workers), read from Linux `/proc`.
Nothing here ships inside a logged model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from captioning.server_process import ServerProcess, free_port, http_ok


class ScoringServer:
    """`mlflow models serve --env-manager local` on 127.0.0.1, as a context manager.

    `env` is added to this process's environment (the tracking URI, quiet
    logging); `log_path` receives the server's output, whose tail goes into
    the error raised when it does not start.
    """

    def __init__(
        self,
        model_uri: str,
        log_path: str | Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        ready_timeout_s: float = 600.0,
    ):
        self.model_uri = model_uri
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(env or {})}
        # The server execs `uvicorn` by name: this interpreter's bin/ must come first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        mlflow_cli = shutil.which("mlflow", path=env["PATH"]) or "mlflow"
        command = [
            mlflow_cli, "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        self.server = ServerProcess(
            command,
            ready=http_ok(f"{self.url}/ping"),
            log_path=log_path,
            env=env,
            ready_timeout_s=ready_timeout_s,
            name="mlflow models serve",
        )

    def __enter__(self) -> ScoringServer:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    @property
    def process(self) -> subprocess.Popen | None:
        """The `mlflow models serve` process (the leader of its group)."""
        return self.server.process

    def healthy(self) -> bool:
        """Whether `/ping` answers 200 now."""
        return http_ok(f"{self.url}/ping")()

    def rss_bytes(self) -> int:
        """Resident memory of the server process and all its descendants."""
        return process_tree_rss(self.process.pid)


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc; 0 when gone)."""
    return sum(_rss_bytes(p) for p in _descendants(pid))


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
