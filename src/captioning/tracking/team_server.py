"""The team's MLflow server: PostgreSQL backend, proxied artifacts, basic-auth logins.

`mlflow server --app-name basic-auth` keeps runs, the model registry and the
users in PostgreSQL and stores artifacts itself (`--artifacts-destination`),
so clients need only the server's URL and their own login, never storage
credentials. A team with a database already points `MLFLOW_BACKEND_STORE_URI`
and `MLFLOW_AUTH_DATABASE_URI` at it; otherwise this module runs a private
PostgreSQL cluster in the server's state folder. That cluster listens on a
Unix socket inside its data folder only (no TCP port, socket mode 0700), so
it needs no database password: only its owner and root reach it. Debian's
`initdb` and `postgres` refuse to run as root, so as root they run as the
`postgres` user (`runuser`), with the data folder handed to that user.
The admin password comes from `MLFLOW_AUTH_ADMIN_PASSWORD` and nothing here
writes it anywhere. `python -m captioning.tracking.team_server` (`make team-server`)
runs it all in the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from captioning.server_process import ServerProcess, free_port, http_ok

DEFAULT_HOST = "127.0.0.1"  # a team server is put behind TLS by whoever exposes it further
DEFAULT_PORT = 5000
DB_USER = "mlflow"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
# New users may read every experiment and model; only their creator (MANAGE) or an
# admin-granted EDIT may change one.
DEFAULT_PERMISSION = "READ"
POSTGRES_OS_USER = "postgres"


def postgres_program(name: str) -> str:
    """A PostgreSQL program: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if not versions:
        raise FileNotFoundError(
            f"{name} not found: install PostgreSQL (Debian: apt-get install postgresql)"
        )
    return str(versions[-1])


