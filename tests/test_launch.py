"""Preemption through the launcher (issue 13, item 6): SIGTERM to what an orchestrator signals, with one rank and
with two CPU ranks, ends in a preempted checkpoint, exit status 75, and no training process left behind.

What each orchestrator signals: Kubernetes the container's PID 1 (the supervisor, `python -m vae.launch`), a
cancelled Prefect flow run or Ctrl-C the supervisor's process group, Slurm every process of the job step
(supervisor, launcher and ranks); an out-of-memory killer or an operator may hit one rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, run

from vae.launch.command import accelerate_command
from vae.tracking.journal import JOURNAL_DIR
from vae.training.preemption import PREEMPTED_EXIT

PRESET = REPO / "infra/configs/digits.yaml"


def start(tmp_path: Path, shard_dir: Path, processes: int) -> subprocess.Popen:
    """The supervised launch of a long run (1,000 epochs of batches of 4), in its own session as flows start it."""
    argv, env = accelerate_command(PRESET, processes, overrides=[
        "--ingest.shard_dir", str(shard_dir), "--train.output_dir", str(tmp_path / "run"), "--train.epochs", "1000",
        "--train.batch_size", "4", "--train.log_every", "1", "--tracking.finalize", "false"])
    return subprocess.Popen(argv, env={**os.environ, **env}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def logged_steps(tmp_path: Path) -> int:
    """Training steps in the run's metric journal (whole lines only: rank 0 may be writing the last one)."""
    journals = list((tmp_path / "run" / JOURNAL_DIR).glob("*.jsonl"))
    if not journals:
        return 0
    lines = journals[0].read_text().split("\n")[:-1]
    return sum(json.loads(line)["kind"] == "metrics" for line in lines)


def wait_until_training(proc: subprocess.Popen, tmp_path: Path, steps: int = 3, timeout: float = 400) -> None:
    """Until the journal holds `steps` logged steps: every rank has started and trains."""
    deadline = time.monotonic() + timeout
    while logged_steps(tmp_path) < steps:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the launch exited with {proc.returncode} before training:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {steps} logged steps within {timeout} s")
        time.sleep(0.2)


def tree(proc: subprocess.Popen) -> tuple[psutil.Process, psutil.Process, list[psutil.Process]]:
    """(supervisor, accelerate launcher, ranks) of a launch that trains."""
    supervisor = psutil.Process(proc.pid)
    [launcher] = supervisor.children()
    return supervisor, launcher, launcher.children()


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    found = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line names `text` (started after a snapshot, too)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def wait_gone(processes: list[psutil.Process], marker: str, timeout: float) -> list[psutil.Process]:
    """What is still alive of `processes`, or still names `marker`, after waiting up to `timeout` s for it to end."""
    deadline = time.monotonic() + timeout
    while (left := alive(processes) + mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def cleanup(proc: subprocess.Popen, processes: list[psutil.Process], marker: str) -> None:
    """Leave nothing behind even when a test fails."""
    for p in alive(processes) + mentioning(marker):
        p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def newest_meta(tmp_path: Path) -> dict:
    metas = sorted((tmp_path / "run" / "checkpoints").glob("*/meta.json"))
    assert metas, "no complete checkpoint was written"
    return json.loads(metas[-1].read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "target"), [
    (1, "supervisor"),  # Kubernetes' PID 1, a cancelled flow run, Ctrl-C
    (2, "supervisor"),
    (1, "rank"),  # the training process itself
    (2, "every process"),  # Slurm: the supervisor, torchrun's agent and both ranks at once
])
def test_sigterm_checkpoints_and_exits_75(tmp_path, digits_shards, mlflow_uri, processes, target):
    proc = start(tmp_path, digits_shards, processes)
    marker = str(tmp_path / "run")
    snapshot: list[psutil.Process] = []
    try:
        wait_until_training(proc, tmp_path)
        supervisor, launcher, ranks = tree(proc)
        snapshot = [supervisor, launcher, *ranks]
        assert len(ranks) == processes
        signalled = {"supervisor": [supervisor], "rank": ranks[:1], "every process": snapshot}[target]
        for p in signalled:
            p.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        left = wait_gone(snapshot, marker, timeout=30)
    finally:
        cleanup(proc, snapshot, marker)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    meta = newest_meta(tmp_path)
    assert meta["reason"] == "preempted" and meta["world_size"] == processes
    assert "vae.launch: preempted; every rank checkpointed" in err
    assert not left, f"left behind: {[(p.pid, ' '.join(p.cmdline())) for p in left]}"


