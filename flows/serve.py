"""`vaepipe serve`: a Prefect server and a runner that serves the deployments, as two child processes.

    .vaepipe/prefect/            PREFECT_HOME of both (the server's sqlite database lives here)
    .vaepipe/prefect-server.log  the server's output
    .vaepipe/serve.pid           pids, for `vaepipe serve --stop` when this runs in the background

The server runs as a plain child: `prefect server start --background` dies soon after start (DESIGN.md).
Each child leads its own session, so Ctrl-C in this terminal reaches only this process, which then stops
the runner first (it still reports to the server) and the server last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

DEPLOYMENT = "train-vae/train-vae"  # Prefect's `flow/deployment` form; flow and deployment share the name
STOP_GRACE_S = 20.0
START_TIMEOUT_S = 120.0  # a fresh sqlite database takes ~15 s; the first start on a cold disk longer
# server, runner. SIGINT is the runner's Ctrl-C path; its SIGTERM handler (Prefect 3.8) calls a coroutine
# without awaiting it and warns.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def state_dir() -> Path:
    return Path.cwd() / ".vaepipe"


def pid_file() -> Path:
    return state_dir() / "serve.pid"


def api_url(host: str, port: int) -> str:
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is reached on loopback
    return f"http://{client_host}:{port}/api"


def child_env(api: str) -> dict[str, str]:
    """Environment of both children: PREFECT_HOME under the working directory, the API URL, no analytics."""
    env = {**os.environ, "PREFECT_HOME": str(state_dir() / "prefect"), "PREFECT_API_URL": api}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # off by default in Prefect 3.8: without them `prefect deployment run --watch` shows state changes only,
    # with them it also shows the flow's log lines (training progress included)
    env.setdefault("PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED", "true")
    env.setdefault("PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED", "true")
    return env


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def polled_since(url: str, since: datetime) -> bool:
    """True when the deployment at `url` exists and a runner has polled for its work after `since`.

    Mere existence says nothing: deployments outlive their runner in the server's database.
    """
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            last_polled = json.load(response).get("last_polled")
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return last_polled is not None and datetime.fromisoformat(last_polled) >= since


def wait_until(ready, procs: list[subprocess.Popen], timeout: float, what: str) -> None:
    """Poll `ready()` until it is true; fail early when one of `procs` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args[:4]} exited with {proc.returncode}")
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pid: int, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> None:
    """Signal the process group led by `pid`, then SIGKILL it when it is still there after `grace` s."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child; harmless otherwise
        except ChildProcessError:
            pass
        if not alive(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_runner() -> None:
    """The runner process: serve both deployments until SIGTERM or Ctrl-C (`prefect.serve` handles both)."""
    from prefect import serve as prefect_serve
    from prefect.types.entrypoint import EntrypointType

    from flows.ingest import ingest_dataset
    from flows.train import train_vae

    # a module entrypoint loads through the installed package, whatever the runner's working directory
    prefect_serve(
        train_vae.to_deployment("train-vae", entrypoint_type=EntrypointType.MODULE_PATH),
        ingest_dataset.to_deployment("ingest-dataset", entrypoint_type=EntrypointType.MODULE_PATH),
    )


def banner(host: str, port: int, api: str) -> str:
    ui = api.removesuffix("/api")
    example = json.dumps({"config": {"train": {"epochs": 1}}})
    return f"""
Prefect server  {ui}   (bound to {host}:{port}; log: {state_dir() / 'prefect-server.log'})
Prefect UI      {ui}
Deployments     {DEPLOYMENT}, ingest-dataset/ingest-dataset

In another shell:
  export PREFECT_API_URL={api}
  prefect deployment run {DEPLOYMENT} --watch
  prefect deployment run {DEPLOYMENT} --params '{example}' --watch

