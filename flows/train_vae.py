"""Flow `train-vae`: shards -> MLflow run -> `accelerate launch vae/train.py` (trains, evaluates) -> publish -> report.

The `RunConfig` pydantic model is the flow's parameter, so it is also the deployment's parameter schema and
its form in the Prefect UI. Training runs as a child process in its own session (process group): cancelling
the flow run sends SIGTERM to this process only, and a plain child would outlive it and keep its GPUs, so
the launch task stops the child on the way out. The child is `python -m vae.launch`, which supervises
`accelerate launch`: it passes SIGTERM on to the ranks and exits 75 once their checkpoint is written.

Faults: the `train` task is retried `train.retries` times when the child dies (killed, out of memory, a lost
node) or is preempted (every rank checkpointed: exit status 75, `PREEMPTED_EXIT`).
Each retry resumes from the newest complete checkpoint of the same output directory and logs into the same
MLflow run; a `TrainingError` or `ConfigError` of the child (a message naming the fix) is not retried.

A Prefect server restart needs no setting of ours: once a client has connected, Prefect (3.8, 3.9) retries a request
that cannot connect PREFECT_CLIENT_MAX_RETRIES times (default 5, delays 2, 4, ... 32 s: about a minute in all)
and the events client re-sends task-run states after it reconnects; tests/test_flow_faults.py restarts the
server in the middle of a run. An outage longer than a minute needs that variable raised where flows run.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff

import pipeline
from flows.ingest_dataset import DEMO, ingest_dataset
from vae.config import RunConfig, dump, with_overrides
from vae.launch.command import accelerate_command
from vae.tracking import provenance
from vae.tracking.journal import JOURNAL_DIR, sync_journal
from vae.tracking.store import create_run, resolve_uri
from vae.training import checkpoint
from vae.training.preemption import PREEMPTED_EXIT

KILL_GRACE_S = 10.0  # SIGTERM -> SIGKILL; well inside the runner's own grace before it hard-kills this process
TAIL_LINES = 40  # child output quoted in the error when training fails
RETRY_DELAY_S = 5.0  # first delay between launch attempts, doubled per retry: a preempted node gets time to go
NOT_RETRIED = ("TrainingError", "ConfigError")  # the child's own errors: they name a fix, a retry repeats them
INLINE_IMAGE_BYTES = 200_000  # a larger picture is shrunk before it goes into the artifact as a data URI


class TrainingFailed(RuntimeError):
    """The launch (vae.launch over `accelerate launch`) exited nonzero; the message ends with the child's last lines.

    `retryable` is False when the child stopped on one of its own errors (`NOT_RETRIED`), which a retry repeats.
    """

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def worth_retrying(task: Any, run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn` of the launch: a child that died or was preempted, not one that refused."""
    err = state.data
    return not isinstance(err, TrainingFailed) or err.retryable


def absolute_uri(uri: str) -> str:
    """A relative `sqlite:///x.db` depends on the working directory; the child gets an absolute one."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def absolute_location(location: str | Path) -> str:
    """A local path made absolute (the child may run elsewhere); a URL (s3://...) as it is."""
    return str(location) if pipeline.is_url(location) else str(Path(location).resolve())


def resolved(config: RunConfig, shard_dir: str, run_name: str) -> RunConfig:
    """A copy with absolute paths and tracking URI, so the child, evaluation and registry agree on them.

    Unless it resumes, each flow run trains in its own `<train.output_dir>/<time>-<flow run name>`: the
    trainer refuses a directory that already holds checkpoints, so a fixed directory would let only the
    first run of a deployment with default parameters succeed. The MLflow run takes the flow run's name.
    """
    cfg = config.model_copy(deep=True)
    cfg.ingest.shard_dir = shard_dir  # the config keeps a URL a string, a local path a Path
    output_dir = Path(cfg.train.output_dir).resolve()
    if not cfg.train.resume:
        output_dir = output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_name}"
    cfg.train.output_dir = output_dir
    cfg.tracking.tracking_uri = absolute_uri(resolve_uri(cfg))
    cfg.tracking.run_name = cfg.tracking.run_name or run_name
    return cfg


