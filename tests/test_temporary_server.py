"""Prefect's temporary API server under `vaepipe ingest`/`demo`: a generous start-up wait unless the user set one,
one line when it still times out, and no orphaned server after a `kill -9` of the command."""

from __future__ import annotations

import os
import subprocess
import time

import psutil
import pytest
from conftest import BIN, REPO, run, stop

from flows import temporary_server

SERVER_MODULE = "prefect.server.api.server:create_app"  # in the command line Prefect gives its uvicorn child


def _cli_env(tmp_path) -> dict[str, str]:
    """A fresh PREFECT_HOME and no API URL, so the command starts its own temporary server."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", temporary_server.SETTING)}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _ingest(tmp_path) -> list[str]:
    return [str(BIN / "vaepipe"), "ingest", "--config", str(REPO / "infra" / "configs" / "digits.yaml"),
            "--ingest.shard_dir", str(tmp_path / "shards")]


def _servers_under(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if SERVER_MODULE in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):  # a child that ended while we looked
            continue
    return found


def test_the_start_up_wait_is_generous_unless_the_user_set_it(monkeypatch, tmp_path):
    from prefect.settings import Settings

    monkeypatch.delenv(temporary_server.SETTING, raising=False)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))  # no profile sets it
    assert Settings().server.ephemeral.startup_timeout_seconds == 20  # Prefect's default, too short under load
    assert temporary_server.startup_timeout(Settings()) == temporary_server.STARTUP_TIMEOUT_S >= 120

    (tmp_path / "profiles.toml").write_text(f'active = "mine"\n[profiles.mine]\n{temporary_server.SETTING} = 77\n')
    assert temporary_server.startup_timeout(Settings()) == 77  # a profile's value is the user's
    monkeypatch.setenv(temporary_server.SETTING, "45")
    assert temporary_server.startup_timeout(Settings()) == 45  # and the environment's


def test_a_start_up_timeout_ends_in_one_line_naming_the_setting(tmp_path):
    """The user's setting is respected (0 s: Prefect gives up at once), and the failure is one line, not a
    traceback; the server it had begun to start is stopped."""
    env = {**_cli_env(tmp_path), temporary_server.SETTING: "0"}
    result = run(_ingest(tmp_path), env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "did not answer within 0 s" in line and temporary_server.SETTING in line, result.stderr
    assert not (tmp_path / "shards").exists()
    home = _cli_env(tmp_path)["PREFECT_HOME"]
    assert not [p for p in psutil.process_iter(["environ"]) if (p.info["environ"] or {}).get("PREFECT_HOME") == home]


@pytest.mark.server
@pytest.mark.slow
def test_a_killed_ingest_leaves_no_temporary_server_behind(tmp_path):
    """`kill -9` of `vaepipe ingest` while its temporary server starts: the server goes too (no atexit runs)."""
    log = tmp_path / "ingest.log"
    with open(log, "w") as f:
        cli = subprocess.Popen(_ingest(tmp_path), cwd=tmp_path, env=_cli_env(tmp_path), stdout=f,
                               stderr=subprocess.STDOUT)
    servers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not servers:
            assert cli.poll() is None, "the ingest ended before its server was seen:\n" + log.read_text()
            assert time.monotonic() < deadline, "no temporary server started:\n" + log.read_text()
            servers = _servers_under(cli.pid)
            time.sleep(0.1)
        cli.kill()
        cli.wait()
        _, left = psutil.wait_procs(servers, timeout=60)
        assert not left, f"the temporary server outlived the killed ingest: {left}\n" + log.read_text()
    finally:
        stop(cli)
        for server in servers:  # leave nothing behind even when the test fails
            if server.is_running():
                server.kill()