def _as_postgres_user(command: list[str]) -> list[str]:
    """`command` as the postgres user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", POSTGRES_OS_USER, "--", *command]


@dataclass(frozen=True)
class PostgresCluster:
    """A PostgreSQL cluster in `data_dir`, reachable only through its Unix socket there."""

    data_dir: Path
    port: int

    def uri(self, database: str) -> str:
        """SQLAlchemy URI of one database, over the socket (no password: socket permissions guard it)."""
        return f"postgresql+psycopg2://{DB_USER}@/{database}?host={self.data_dir}&port={self.port}"

    def initialise(self) -> None:
        """initdb once: an existing cluster is kept as it is."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if os.geteuid() == 0:
            account = pwd.getpwnam(POSTGRES_OS_USER)
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            reachable = subprocess.run(_as_postgres_user(["test", "-w", str(self.data_dir)]))
            if reachable.returncode != 0:
                raise PermissionError(
                    f"the {POSTGRES_OS_USER} user cannot reach {self.data_dir}: "
                    "choose a state folder whose parents others may traverse (mode o+x)"
                )
        command = [
            postgres_program("initdb"),
            "--pgdata", str(self.data_dir), "--username", DB_USER,
            "--auth-local", "trust", "--auth-host", "reject", "--encoding", "UTF8", "--no-instructions",
        ]  # fmt: skip
        subprocess.run(_as_postgres_user(command), check=True, capture_output=True, text=True)

    def server(self, log_path: Path) -> ServerProcess:
        """The postmaster, not started yet: no TCP, socket in the data folder, mode 0700."""
        command = [
            postgres_program("postgres"),
            "-D", str(self.data_dir), "-p", str(self.port),
            "-c", "listen_addresses=", "-c", f"unix_socket_directories={self.data_dir}",
            "-c", "unix_socket_permissions=0700",
        ]  # fmt: skip
        return ServerProcess(
            _as_postgres_user(command),
            ready=self._accepts_connections,
            log_path=log_path,
            stop_signal=signal.SIGINT,  # fast shutdown; SIGTERM would wait for mlflow to disconnect
            name="postgres",
        )

    def _accepts_connections(self) -> bool:
        command = [
            postgres_program("pg_isready"),
            "-q", "-h", str(self.data_dir), "-p", str(self.port), "-U", DB_USER,
        ]  # fmt: skip
        return subprocess.run(command, capture_output=True).returncode == 0

    def create_database(self, name: str) -> None:
        """CREATE DATABASE `name` unless it exists."""
        psql = [
            postgres_program("psql"),
            "-h", str(self.data_dir), "-p", str(self.port), "-U", DB_USER, "-d", "postgres",
            "-tAc",
        ]  # fmt: skip
        exists = subprocess.run(
            [*psql, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not exists:
            subprocess.run([*psql, f'CREATE DATABASE "{name}"'], capture_output=True, check=True)


def write_auth_config(path: Path, database_uri: str) -> Path:
    """The basic-auth app's settings file (no secrets: the admin password stays in the environment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = {database_uri}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def mlflow_server(
    backend_uri: str,
    auth_config: Path,
    artifacts_dir: Path,
    log_path: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """`mlflow server` with basic auth and proxied artifacts, not started yet.

    The backend URI travels in the environment rather than on the command
    line, where `ps` would show any password in it to every local user.
    """
    server_env = {**os.environ, **(env or {})}
    if not server_env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        raise ValueError("set MLFLOW_AUTH_ADMIN_PASSWORD: MLflow has no default admin password")
    # Signs the UI's CSRF tokens: one key per server life is enough for one worker, and
    # nothing stores it. Several workers or servers behind one URL need one shared key.
    server_env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    # The job runner serves GenAI scorers and evaluations, none of which this project uses;
    # it would add a supervisor and six consumer processes to every server.
    server_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    server_env.update(
        MLFLOW_BACKEND_STORE_URI=backend_uri,
        MLFLOW_AUTH_CONFIG_PATH=str(auth_config),
        MLFLOW_DISABLE_TELEMETRY="true",
        # uvicorn is started by name: this interpreter's bin/ must come first.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), server_env.get("PATH", "")]),
    )
    command = [
        Path(sys.executable).parent / "mlflow", "server", "--app-name", "basic-auth",
        "--host", host, "--port", str(port), "--workers", "1",
        "--artifacts-destination", str(artifacts_dir),
    ]  # fmt: skip
    return ServerProcess(
        command,
        ready=http_ok(f"http://{_client_host(host)}:{port}/health"),
        log_path=log_path,
        env=server_env,
        name=f"mlflow server on {host}:{port}",
    )


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def upgrade_schema(backend_uri: str) -> None:
    """`mlflow db upgrade`: bring an existing tracking database to this MLflow's schema."""
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    subprocess.run([mlflow_cli, "db", "upgrade", backend_uri], check=True)


@dataclass(frozen=True)
class TeamServerLayout:
    """Where a team server keeps its state: the cluster, artifacts, settings and logs."""

    root: Path

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def auth_config(self) -> Path:
        return self.root / "basic_auth.ini"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


@contextlib.contextmanager
def local_database(layout: TeamServerLayout, port: int | None = None) -> Iterator[PostgresCluster]:
    """A running private PostgreSQL cluster with the tracking and auth databases, stopped on exit."""
    cluster = PostgresCluster(layout.postgres, port or free_port())
    cluster.initialise()
    with cluster.server(layout.logs / "postgres.log"):
        cluster.create_database(TRACKING_DB)
        cluster.create_database(AUTH_DB)
        yield cluster


@contextlib.contextmanager
def team_server(
    layout: TeamServerLayout, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> Iterator[ServerProcess]:
    """The whole team server, running until the block ends.

    `MLFLOW_BACKEND_STORE_URI` and `MLFLOW_AUTH_DATABASE_URI` (both or neither)
    name an existing database server; without them a private cluster runs in
    `layout.postgres`.
    """
    backend_uri = os.environ.get("MLFLOW_BACKEND_STORE_URI")
    auth_uri = os.environ.get("MLFLOW_AUTH_DATABASE_URI")
    with contextlib.ExitStack() as stack:
        if not backend_uri:
            cluster = stack.enter_context(local_database(layout))
            backend_uri, auth_uri = cluster.uri(TRACKING_DB), cluster.uri(AUTH_DB)
        if not auth_uri:
            raise ValueError("MLFLOW_BACKEND_STORE_URI is set: set MLFLOW_AUTH_DATABASE_URI too")
        auth_config = write_auth_config(layout.auth_config, auth_uri)
        layout.artifacts.mkdir(parents=True, exist_ok=True)
        server = mlflow_server(
            backend_uri, auth_config, layout.artifacts, layout.logs / "mlflow.log", host, port
        )
        yield stack.enter_context(server)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m captioning.tracking.team_server", description=__doc__
    )
    parser.add_argument(
        "--dir", default="build/team", help="state folder (cluster, artifacts, logs)"
    )
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--upgrade",
        action="store_true",
        help="run `mlflow db upgrade` on the tracking database and exit",
    )
    args = parser.parse_args(argv)
    layout = TeamServerLayout(Path(args.dir).resolve())
    if args.upgrade:
        backend_uri = os.environ.get("MLFLOW_BACKEND_STORE_URI")
        if backend_uri:
            upgrade_schema(backend_uri)
            return
        with local_database(layout) as cluster:
            upgrade_schema(cluster.uri(TRACKING_DB))
        return
    # A service manager stops us with SIGTERM: leave through the `with` so both servers stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with team_server(layout, args.host, args.port) as server:
        print(
            f"MLflow team server on http://{_client_host(args.host)}:{args.port} (log: {server.log_path})"
        )
        print("stop with Ctrl-C", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()
    if server.process.returncode not in (0, -signal.SIGTERM, None):
        sys.exit(f"mlflow server exited with {server.process.returncode}\n{server.tail()}")


if __name__ == "__main__":
    main()
