"""Building blocks of the team tests: the team server with users, and an OpenSSH DVC remote.

Both run on 127.0.0.1 only, on free ports, through `captioning.server_process`
(the one way this project starts and stops servers), so they stop however a
test ends. The MLflow side is `captioning.tracking.team_server` itself: a private
PostgreSQL cluster and `mlflow server` with basic auth and proxied artifacts.
The SSH side is Debian's `sshd` in the foreground with its own host key,
config and authorized key, and a HOME whose `.ssh/known_hosts` trusts that
host key: DVC's SSH client (asyncssh) reads known hosts from HOME, so the
caller's own ~/.ssh is never read or written.

Passwords are made per test session and live only in environment mappings.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from captioning.server_process import ServerProcess, free_port, port_open
from captioning.tracking import team_server

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def missing_programs() -> list[str]:
    """What the team tests need and this machine lacks (`.ci/run` installs them)."""
    missing = [] if Path(SSHD).exists() and shutil.which("ssh-keygen") else ["openssh-server"]
    try:
        for name in ("initdb", "postgres", "pg_isready", "psql"):
            team_server.postgres_program(name)
    except FileNotFoundError:
        missing.append("postgresql")
    return missing


def new_password() -> str:
    return "pw-" + secrets.token_urlsafe(18)


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    password: str

    @property
    def auth(self) -> tuple[str, str]:
        return (self.name, self.password)

    def env(self, url: str) -> dict[str, str]:
        """What a client of the server sets: the bare URL and this login."""
        return {
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_TRACKING_USERNAME": self.name,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }


@dataclasses.dataclass
class TeamServer:
    """A running team server: its URL, the admin, its state and the `mlflow server` process."""

    url: str
    admin: User
    layout: team_server.TeamServerLayout
    port: int
    make_process: Callable[[], ServerProcess]
    process: ServerProcess | None = None

    def start(self) -> None:
        """Start `mlflow server` (again, after a kill: same port, same database)."""
        self.process = self.make_process()
        self.process.start()

    def add_user(self, name: str) -> User:
        user = User(name, new_password())
        response = requests.post(
            f"{self.url}/api/2.0/mlflow/users/create",
            json={"username": user.name, "password": user.password},
            auth=self.admin.auth,
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return user


@contextmanager
def running_team_server(root: Path) -> Iterator[TeamServer]:
    """The team server in `root`: PostgreSQL + `mlflow server --app-name basic-auth`."""
    layout = team_server.TeamServerLayout(root)
    admin = User("admin", new_password())
    port = free_port()
    env = {"MLFLOW_AUTH_ADMIN_PASSWORD": admin.password, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with team_server.local_database(layout) as cluster:
        auth_config = team_server.write_auth_config(
            layout.auth_config, cluster.uri(team_server.AUTH_DB)
        )
        layout.artifacts.mkdir(parents=True, exist_ok=True)

        def mlflow_server() -> ServerProcess:
            return team_server.mlflow_server(
                cluster.uri(team_server.TRACKING_DB),
                auth_config,
                layout.artifacts,
                layout.logs / "mlflow.log",
                port=port,
                env=env,
            )

        server = TeamServer(f"http://127.0.0.1:{port}", admin, layout, port, mlflow_server)
        try:
            server.start()
            yield server
        finally:
            if server.process is not None:
                server.process.stop(grace_s=10)


def postgres_reachable_dir(prefix: str) -> Path:
    """A fresh folder under the system temp dir that the postgres user can traverse into.

    pytest's own tmp folders are 0700 and owned by the caller, which PostgreSQL
    (run as `postgres` when we are root) cannot enter.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


@dataclasses.dataclass(frozen=True)
class SshRemote:
    """An sshd on 127.0.0.1 serving `storage`, and what a DVC client needs to use it."""

    port: int
    user: str
    storage: Path
    key: Path  # the client's private key
    home: Path  # HOME for clients: .ssh/known_hosts trusts this server's host key

    def url(self, folder: str = "dvc") -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{self.storage / folder}"

    def client_env(self) -> dict[str, str]:
        return {"HOME": str(self.home)}


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "team-test", "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


@contextmanager
def running_ssh_remote(root: Path) -> Iterator[SshRemote]:
    """`sshd -D` with key-only logins for the current user, on a free 127.0.0.1 port."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    host_public = _keygen(root / "host_ed25519")
    client_public = _keygen(root / "client_ed25519")
    (root / "authorized_keys").write_text(client_public + "\n")
    home = root / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    key_type, key_body = host_public.split()[:2]
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {key_type} {key_body}\n")
    storage = root / "storage"
    storage.mkdir()
    config = root / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\n"
        f"HostKey {root / 'host_ed25519'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
        f"PidFile {root / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        "UsePAM no\nStrictModes no\n"  # pytest's temp folders are not root-owned 0755 chains
        "Subsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    sshd = ServerProcess(
        [SSHD, "-D", "-e", "-f", config],
        ready=port_open("127.0.0.1", port),
        log_path=root / "sshd.log",
        name=f"sshd on 127.0.0.1:{port}",
    )
    with sshd:
        yield SshRemote(port, getpass.getuser(), storage, root / "client_ed25519", home)
