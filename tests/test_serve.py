"""`vaepipe serve` / `vaepipe status` / `vaepipe serve --stop`: real Prefect and MLflow servers and a runner.

The served test starts everything on free loopback ports (never the defaults), runs two `train-vae` flow
runs at once through the deployment, and checks that the deployment's concurrency limit of 1 kept them apart
and that both logged to the served MLflow server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import yaml
from conftest import BIN, REPO, free_port, run, stop, wait_http

from flows import processes
from flows import serve as served


def _api(url: str, body: dict | None = None):
    """GET (or POST `body` to) a server's REST endpoint; the decoded JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _kill_leftovers(state_file: Path) -> None:
    """Whatever a failed test left running, by the process groups the state file names."""
    try:
        state = json.loads(state_file.read_text())
    except (FileNotFoundError, ValueError):
        return
    for child in state.get("children", {}).values():
        try:
            os.killpg(child["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_train_deployment_carries_an_enqueueing_concurrency_limit():
    train, ingest = served.deployments(train_concurrency=2)
    assert (train.flow_name, train.name) == ("train-vae", "train-vae")
    assert train.concurrency_limit == 2
    assert train.concurrency_options.collision_strategy == "ENQUEUE"  # wait for the slot, never cancel
    assert ingest.concurrency_limit is None
    with pytest.raises(ValueError, match="at least 1"):
        served.deployments(train_concurrency=0)


def test_serve_rejects_a_zero_train_concurrency_before_starting_anything(tmp_path):
    result = run([str(BIN / "vaepipe"), "serve", "--train-concurrency", "0"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--train-concurrency" in result.stderr and "at least 1" in result.stderr
    assert not (tmp_path / ".vaepipe").exists()


def test_status_reports_stopped_with_status_3_when_nothing_is_served(tmp_path):
    result = run([str(BIN / "vaepipe"), "status"], cwd=tmp_path, timeout=60)
    assert result.returncode == served.STATUS_NOT_RUNNING == 3, result.stdout + result.stderr
    for name in ("prefect-server", "mlflow-server", "runner"):
        assert f"{name}" in result.stdout
    assert "running" not in result.stdout
    assert "vaepipe serve" in result.stdout  # says how to start it


def test_status_reports_a_dead_child_as_stopped(tmp_path):
    """A state file whose processes are gone (a crashed serve) is reported stopped, not running."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    state_dir = tmp_path / ".vaepipe"
    state_dir.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    child = {"pid": dead.pid, "port": 1, "url": url, "health": f"{url}/health"}
    (state_dir / "serve.pid").write_text(json.dumps({
        "serve": dead.pid, "host": "127.0.0.1", "api_url": f"{url}/api",
        "children": {"prefect-server": child, "mlflow-server": child, "runner": child},
    }))
    result = run([str(BIN / "vaepipe"), "status"], cwd=tmp_path, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.count("stopped") == 3 and "pid gone" in result.stdout
    assert "serve --stop" in result.stdout


def test_a_process_is_ours_while_its_pid_command_line_and_start_time_match():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        recorded = processes.identity(proc.pid)
        assert processes.is_ours(proc.pid, recorded)
        with pytest.raises(processes.NotOurs, match="another process"):
            processes.is_ours(proc.pid, {**recorded, "create_time": recorded["create_time"] - 3600})
        with pytest.raises(processes.NotOurs, match="no recorded identity"):  # an older vaepipe's record
            processes.is_ours(proc.pid, {})
        proc.kill()
        deadline = time.monotonic() + 30
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert not processes.is_ours(proc.pid, recorded)
    finally:
        stop(proc)
    assert not processes.is_ours(proc.pid, recorded)  # reaped: the pid is gone


def test_the_identity_recorded_right_after_popen_has_the_new_command_line():
    """Popen returns a moment before Linux shows the exec'd command line (a third of the time here, for a script):
    `vaepipe serve` recorded [] for its Prefect server, then called it another process."""
    for _ in range(20):
        proc = subprocess.Popen([str(BIN / "prefect"), "--version"], stdout=subprocess.DEVNULL)
        try:
            assert processes.identity(proc.pid)["cmdline"][1:] == [str(BIN / "prefect"), "--version"]
        finally:
            stop(proc)


@pytest.fixture(params=["cmdline", "create_time"])
def reused_pids(request, tmp_path):
    """A state file whose recorded pids now belong to unrelated processes (`sleep 60`, each leading its own
    process group, as a served child does), differing from the record in command line or in start time: what
    `vaepipe serve --stop` and `vaepipe status` find after a reboot or a crash. Yields those processes."""
    imposters = {name: subprocess.Popen(["sleep", "60"], start_new_session=True) for name in ("serve", "child")}

    def record(name: str, ours: list[str]) -> dict:  # what `vaepipe serve` recorded for the pid, long ago
        real = processes.identity(imposters[name].pid)
        if request.param == "cmdline":
            return {**real, "cmdline": ours}
        return {**real, "create_time": real["create_time"] - 3600}

    url = f"http://127.0.0.1:{free_port()}"
    children = {name: {"pid": imposters["child"].pid, "port": 1, "url": url, "health": f"{url}/health",
                       **record("child", [str(BIN / "python"), "-m", "flows.serve", "--runner"])}
                for name in ("prefect-server", "mlflow-server", "runner")}
    state_file = tmp_path / ".vaepipe" / "serve.pid"
    state_file.parent.mkdir()
    state_file.write_text(json.dumps({
        "serve": imposters["serve"].pid, "serve_identity": record("serve", [str(BIN / "vaepipe"), "serve"]),
        "host": "127.0.0.1", "api_url": f"{url}/api", "children": children,
    }))
    try:
        yield imposters
    finally:
        for proc in imposters.values():
            stop(proc)


def test_stop_leaves_alone_a_process_that_reused_a_recorded_pid(tmp_path, reused_pids):
    stopped = run([str(BIN / "vaepipe"), "serve", "--stop"], cwd=tmp_path, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for proc in reused_pids.values():
        assert f"pid {proc.pid} is now another process (sleep 60" in stopped.stderr, stopped.stderr
    assert stopped.stderr.count("not signalling; removing stale record") == 4, stopped.stderr
    assert not (tmp_path / ".vaepipe" / "serve.pid").exists()
    assert all(proc.poll() is None for proc in reused_pids.values()), "an unrelated process was signalled"


def test_stop_still_stops_recorded_children_whose_identity_matches(tmp_path):
    """The other side: a crashed `vaepipe serve` (gone) left a child running; `--stop` stops it."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        url = f"http://127.0.0.1:{free_port()}"
        record = {"pid": child.pid, "port": 1, "url": url, "health": f"{url}/health", **processes.identity(child.pid)}
        (tmp_path / ".vaepipe").mkdir()
        (tmp_path / ".vaepipe" / "serve.pid").write_text(json.dumps({
            "serve": gone.pid, "serve_identity": {"cmdline": ["vaepipe", "serve"], "create_time": 0.0},
            "host": "127.0.0.1", "api_url": f"{url}/api", "children": {"runner": record},
        }))
        stopped = run([str(BIN / "vaepipe"), "serve", "--stop"], cwd=tmp_path, timeout=120)
        assert stopped.returncode == 0 and "not signalling" not in stopped.stderr, stopped.stdout + stopped.stderr
        assert child.wait(timeout=60) == -signal.SIGINT  # the runner's stop signal
    finally:
        stop(child)


def test_status_does_not_call_a_process_that_reused_a_recorded_pid_running(tmp_path, reused_pids):
    status = run([str(BIN / "vaepipe"), "status"], cwd=tmp_path, timeout=60)
    assert status.returncode == 3, status.stdout + status.stderr
    assert status.stdout.count("stopped") == 3 and "running" not in status.stdout, status.stdout
    assert status.stdout.count(f"pid {reused_pids['child'].pid} is now another process (sleep 60") == 3
    assert "`vaepipe serve` (pid" in status.stdout and "is gone" in status.stdout


def _flow_runs(api: str, deployment_id: str) -> list[dict]:
    return _api(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.server
@pytest.mark.slow
def test_serve_status_limited_deployment_served_mlflow_and_stop(tmp_path):
    """`vaepipe serve` starts all three; two simultaneous train-vae runs take turns (limit 1) and log to the
    served MLflow; `vaepipe serve --stop` stops all three and `vaepipe status` then says so."""
    from mlflow import MlflowClient

    ports = {"--port": free_port(), "--mlflow-port": free_port(), "--runner-port": free_port()}
    api = f"http://127.0.0.1:{ports['--port']}/api"
    mlflow_url = f"http://127.0.0.1:{ports['--mlflow-port']}"
    runner_health = f"http://127.0.0.1:{ports['--runner-port']}/health"
    name = f"vae-serve-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "serve.log"
    state_file = tmp_path / ".vaepipe" / "serve.pid"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT_API_URL")}
    # a quick runner and a short wait for a taken slot (30 s by default) keep the test short
    env.update(PREFECT_RUNNER_POLL_FREQUENCY="2", PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="3")
    cmd = [str(BIN / "vaepipe"), "serve", *(str(x) for kv in ports.items() for x in kv)]
    with open(log, "w") as f:
        serve = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    client_env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-home"),
                  "MLFLOW_TRACKING_URI": mlflow_url}
    try:
        wait_http(runner_health, timeout=300, proc=serve, log=log)
        deadline = time.monotonic() + 60
        while "ready after" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        banner = log.read_text()
        for text in (f"Prefect UI      http://127.0.0.1:{ports['--port']}", f"MLflow UI       {mlflow_url}",
                     f"export PREFECT_API_URL={api}", f"export MLFLOW_TRACKING_URI={mlflow_url}"):
            assert text in banner
        state = json.loads(state_file.read_text())
        assert state["children"]["mlflow-server"]["port"] == ports["--mlflow-port"]
        assert state["children"]["runner"]["health"] == runner_health

        status = run([str(BIN / "vaepipe"), "status"], cwd=tmp_path, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        for line_start, url in (("prefect-server", api), ("mlflow-server", mlflow_url), ("runner", runner_health[:-7])):
            line = next(ln for ln in status.stdout.splitlines() if ln.startswith(line_start))
            assert "running" in line and url in line, status.stdout

        train = _api(f"{api}/deployments/name/train-vae/train-vae")
        assert train["global_concurrency_limit"]["limit"] == 1
        assert train["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        assert _api(f"{api}/deployments/name/ingest-dataset/ingest-dataset")["global_concurrency_limit"] is None

        params = {"config": {
            "ingest": {"shard_dir": str(tmp_path / "shards"), "samples_per_shard": 512, "block_size": 128},
            "train": {"epochs": 1, "batch_size": 64, "output_dir": str(tmp_path / "runs")},
            "tracking": {"model_name": name, "experiment": "test-serve"},
        }}
        run_cmd = [str(BIN / "prefect"), "deployment", "run", "train-vae/train-vae", "--watch",
                   "--params", json.dumps(params)]
        watchers = [subprocess.Popen(run_cmd, cwd=tmp_path, env={**os.environ, **client_env}, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
        try:
            outputs = [w.communicate(timeout=900)[0] for w in watchers]
        finally:
            for w in watchers:
                stop(w)
        for w, out in zip(watchers, outputs, strict=True):
            assert w.returncode == 0 and "Completed" in out, out + log.read_text()
        # the run that ingested shows the ingestion subflow's progress in its --watch output
        assert any("ingest: 100% (" in out for out in outputs), outputs

        flow_runs = sorted(_flow_runs(api, train["id"]), key=lambda r: _time(r["start_time"]))
        assert [r["state_type"] for r in flow_runs] == ["COMPLETED", "COMPLETED"]
        first, second = flow_runs
        assert _time(first["end_time"]) <= _time(second["start_time"]), "the two training runs overlapped"
        second_states = [s["name"] for s in _api(f"{api}/flow_run_states/?flow_run_id={second['id']}")]
        assert "AwaitingConcurrencySlot" in second_states, second_states  # it was held, not merely late

        mlflow = MlflowClient(mlflow_url)
        versions = mlflow.search_model_versions(f"name = '{name}'")
        assert sorted(int(v.version) for v in versions) == [1, 2]
        for version in versions:
            found = mlflow.get_run(version.run_id)
            assert "val/elbo" in found.data.metrics
            # provenance: the flow run that made it, with its UI link, and the flow as the run's source
            assert found.data.tags["prefect.flow_run.id"] in {r["id"] for r in flow_runs}
            assert found.data.tags["prefect.flow_run.url"].endswith(found.data.tags["prefect.flow_run.id"])
            assert (found.data.tags["mlflow.source.name"], found.data.tags["mlflow.source.type"]) == (
                "flows.train_vae:train_vae", "JOB")
        # `vaepipe models` here finds the served MLflow without MLFLOW_TRACKING_URI
        listed = subprocess.run([str(BIN / "vaepipe"), "models", "list"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        assert f"{name}  (2 versions)" in listed.stdout.splitlines(), listed.stdout + listed.stderr
        # the artifacts went through the server into its store under .vaepipe
        assert any((tmp_path / ".vaepipe" / "mlflow" / "artifacts").rglob("weights.safetensors"))
        report = run([str(BIN / "prefect"), "artifact", "inspect", "train-vae-report"], env=client_env,
                     cwd=tmp_path, timeout=120)
        assert f"models:/{name}@champion" in report.stdout, report.stdout + report.stderr
        assert mlflow_url in report.stdout  # the report links the run on the served MLflow

        # the same deployments registered for a team's worker pool, limit included (infra/compose.yaml)
        created = run([str(BIN / "prefect"), "work-pool", "create", "team-pool", "--type", "process"],
                      env=client_env, cwd=tmp_path, timeout=120)
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = run([str(BIN / "python"), "-m", "flows.serve", "--deploy", "team-pool", "--train-concurrency",
                        "2", "--working-dir", "/srv/vaepipe"], env=client_env, cwd=tmp_path, timeout=180)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        team = _api(f"{api}/deployments/name/train-vae/train-vae")
        assert team["work_pool_name"] == "team-pool" and team["global_concurrency_limit"]["limit"] == 2
        assert team["job_variables"] == {"working_dir": "/srv/vaepipe"}
        assert _api(f"{api}/deployments/name/ingest-dataset/ingest-dataset")["work_pool_name"] == "team-pool"

        stopped = run([str(BIN / "vaepipe"), "serve", "--stop"], cwd=tmp_path, timeout=300)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert serve.wait(timeout=60) == 0, log.read_text()
    finally:
        stop(serve)
        _kill_leftovers(state_file)
    assert not state_file.exists()
    after = run([str(BIN / "vaepipe"), "status"], cwd=tmp_path, timeout=60)
    assert after.returncode == 3, after.stdout + after.stderr
    assert "running" not in after.stdout
    for url in (f"{api}/health", f"{mlflow_url}/health", runner_health):
        with pytest.raises(TimeoutError):  # nothing answers any more
            wait_http(url, timeout=2)


# --- infra/compose.yaml: the team setup (docker compose is not installed on the project machines, so its
# wiring is checked here as data; `docker compose config` runs too where the plugin exists) ---

COMPOSE = REPO / "infra" / "compose.yaml"
ENV_EXAMPLE = REPO / "infra" / ".env.example"
VARIABLE = re.compile(r"(?<!\$)\$\{(\w+)(?::-([^}]*))?\}")


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _interpolate(value, env: dict[str, str]):
    """Compose's substitution of `${VAR:-default}` (and `$$` -> `$`) in every string of the parsed file."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value).replace("$$", "$")
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), _env_example())


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_compose_variables_all_have_defaults_documented_in_env_example():
    def strings(value):  # every string value of the parsed file: comments do not count
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [str(value)]

    used = {(m.group(1), m.group(2)) for text in strings(yaml.safe_load(COMPOSE.read_text()))
            for m in VARIABLE.finditer(text)}
    assert used, "no ${VAR:-default} found: the pattern or the file changed"
    documented = _env_example()
    for name, default in used:
        assert default is not None, f"${{{name}}} has no default: compose would fail without infra/.env"
        assert documented.get(name) == default, f"{name}: default {default!r} in compose.yaml, " \
            f"{documented.get(name)!r} in .env.example"
    assert set(documented) == {name for name, _ in used}, "a .env.example setting that compose.yaml never reads"


def test_compose_services_depend_on_defined_healthy_services(compose):
    services = compose["services"]
    assert set(services) == {"prefect-db", "mlflow-db", "minio", "create-bucket", "prefect-server", "mlflow",
                             "deploy", "worker"}
    for name, service in services.items():
        one_shot = service.get("restart") == "no"
        assert one_shot or "healthcheck" in service, f"{name} runs for good but has no healthcheck"
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on undefined service {dependency}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency} to be healthy"
            else:
                assert condition == "service_completed_successfully" and services[dependency]["restart"] == "no"
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], f"{name}: undeclared volume {volume}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine by default"


def test_compose_servers_use_postgres_and_minio(compose):
    services = compose["services"]
    mlflow_cmd = services["mlflow"]["command"]
    backend = urlsplit(_option(mlflow_cmd, "--backend-store-uri"))
    db = services["mlflow-db"]["environment"]
    assert backend.scheme == "postgresql+psycopg" and backend.hostname == "mlflow-db" and backend.port == 5432
    assert (backend.username, backend.password, backend.path) == (db["POSTGRES_USER"], db["POSTGRES_PASSWORD"],
                                                                  f"/{db['POSTGRES_DB']}")
    assert '"psycopg[binary]"' in services["mlflow"]["build"]["dockerfile_inline"]  # the driver the URI names
    artifacts = urlsplit(_option(mlflow_cmd, "--artifacts-destination"))
    assert artifacts.scheme == "s3" and artifacts.netloc == services["create-bucket"]["environment"]["MLFLOW_BUCKET"]
    mlflow_env, minio_env = services["mlflow"]["environment"], services["minio"]["environment"]
    assert urlsplit(mlflow_env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert (mlflow_env["AWS_ACCESS_KEY_ID"], mlflow_env["AWS_SECRET_ACCESS_KEY"]) == (
        minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"])
    assert "mlflow:5000" in _option(mlflow_cmd, "--allowed-hosts").split(",")  # the worker's Host header

    prefect_db = urlsplit(services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    db = services["prefect-db"]["environment"]
    assert prefect_db.scheme == "postgresql+asyncpg" and prefect_db.hostname == "prefect-db"
    assert (prefect_db.username, prefect_db.password, prefect_db.path) == (
        db["POSTGRES_USER"], db["POSTGRES_PASSWORD"], f"/{db['POSTGRES_DB']}")


def test_compose_worker_runs_the_deployments_against_both_servers(compose):
    services = compose["services"]
    worker, deploy = services["worker"], services["deploy"]
    prefect_port = _option(services["prefect-server"]["command"], "--port")
    mlflow_port = _option(services["mlflow"]["command"], "--port")
    for service in (worker, deploy):
        api = urlsplit(service["environment"]["PREFECT_API_URL"])
        assert (api.hostname, str(api.port), api.path) == ("prefect-server", prefect_port, "/api")
    tracking = urlsplit(worker["environment"]["MLFLOW_TRACKING_URI"])
    assert (tracking.hostname, str(tracking.port)) == ("mlflow", mlflow_port)
    assert _option(worker["command"], "--pool") == deploy["environment"]["POOL"]
    assert _option(worker["command"], "--type") == "process"
    assert "python -m flows.serve --deploy" in deploy["command"][0]
    assert deploy["environment"]["TRAIN_CONCURRENCY"] == "1"
    # the image copies the project from the repository root and installs an extra pyproject.toml declares
    dockerfile = worker["build"]["dockerfile_inline"]
    assert worker["build"] == deploy["build"] and (COMPOSE.parent / worker["build"]["context"]).resolve() == REPO
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (REPO / source).exists(), f"the image copies {source}, which the repository lacks"
    extras = re.search(r'pip install [^\n]*"\.\[(\w+)\]"', dockerfile).group(1)
    assert extras in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_compose_images_match_the_declared_prefect_and_mlflow(compose):
    """The servers' images run a release that pyproject admits, of the same minor release as the installed
    client (a patch release may come out after the image tag was written)."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    declared = {Requirement(r).name: Requirement(r).specifier
                for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    images = {
        "prefect": re.fullmatch(r"prefecthq/prefect:([\d.]+)-python3\.11",
                                compose["services"]["prefect-server"]["image"]).group(1),
        "mlflow": re.search(r"mlflow:v([\d.]+)\n",
                            compose["services"]["mlflow"]["build"]["dockerfile_inline"]).group(1),
    }
    for package, image_version in images.items():
        assert image_version in declared[package], (package, image_version, declared[package])
        assert image_version.split(".")[:2] == version(package).split(".")[:2], (package, image_version)


@pytest.mark.skipif(subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
                    if shutil.which("docker") else True, reason="the docker compose plugin is not installed here")
def test_docker_compose_accepts_the_file():
    result = run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], timeout=120)
    assert result.returncode == 0, result.stderr