Stop: Ctrl-C here, or `vaepipe serve --stop` in {Path.cwd()} (pid file {pid_file()}).
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(host: str = "127.0.0.1", port: int = 4200) -> int:
    """Start the server and the runner, print how to use them, and stay in the foreground until stopped."""
    if pid_file().exists():
        pids = json.loads(pid_file().read_text())
        if alive(pids["serve"]):
            print(f"vaepipe serve is already running here (pid {pids['serve']}, {pids['api_url']}); "
                  "stop it with `vaepipe serve --stop`", file=sys.stderr)
            return 1
        pid_file().unlink()  # stale: its owner died without cleaning up
    api = api_url(host, port)
    if answers(f"{api}/health"):
        print(f"something already answers on {api}; choose another --port", file=sys.stderr)
        return 1
    state_dir().mkdir(parents=True, exist_ok=True)
    env = child_env(api)
    prefect_bin = Path(sys.executable).with_name("prefect")
    started = time.monotonic()
    procs: list[subprocess.Popen] = []
    # SIGTERM (from --stop, or a supervisor) unwinds like Ctrl-C so the `finally` below stops the children
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with open(state_dir() / "prefect-server.log", "ab") as log:
            procs.append(subprocess.Popen(
                [str(prefect_bin), "server", "start", "--host", host, "--port", str(port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            ))
        print(f"starting the Prefect server on {host}:{port} ...", flush=True)
        wait_until(lambda: answers(f"{api}/health"), procs, START_TIMEOUT_S, "Prefect server")
        print(f"server up after {time.monotonic() - started:.1f} s; starting the deployment runner ...", flush=True)
        runner_started = datetime.now(UTC)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--runner"], env=env, stdin=subprocess.DEVNULL,
            start_new_session=True,
        ))
        pid_file().write_text(json.dumps(
            {"serve": os.getpid(), "server": procs[0].pid, "runner": procs[1].pid, "api_url": api}
        ))
        url = f"{api}/deployments/name/{DEPLOYMENT}"
        wait_until(lambda: polled_since(url, runner_started), procs, START_TIMEOUT_S, "deployment runner")
        print(f"ready after {time.monotonic() - started:.1f} s", flush=True)
        print(banner(host, port, api), flush=True)
        while all(proc.poll() is None for proc in procs):
            time.sleep(1)
        dead = next(proc for proc in procs if proc.poll() is not None)
        print(f"{dead.args[:4]} exited with {dead.returncode}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}; see {state_dir() / 'prefect-server.log'}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C or --stop must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        # the runner first, while the server still answers it
        for proc, sig in reversed(list(zip(procs, STOP_SIGNALS[: len(procs)], strict=True))):
            stop_group(proc.pid, sig)
            proc.wait()
        pid_file().unlink(missing_ok=True)


def stop() -> int:
    """`vaepipe serve --stop`: ask the serving process to shut down; kill its children if it is gone."""
    if not pid_file().exists():
        print(f"no {pid_file()}: nothing is served from {Path.cwd()}", file=sys.stderr)
        return 1
    pids = json.loads(pid_file().read_text())
    if alive(pids["serve"]):
        os.kill(pids["serve"], signal.SIGTERM)
        deadline = time.monotonic() + 3 * STOP_GRACE_S
        # it removes the pid file as its last step; its pid alone can linger as an unreaped zombie
        while pid_file().exists() and alive(pids["serve"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    for name, sig in (("runner", STOP_SIGNALS[1]), ("server", STOP_SIGNALS[0])):
        if alive(pids[name]):
            stop_group(pids[name], sig)
    pid_file().unlink(missing_ok=True)
    print(f"stopped the Prefect server and runner of {pids['api_url']}")
    return 0


if __name__ == "__main__":
    # a shell starts background jobs with SIGINT ignored and children inherit that; restore Ctrl-C's
    # KeyboardInterrupt first thing, as `vaepipe serve` stops this process with SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[1:] != ["--runner"]:
        sys.exit("usage: python -m flows.serve --runner (started by `vaepipe serve`)")
    run_runner()