@task(name="find-shards", cache_policy=NO_CACHE)
def find_shards(config: RunConfig) -> str | None:
    """The shard directory when it is complete for this source (another source's shards raise), else None."""
    storage = config.ingest.storage_options
    if config.ingest.overwrite or not pipeline.is_complete(config.shard_dir, storage):
        return None
    pipeline.prepare_dir(config.source.name, config.source.options, config.shard_dir, False, storage)
    location = absolute_location(config.shard_dir)
    get_run_logger().info("reusing the complete shard directory %s", location)
    return location


@task(name="create-mlflow-run", cache_policy=NO_CACHE)
def create_mlflow_run(config: RunConfig) -> str:
    # the run names the flow that made it and links back to its flow run; JOB is MLflow's source type for a job
    tags = {"mlflow.source.name": "flows.train_vae:train_vae", "mlflow.source.type": "JOB",
            provenance.FLOW_RUN_ID_TAG: str(flow_run.id), provenance.FLOW_RUN_URL_TAG: flow_run.ui_url or ""}
    run_id = create_run(config, tags=tags)
    get_run_logger().info("MLflow run %s in %s", run_id, config.tracking.tracking_uri)
    return run_id


def end_mlflow_run(config: RunConfig, run_id: str, status: str) -> None:
    """Mark the run ended unless the child already did; otherwise it would read RUNNING forever.

    Called while another error propagates: a tracking server that is down only earns a warning here, so the
    flow run fails with the original error.
    """
    import mlflow

    try:
        client = mlflow.MlflowClient(config.tracking.tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
    except Exception as err:
        get_run_logger().warning("could not mark MLflow run %s %s: %s", run_id, status, err)


def stop_group(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after `grace` s.

    The child (vae.launch) passes SIGTERM on to the ranks, and when it is killed its launcher gets SIGTERM from
    the kernel (PR_SET_PDEATHSIG) and stops the ranks itself.
    """
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the child leads its own session, so its pgid is its pid
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a child that did not stop in time
    except ProcessLookupError:
        pass
    proc.wait()


def child_env(config: RunConfig, run_id: str, extra: dict[str, str]) -> dict[str, str]:
    """The launch's environment: this process's, the launcher's extras, and the run to log into."""
    return {
        **os.environ, **extra, "PYTHONUNBUFFERED": "1",
        # each line of the child's output becomes a Prefect log record: a tqdm refresh every 0.1 s would
        # flood the run's log, so bars redraw at most every 30 s here (tqdm reads TQDM_* defaults from the env)
        "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "30"),
        "MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": str(config.tracking.tracking_uri),
    }


def run_logged(argv: list[str], env: dict[str, str], logger) -> tuple[int, deque[str]]:
    """Run `argv` in its own session, each output line a log record; its exit status and last lines. Whatever
    ends this early (cancellation, Ctrl-C, an error) takes the child's process group down with it."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:  # text mode turns tqdm's '\r' updates into lines too
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info(line)
        return proc.wait(), tail
    finally:
        stop_group(proc)  # no-op after a normal exit; on cancellation, Ctrl-C or an error, kills the ranks


@task(name="train", cache_policy=NO_CACHE, retry_condition_fn=worth_retrying)  # retries: train.retries, in the flow
def launch_training(
    config: RunConfig, run_id: str, num_processes: int = 1, accelerate_config: str | None = None
) -> None:
    """Save the resolved config beside the checkpoints and run vae/train.py on it (`python -m vae.launch`).

    Called directly from the flow, so it runs on the main thread, where Prefect's SIGTERM handler raises
    `TerminationSignal` (a BaseException): the `finally` below then takes the process group down. The output
    directory belongs to this flow run (see `resolved`), so a complete checkpoint in it was written by an
    earlier attempt: the launch then resumes from it (`--train.resume true`) into the same MLflow run.
    """
    logger = get_run_logger()
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(dump(config))
    # the child runs the post-training path (vae/training/finalize.py) up to the evaluation, saved in output_dir and its
    # metrics logged; registering it is this flow's own task, which retries without training again
    overrides = ["--tracking.finalize", "evaluate"]
    resume_from = checkpoint.latest(out)
    if resume_from is not None:
        overrides += ["--train.resume", "true"]
        logger.info("attempt %d: resuming from %s (epoch %s of %d)", task_run.run_count, resume_from,
                    checkpoint.read_meta(resume_from).get("epoch"), config.train.epochs)
    argv, extra_env = accelerate_command(config_path, num_processes, accelerate_config, overrides=overrides)
    logger.info("launching: %s", " ".join(argv))
    returncode, tail = run_logged(argv, child_env(config, run_id, extra_env), logger)
    if returncode != 0:
        preempted = checkpoint.latest(out) if returncode == PREEMPTED_EXIT else None
        own_error = next((name for name in NOT_RETRIED if any(name in line for line in tail)), None)
        why = (f"preempted, checkpoint {preempted}" if preempted is not None
               else f"the child stopped on a {own_error}, not retried" if own_error else "retryable")
        raise TrainingFailed(f"the launch exited with {returncode} ({why}); last output:\n" + "\n".join(tail),
                             retryable=preempted is not None or own_error is None)


@task(name="publish", cache_policy=NO_CACHE)
def publish(config: RunConfig, run_id: str) -> tuple[dict[str, float], dict, Any]:
    """The evaluation training saved in output_dir (metrics.json, evaluation.json), and its registration: what the
    child journaled and could not send (MLflow down as it ended) goes first, then the registry's `publish_run`, as
    the journal of a run launched without a flow calls it (a retry registers nothing twice)."""
    # Heavy, so imported only here: the registry with mlflow and the objectives' evaluation stack make importing
    # this module take 11.3 s instead of 4.9 s (measured on this 2-core machine), paid by every flow process.
    from vae.registry.publish import publish_run
    from vae.training.finalize import load_evaluation  # deferred with the registry, as said above

    uri = str(config.tracking.tracking_uri)
    journal = Path(config.train.output_dir) / JOURNAL_DIR / f"{run_id}.jsonl"
    if journal.is_file():
        sync_journal(journal, run_id, uri)
    metrics, details = load_evaluation(config.train.output_dir)
    return metrics, details, publish_run(config.train.output_dir, run_id, uri)


def run_link(uri: str, run_id: str) -> str:
    """Where to look at the run: a UI link for an http server, else the store and the command to browse it."""
    if uri.startswith(("http://", "https://")):
        import mlflow

        experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run `{run_id}` in `{uri}` (browse: `mlflow ui --backend-store-uri {uri}`)"


def inline_png(path: Path, limit: int = INLINE_IMAGE_BYTES) -> str | None:
    """`path` as a base64 PNG data URI (self-contained in the Prefect UI), shrunk when over `limit` bytes."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if len(data) > limit:
        from PIL import Image

        with Image.open(path) as image:
            image.thumbnail((512, 512))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
        if len(data) > limit:
            return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def artifact_link(uri: str, run_id: str, name: str) -> str:
    """Where an artifact of the run is: the MLflow UI page for an http server, always its `runs:/` URI."""
    runs_uri = f"`runs:/{run_id}/{name}`"
    if uri.startswith(("http://", "https://")):
        import mlflow

        experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
        page = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifactPath/{name}"
        return f"[{name}]({page}) ({runs_uri})"
    return runs_uri


def report(config: RunConfig, run_id: str, metrics: dict[str, float], details: dict, version: Any) -> str:
    """The markdown artifact: the headline and metrics, the picture the objective names in evaluation.json (the
    ELBO family's samples, aekl's reconstructions), registered version and alias, the load URI, the MLflow run."""
    rows = "\n".join(f"| `{name}` | {value:.4f} |" for name, value in sorted(metrics.items()))
    alias = (
        "became the `champion`" if version.champion
        else "did not beat the current `champion`, which keeps the alias"
    )
    uri = str(config.tracking.tracking_uri)
    picture, shown, links = details["picture"], "(the objective names no picture of the run)", []
    if picture is not None:  # the ELBO family's samples, aekl's reconstructions: whatever the objective drew
        path = Path(config.train.output_dir) / picture["file"]
        image = inline_png(path)
        shown = (f"![{picture['caption']}]({image})" if image is not None
                 else f"(no picture at `{path}`, or too large to inline)")
        caption = picture["caption"][:1].upper() + picture["caption"][1:]
        links.append(f"- {caption}, in MLflow: {artifact_link(uri, run_id, picture['file'])}")
    links += [
        f"- Registered model: `{version.name}` version **{version.version}** (`{version.uri}`); it {alias}.",
        f'- Load the champion: `mlflow.pyfunc.load_model("models:/{version.name}@champion")`',
        f"- MLflow run: {run_link(uri, run_id)}",
        f"- Checkpoints and resolved config: `{config.train.output_dir}`",
    ]
    bullets = "\n".join(links)
    return f"""# train-vae: `{config.model_name}` version {version.version}

Final evaluation: {details["headline"]}

| metric | value |
| --- | --- |
{rows}

{shown}

{bullets}
"""


def outcome(run_id: str, metrics: dict[str, float], details: dict, version: Any) -> dict[str, Any]:
    """What the flow returns (`vaepipe demo` prints it): the run, its evaluation as saved in output_dir, and the
    registered version."""
    return {
        "run_id": run_id,
        "metrics": metrics,
        "headline": details["headline"],  # the objective's figures in one line (ELBO and NLL; PSNR and SSIM)
        "model_name": version.name,
        "version": int(version.version),
        "champion": bool(version.champion),
        "model_uri": f"models:/{version.name}@champion",
    }


# the deployment's default parameters, the demo's (flows/ingest_dataset.py); copied, never mutated
DEFAULT_CONFIG = DEMO


@flow(name="train-vae")
def train_vae(
    config: RunConfig = DEFAULT_CONFIG, num_processes: int = 1, accelerate_config: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Ingest when needed, train with Accelerate, evaluate, register in MLflow, and leave a report.

    `overrides` (`["--train.epochs", "5"]`, as on the command line) change single fields of `config`. A `config`
    parameter replaces the whole default config (Prefect merges run parameters one level deep only), so a run
    that passes `{"config": {"train": {"epochs": 5}}}` gets the built-in defaults for every other field; with
    `{"overrides": ["--train.epochs", "5"]}` it keeps the deployment's (the demo's) config."""
    if overrides:
        config = with_overrides(config, overrides)
    shard_dir = find_shards(config) or ingest_dataset(config.source, config.ingest)
    config = resolved(config, shard_dir, flow_run.name)
    run_id = create_mlflow_run(config)
    try:
        launch = launch_training.with_options(
            retries=config.train.retries, retry_delay_seconds=exponential_backoff(RETRY_DELAY_S)
        )
        launch(config, run_id, num_processes, accelerate_config)
        metrics, details, version = publish(config, run_id)
    except BaseException as err:  # cancelled (TerminationSignal), interrupted or failed: say so in MLflow too
        end_mlflow_run(config, run_id, "FAILED" if isinstance(err, Exception) else "KILLED")
        raise
    create_markdown_artifact(
        key="train-vae-report", markdown=report(config, run_id, metrics, details, version),
        description=f"{version.name} v{version.version}",
    )
    return outcome(run_id, metrics, details, version)
