"""The servers tests start on 127.0.0.1, one launcher per kind: `MlflowServer` (any backend store, MLflow's job
runner off) and `PrefectServer` (any database). Each runs in its own process group, so the workers a server CLI
forks go down with it, and logs to server.log in its root; stop() waits until the port refuses connections, and
start() again brings it back on the same port over the same stores (the fault tests' outages).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s:\n{log.read_text() if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM `proc` alone, SIGKILL after 15 s; reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL after 15 s; reap it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def mlflow_server_env() -> dict[str, str]:
    """The environment of a test MLflow server: without the job runner (MLflow 3.17 starts ~8 huey consumer
    processes for its GenAI jobs, which vaepipe never uses; on 2 cores their polling slows every test)."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class Server:
    """A server command on 127.0.0.1:`port` in its own process group, with `env`, run in `root`."""

    health = "/health"  # the path that answers 200 once the server serves

    def __init__(self, root: Path, env: dict[str, str], port: int | None = None, timeout: float = 180) -> None:
        self.root, self.env, self.timeout = Path(root), env, timeout
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.root.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start it and return once it answers (the start-up wait is `timeout` s: a loaded 2-core machine is slow)."""
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                         env=self.env, start_new_session=True)
        try:
            wait_http(self.url + self.health, timeout=self.timeout, proc=self.proc, log=self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the whole group, and return once the port refuses connections (down, not merely slow)."""
        if self.proc is not None:
            kill_group(self.proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"port {self.port} still answers after the server was stopped:\n{self.log.read_text()}")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class MlflowServer(Server):
    """`mlflow server` with one worker and no job runner; runs in `backend` (default: sqlite in root), artifacts
    under root/artifacts. `uri` is the tracking URI."""

    def __init__(self, root: Path, backend: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, timeout: float = 180) -> None:
        self.backend = backend or f"sqlite:///{Path(root) / 'mlflow.db'}"
        super().__init__(root, {**mlflow_server_env(), **(env or {})}, port, timeout)
        self.uri = self.url

    def command(self) -> list[str]:
        return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", self.backend, "--artifacts-destination", str(self.root / "artifacts")]


class PrefectServer(Server):
    """`prefect server start` with every service and no UI, its database at `database` (a SQLAlchemy URL; default:
    sqlite in root) under the variable infra/compose.yaml sets, its home in root/home, no API URL inherited from the
    shell. `api` is its PREFECT_API_URL."""

    health = "/api/health"
    DATABASE_VARS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")

    def __init__(self, root: Path, database: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, timeout: float = 180) -> None:
        root = Path(root)
        base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and k not in self.DATABASE_VARS}
        base.update(PREFECT_HOME=str(root / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PREFECT_UI_ENABLED="false",
                    PREFECT_API_DATABASE_CONNECTION_URL=database or f"sqlite+aiosqlite:///{root / 'prefect.db'}")
        super().__init__(root, {**base, **(env or {})}, port, timeout)
        self.api = f"{self.url}/api"

    def command(self) -> list[str]:
        return [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
