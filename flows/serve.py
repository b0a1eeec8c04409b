"""`vaepipe serve` and `vaepipe status`: a Prefect server, an MLflow server and a deployment runner.

    .vaepipe/prefect/              PREFECT_HOME of the Prefect server and the runner (its sqlite database)
    .vaepipe/mlflow/mlflow.db      the MLflow server's backend store
    .vaepipe/mlflow/artifacts/     its artifact store; clients reach it through the server (mlflow-artifacts:/)
    .vaepipe/*-server.log          the servers' output
    .vaepipe/serve.pid             JSON: pid of `vaepipe serve`, and pid, port, URL of each child, each pid with
                                   its process's command line and start time (a reused pid is never signalled)

Each child is a plain child (`prefect server start --background` dies soon after start, DESIGN.md) leading
its own session, so Ctrl-C in this terminal reaches only this process, which then stops the runner first
(it still reports to the servers) and the servers last. The runner serves `train-vae/train-vae` with a
deployment concurrency limit (default 1: two training runs never share the GPUs; a run that finds the
slot taken waits in Scheduled/AwaitingConcurrencySlot) and `ingest-dataset/ingest-dataset`, and logs to
the served MLflow through MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from flows import processes

DEPLOYMENT = "train-vae/train-vae"  # Prefect's `flow/deployment` form; flow and deployment share the name
DEPLOYMENTS = (DEPLOYMENT, "ingest-dataset/ingest-dataset")
STOP_GRACE_S = 20.0
START_TIMEOUT_S = 180.0  # a fresh sqlite database takes ~15 s; both servers at once on 2 busy cores longer
STATUS_NOT_RUNNING = 3  # `vaepipe status` when any part is down (as an LSB init script's `status`)
# Each child's stop signal. SIGINT is the runner's Ctrl-C path: its SIGTERM handler (seen in Prefect 3.8) calls a
# coroutine without awaiting it and warns.
STOP_SIGNAL = {"runner": signal.SIGINT, "mlflow-server": signal.SIGTERM, "prefect-server": signal.SIGTERM}
STOP_ORDER = ("runner", "mlflow-server", "prefect-server")


@dataclass(frozen=True)
class Ports:
    prefect: int = 4200
    mlflow: int = 5000
    runner: int = 4201  # the runner's health endpoint (Prefect's runner webserver)


@dataclass(frozen=True)
class Child:
    """One served process, as recorded in the state file."""

    pid: int
    port: int
    url: str  # what a person opens or exports
    health: str  # answers 200 while the process works
    cmdline: list[str] | None = None  # with create_time, tells this process from a later one given the same pid
    create_time: float | None = None  # seconds since the epoch (psutil)


def state_dir() -> Path:
    return Path.cwd() / ".vaepipe"


def pid_file() -> Path:
    return state_dir() / "serve.pid"


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is reached on loopback


def api_url(host: str, port: int) -> str:
    return f"http://{client_host(host)}:{port}/api"


def child_env(api: str) -> dict[str, str]:
    """Environment of the Prefect children: PREFECT_HOME under the working directory, the API URL, no analytics."""
    env = {**os.environ, "PREFECT_HOME": str(state_dir() / "prefect"), "PREFECT_API_URL": api}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # off by default in Prefect 3.8: without them `prefect deployment run --watch` shows state changes only,
    # with them it also shows the flow's log lines (training progress included)
    env.setdefault("PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED", "true")
    env.setdefault("PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED", "true")
    return env


def commands(host: str, ports: Ports, train_concurrency: int) -> dict[str, list[str]]:
    """The three children's command lines (all bound to `host`)."""
    bin_dir = Path(sys.executable).parent
    mlflow_dir = (state_dir() / "mlflow").resolve()
    return {
        "prefect-server": [str(bin_dir / "prefect"), "server", "start", "--host", host, "--port", str(ports.prefect)],
        # one worker: sqlite takes one writer; artifacts are proxied, so clients need no access to the directory
        "mlflow-server": [
            str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", str(mlflow_dir / "artifacts"), "--host", host, "--port", str(ports.mlflow),
            "--workers", "1",
        ],
        "runner": [sys.executable, "-m", "flows.serve", "--runner", "--train-concurrency", str(train_concurrency)],
    }


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):  # ValueError: no URL recorded
        return False


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
    """Whether `pid` runs; a zombie (exited, not yet reaped by its parent) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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


def deployments(train_concurrency: int = 1, work_pool: str | None = None, working_dir: str | None = None) -> list:
    """The two deployments; `train-vae` admits `train_concurrency` runs at once, later ones wait their turn.

    `work_pool` registers them for a worker's pool (infra/compose.yaml) instead of this process's runner.
    """
    # imported here, not at the top, for their cost: the flows pull in torch and Prefect (~3.3 s), which
    # `vaepipe serve`, `status` and `--stop` never need; only the runner and --deploy call this
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from flows.ingest_dataset import ingest_dataset  # deferred: heavy (torch, Prefect), see above
    from flows.train_vae import train_vae  # deferred: heavy (torch, Prefect, MLflow), see above

    if train_concurrency < 1:  # the server deadlocks every run of a deployment limited to 0
        raise ValueError(f"train_concurrency must be at least 1, got {train_concurrency}")
    limit = ConcurrencyLimitConfig(limit=train_concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    # a module entrypoint loads through the installed package, whatever the runner's working directory
    pool = {} if work_pool is None else {
        "work_pool_name": work_pool, "job_variables": {"working_dir": working_dir} if working_dir else {}
    }
    return [
        train_vae.to_deployment("train-vae", entrypoint_type=EntrypointType.MODULE_PATH, concurrency_limit=limit,
                                **pool),
        ingest_dataset.to_deployment("ingest-dataset", entrypoint_type=EntrypointType.MODULE_PATH, **pool),
    ]


def run_runner(train_concurrency: int) -> None:
    """The runner process: serve both deployments until SIGTERM or Ctrl-C (`prefect.serve` handles both)."""
    from prefect import serve as prefect_serve  # deferred: Prefect costs ~1 s that `vaepipe status` never needs

    prefect_serve(*deployments(train_concurrency))


def deploy_to_pool(pool: str, train_concurrency: int, working_dir: str | None) -> None:
    """Register both deployments for the workers of `pool` at PREFECT_API_URL (a team's server)."""
    for deployment in deployments(train_concurrency, pool, working_dir):
        deployment_id = deployment.apply(work_pool_name=pool)
        print(f"deployed {deployment.flow_name}/{deployment.name} to work pool {pool!r} ({deployment_id})")


def banner(host: str, children: dict[str, Child], train_concurrency: int) -> str:
    api = children["prefect-server"].url
    mlflow_url = children["mlflow-server"].url
    example = json.dumps({"overrides": ["--train.epochs", "1"]})  # fields of the default (the demo's) config
    return f"""
Prefect UI      {api.removesuffix('/api')}   (log: {state_dir() / 'prefect-server.log'})
Prefect API     {api}
MLflow UI       {mlflow_url}   (log: {state_dir() / 'mlflow-server.log'})
Runner health   {children['runner'].health}
Deployments     {', '.join(DEPLOYMENTS)}   ({DEPLOYMENT}: at most {train_concurrency} run(s) at once)
All bound to {host}.

In another shell:
  export PREFECT_API_URL={api}
  export MLFLOW_TRACKING_URI={mlflow_url}
  prefect deployment run {DEPLOYMENT} --watch
  prefect deployment run {DEPLOYMENT} --params '{example}' --watch

Status: `vaepipe status`. Stop: Ctrl-C here, or `vaepipe serve --stop` in {Path.cwd()} (state {pid_file()}).
"""


def write_state(host: str, children: dict[str, Child]) -> None:
    state = {"serve": os.getpid(), "serve_identity": processes.identity(os.getpid()), "host": host,
             "api_url": children["prefect-server"].url,
             "children": {name: asdict(child) for name, child in children.items()}}
    tmp = pid_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(pid_file())  # `vaepipe status` never reads half a file


def read_state() -> dict | None:
    try:
        state = json.loads(pid_file().read_text())
    except FileNotFoundError:
        return None
    if "children" not in state:  # written by the earlier two-process `vaepipe serve`: pids only
        state["children"] = {name: {"pid": state[key], "port": 0, "url": state["api_url"], "health": ""}
                             for name, key in (("prefect-server", "server"), ("runner", "runner")) if key in state}
    return state


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@dataclass(frozen=True)
class Planned:
    """One child before it starts: where it answers, what runs, where its output goes."""

    title: str  # how messages name it
    port: int
    url: str  # what a person opens or exports
    health: str  # answers 200 once the child works
    option: str  # the `vaepipe serve` option that sets `port`, named when the port is taken
    argv: list[str]
    env: dict[str, str]
    log: str | None  # a file under state_dir() (the servers); None: this terminal (the runner's flow runs' progress)


def plan_children(host: str, ports: Ports, train_concurrency: int) -> dict[str, Planned]:
    """The three children in start order: the Prefect server, the MLflow server, the runner."""
    api, mlflow_url = api_url(host, ports.prefect), f"http://{client_host(host)}:{ports.mlflow}"
    runner_url = f"http://{client_host(host)}:{ports.runner}"
    argv, env = commands(host, ports, train_concurrency), child_env(api)
    # MLflow 3.17's job runner (~8 huey consumer processes) serves GenAI features vaepipe does not use
    mlflow_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # the runner's flow runs log to the served MLflow; its webserver answers /health while it polls
    runner_env = {**env, "MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_RUNNER_SERVER_ENABLE": "true",
                  "PREFECT_RUNNER_SERVER_HOST": host, "PREFECT_RUNNER_SERVER_PORT": str(ports.runner)}
    return {
        "prefect-server": Planned("Prefect server", ports.prefect, api, f"{api}/health", "--port",
                                  argv["prefect-server"], env, "prefect-server.log"),
        "mlflow-server": Planned("MLflow server", ports.mlflow, mlflow_url, f"{mlflow_url}/health", "--mlflow-port",
                                 argv["mlflow-server"], mlflow_env, "mlflow-server.log"),
        "runner": Planned("deployment runner", ports.runner, runner_url, f"{runner_url}/health", "--runner-port",
                          argv["runner"], runner_env, None),
    }


def already_serving() -> bool:
    """Whether a `vaepipe serve` runs from this directory already (said on stderr); a dead one's record is removed."""
    state = read_state()
    if state is None:
        return False
    if serving(state):
        print(f"vaepipe serve is already running here (pid {state['serve']}, {state['api_url']}); "
              "stop it with `vaepipe serve --stop`", file=sys.stderr)
        return True
    pid_file().unlink()  # stale: its owner died without cleaning up
    return False


def refusal(planned: dict[str, Planned]) -> str | None:
    """Why the children cannot start as planned (two share a port, or something answers on one already), or None."""
    ports = [child.port for child in planned.values()]
    if len(set(ports)) < len(ports):
        return f"--port, --mlflow-port and --runner-port must differ, got {', '.join(map(str, ports))}"
    for name, child in planned.items():
        if answers(child.health):
            return f"something already answers on {child.health} (for the {name}); choose another {child.option}"
    return None


class Children:
    """The children one `vaepipe serve` started: their processes, and their records in the state file."""

    def __init__(self, host: str, planned: dict[str, Planned]) -> None:
        self.host = host
        self.planned = planned
        self.procs: dict[str, subprocess.Popen] = {}  # by name, in start order
        self.records: dict[str, Child] = {}  # what the state file holds

    def start(self, name: str) -> None:
        """Start child `name` leading its own session, and record it at once: `--stop` also cleans up a start
        that hangs."""
        plan = self.planned[name]
        with open(state_dir() / plan.log, "ab") if plan.log else contextlib.nullcontext() as log:
            out = {"stdout": log, "stderr": subprocess.STDOUT} if plan.log else {}
            proc = self.procs[name] = subprocess.Popen(plan.argv, env=plan.env, stdin=subprocess.DEVNULL,
                                                       start_new_session=True, **out)
        try:  # Popen returns after the exec, so this is the child's own command line
            known = processes.identity(proc.pid)
        except psutil.NoSuchProcess:  # it died at once; wait_ready reports its exit
            known = {}
        self.records[name] = Child(proc.pid, plan.port, plan.url, plan.health, **known)
        write_state(self.host, self.records)

    def wait_ready(self, name: str) -> None:
        """Until child `name` answers its health URL; RuntimeError when a started child exits first, TimeoutError
        after START_TIMEOUT_S."""
        plan = self.planned[name]
        wait_until(lambda: answers(plan.health), list(self.procs.values()), START_TIMEOUT_S, plan.title)

    def watch(self) -> int:
        """Block while every child runs; when one exits, say which and return 1."""
        while all(proc.poll() is None for proc in self.procs.values()):
            time.sleep(1)
        dead = next(name for name, proc in self.procs.items() if proc.poll() is not None)
        print(f"the {dead} ({self.procs[dead].args[:4]}) exited with {self.procs[dead].returncode}; stopping",
              file=sys.stderr)
        return 1

    def stop(self) -> None:
        """Stop every started child, the runner first while the servers still answer it; then drop the state file."""
        for name in STOP_ORDER:
            if name in self.procs:
                stop_group(self.procs[name].pid, STOP_SIGNAL[name])
                self.procs[name].wait()
        pid_file().unlink(missing_ok=True)


def start_and_watch(children: Children, train_concurrency: int) -> int:
    """Start both servers at once, the runner once they answer, print the banner; then `children.watch()`."""
    started = time.monotonic()
    host, planned = children.host, children.planned
    print(f"starting the Prefect server on {host}:{planned['prefect-server'].port} and the MLflow server on "
          f"{host}:{planned['mlflow-server'].port} ...", flush=True)
    children.start("prefect-server")
    children.start("mlflow-server")  # both start at once: each takes ~15 s
    children.wait_ready("prefect-server")
    children.wait_ready("mlflow-server")
    print(f"servers up after {time.monotonic() - started:.1f} s; starting the deployment runner ...", flush=True)
    children.start("runner")
    children.wait_ready("runner")
    print(f"ready after {time.monotonic() - started:.1f} s", flush=True)
    print(banner(host, children.records, train_concurrency), flush=True)
    mlflow_url, shell_uri = planned["mlflow-server"].url, os.environ.get("MLFLOW_TRACKING_URI")
    if shell_uri and shell_uri != mlflow_url:
        print(f"note: flow runs log to {mlflow_url}, not to MLFLOW_TRACKING_URI={shell_uri} of this shell "
              "(a run's config.tracking.tracking_uri still overrides both)", flush=True)
    return children.watch()


def serve(host: str = "127.0.0.1", port: int = 4200, mlflow_port: int = 5000, runner_port: int = 4201,
          train_concurrency: int = 1) -> int:
    """Start the servers and the runner, print how to use them, and stay in the foreground until stopped."""
    if already_serving():
        return 1
    planned = plan_children(host, Ports(port, mlflow_port, runner_port), train_concurrency)
    if (why := refusal(planned)) is not None:
        print(why, file=sys.stderr)
        return 1
    (state_dir() / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    children = Children(host, planned)
    # SIGTERM (from --stop, or a supervisor) unwinds like Ctrl-C so the `finally` below stops the children
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return start_and_watch(children, train_concurrency)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}; see {state_dir() / 'prefect-server.log'} and {state_dir() / 'mlflow-server.log'}",
              file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C or --stop must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        children.stop()


def ours(pid: int, recorded: dict, say) -> bool:
    """Whether `pid` still runs the recorded process; `say(message)` when another process holds it now."""
    try:
        return processes.is_ours(pid, recorded)
    except processes.NotOurs as err:
        say(str(err))
        return False


def serving(state: dict) -> bool:
    """Whether the recorded `vaepipe serve` process still runs (not merely its pid)."""
    return ours(state["serve"], state.get("serve_identity", {}), lambda message: print(f"note: {message}"))


def stop() -> int:
    """`vaepipe serve --stop`: ask the serving process to shut down; stop its children itself if it is gone.

    Only processes that still match their record (command line and start time) are signalled: after a reboot
    or a crash the pids may belong to anyone's processes now."""
    state = read_state()
    if state is None:
        print(f"no {pid_file()}: nothing is served from {Path.cwd()}", file=sys.stderr)
        return 1

    def not_signalling(message: str) -> None:
        print(f"{message}; not signalling; removing stale record", file=sys.stderr)

    if ours(state["serve"], state.get("serve_identity", {}), not_signalling):
        os.kill(state["serve"], signal.SIGTERM)
        deadline = time.monotonic() + (len(STOP_ORDER) + 1) * STOP_GRACE_S
        # it removes the pid file as its last step; its pid alone can linger as an unreaped zombie
        while pid_file().exists() and alive(state["serve"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    for name in STOP_ORDER:
        child = state["children"].get(name)
        if child is not None and ours(child["pid"], child, not_signalling):
            stop_group(child["pid"], STOP_SIGNAL[name])
    pid_file().unlink(missing_ok=True)
    print(f"stopped the Prefect server, the MLflow server and the runner of {state['api_url']}")
    return 0


def status() -> int:
    """`vaepipe status`: one line per served process; 0 when all run, STATUS_NOT_RUNNING (3) otherwise."""
    state = read_state()
    if state is None:
        for name in reversed(STOP_ORDER):
            print(f"{name:15} stopped")
        print(f"nothing is served from {Path.cwd()} (no {pid_file()}); start it with `vaepipe serve`")
        return STATUS_NOT_RUNNING
    running = 0
    for name in reversed(STOP_ORDER):
        child = state["children"].get(name)
        if child is None:
            print(f"{name:15} stopped      (not started yet)")
            continue
        held_by = []
        pid_ok, url_ok = ours(child["pid"], child, held_by.append), answers(child["health"])
        running += pid_ok and url_ok
        word = "running" if pid_ok and url_ok else "stopped" if not pid_ok else "not answering"
        pid_says = "pid alive" if pid_ok else held_by[0] if held_by else "pid gone"
        why = "" if pid_ok and url_ok else f"; {pid_says}, {child['health']} " + (
            "answers" if url_ok else "does not answer")
        print(f"{name:15} {word:12} {child['url']}  (pid {child['pid']}{why})")
    if not ours(state["serve"], state.get("serve_identity", {}), lambda message: None):
        print(f"note: `vaepipe serve` (pid {state['serve']}) is gone; `vaepipe serve --stop` cleans up")
    return 0 if running == len(STOP_ORDER) else STATUS_NOT_RUNNING


def served_mlflow_url() -> str | None:
    """The URL of the MLflow server `vaepipe serve` runs from this directory, when its process is the recorded one
    and the URL answers; else None (`vaepipe models` then falls back to ./mlflow.db)."""
    state = read_state()
    child = (state or {}).get("children", {}).get("mlflow-server")
    if child is None or not ours(child["pid"], child, lambda message: None) or not answers(child["health"]):
        return None
    return child["url"]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.serve`: the runner `vaepipe serve` starts, or registering the deployments for a work pool."""
    # a shell starts background jobs with SIGINT ignored and children inherit that; restore Ctrl-C's
    # KeyboardInterrupt first thing, as `vaepipe serve` stops this process with SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description="--runner: the runner started by `vaepipe serve`. --deploy POOL: register both deployments "
        "for the workers of a work pool on the server at PREFECT_API_URL (infra/compose.yaml).",
    )
    mode = cli.add_mutually_exclusive_group(required=True)
    mode.add_argument("--runner", action="store_true")
    mode.add_argument("--deploy", metavar="POOL")
    cli.add_argument("--train-concurrency", type=positive_int, default=1)
    cli.add_argument("--working-dir", help="with --deploy: the worker's directory for runs (data/, runs/)")
    args = cli.parse_args(argv)
    if args.runner:
        run_runner(args.train_concurrency)
    else:
        deploy_to_pool(args.deploy, args.train_concurrency, args.working_dir)


if __name__ == "__main__":
    main()