@pytest.mark.slow
def test_a_killed_supervisor_leaves_no_training_behind(tmp_path, digits_shards, mlflow_uri):
    """SIGKILL cannot be passed on: the launcher gets SIGTERM from the kernel instead and stops its rank, which
    writes its checkpoint; nothing trains on beside the retry an orchestrator would start."""
    proc = start(tmp_path, digits_shards, 1)
    marker = str(tmp_path / "run")
    snapshot: list[psutil.Process] = []
    try:
        wait_until_training(proc, tmp_path)
        supervisor, launcher, ranks = tree(proc)
        snapshot = [launcher, *ranks]
        supervisor.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        left = wait_gone(snapshot, marker, timeout=60)
    finally:
        cleanup(proc, snapshot, marker)
    assert proc.returncode == -signal.SIGKILL
    assert not left, f"left behind: {[(p.pid, ' '.join(p.cmdline())) for p in left]}"


def test_the_supervisor_runs_only_the_training_script(tmp_path):
    result = run([sys.executable, "-m", "vae.launch", "--cpu", "other.py"], cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "python -m vae.launch runs vae/train.py only, got 'other.py'" in result.stderr


def test_a_bad_config_stops_before_any_rank_starts(tmp_path):
    result = run([sys.executable, "-m", "vae.launch", "--cpu", str(REPO / "vae/train.py"), "--config", str(PRESET),
                  "--train.no_such_field", "1"], cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "--train.no_such_field" in result.stderr and "Traceback" not in result.stderr


# ---- the cluster templates run the supervisor and act on its exit status

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun: records the command, writes what the scenario's step wrote, exits with its status
printf '%s\\n' "$*" > "$FAKE_DIR/srun.args"
if [ -n "${FAKE_WRITES:-}" ]; then
  mkdir -p "$OUTPUT_DIR/checkpoints/$FAKE_WRITES"
  printf '{\\n  "reason": "%s"\\n}\\n' "$FAKE_REASON" > "$OUTPUT_DIR/checkpoints/$FAKE_WRITES/meta.json"
fi
exit "$FAKE_STATUS"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) echo node0 ;;
  requeue) echo "$2" >> "$FAKE_DIR/requeued" ;;
esac
"""


@pytest.mark.parametrize(("status", "writes", "expected", "requeued"), [
    (75, None, 75, True),  # every node's supervisor: preempted
    (137, ("step-000000009", "preempted"), 75, True),  # one node's 75 made srun kill the other's task
    (1, None, 1, False),  # a crash after resuming from an older preempted checkpoint: not requeued forever
    (1, ("step-000000009", "end of epoch"), 1, False),
    (0, None, 0, False),
])
def test_the_slurm_script_requeues_what_this_job_preempted(tmp_path, status, writes, expected, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    output = tmp_path / "run"
    old = output / "checkpoints" / "step-000000005"  # a preempted checkpoint of an earlier job: resumed from
    old.mkdir(parents=True)
    (old / "meta.json").write_text('{\n  "reason": "preempted"\n}\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "FAKE_STATUS": str(status),
           "OUTPUT_DIR": str(output), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[0-1]",
           "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    if writes:
        env.update(FAKE_WRITES=writes[0], FAKE_REASON=writes[1])
    result = run(["bash", str(REPO / "infra/slurm/train.sbatch"), "infra/configs/mnist.yaml"], env=env, cwd=tmp_path)
    assert result.returncode == expected, result.stderr
    assert (tmp_path / "requeued").exists() == requeued
    command = (tmp_path / "srun.args").read_text()
    assert "exec python -m vae.launch --config_file infra/accelerate/multinode.yaml" in command


def test_the_kubernetes_job_runs_the_supervisor_and_retries_its_exit_status():
    import yaml

    from vae.launch.supervisor import RANK_GRACE_S

    [_, job] = yaml.safe_load_all((REPO / "infra/k8s/train-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # PID 1 gets the SIGTERM: the shell must hand it over (exec) to the supervisor
    assert container["command"] == ["bash", "-c"] and container["args"][0].startswith("exec python -m vae.launch ")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": container["name"], "operator": "In",
                                                "values": [PREEMPTED_EXIT]}} in rules
    assert pod["terminationGracePeriodSeconds"] >= RANK_GRACE_S and pod["restartPolicy"] == "Never"
