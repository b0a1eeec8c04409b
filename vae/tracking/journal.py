"""The metric journal: what training sends to MLflow survives a tracking server that stops and comes back.

Only rank 0 calls into this module. Training logs through a `MetricJournal`: every metric (and the run's status)
is first appended to a JSONL file
in the run's output directory and fsynced, then sent in batches, one short HTTP attempt at a time. A tracking
server that is down or hangs costs training at most one timeout per back-off period: what it did not take stays
in the journal and goes with a later flush, at the end of training, at a resume, or by `sync_journal`. Resending
is harmless: an entry keeps the timestamp of its first write, and MLflow stores a metric under (key, step,
timestamp, value), ignoring an identical one logged again, so a batch whose response was lost adds nothing.

Images go the same way: the trainer writes each validation's grid into the output directory and journals an
`image` entry naming the file; sending it is `MlflowClient.log_image(..., key=, step=, timestamp=)` (the MLflow UI's
image slider per step). MLflow names every image upload anew, so before uploading the journal asks whether the
run already holds that key, step and timestamp, and a resend adds nothing here either.

At the end of training the journal also holds a `publish` entry (register the model and evaluation kept in the
output directory) before the final status, so one command, `python -m vae.tracking JOURNAL RUN_ID --uri URI`,
sends the metrics, registers the model and marks the run FINISHED, in that order; the model is never registered
twice from one run, so resending is harmless there too. The journal does not know how to register: whoever opens
it hands it a `Publisher` (vae/train.py and the sync command pass `vae.registry.publish.publish_run`), so tracking
never imports the registry.

Why a journal and not MLflow's own asynchronous logging (`log_metrics(..., synchronous=False)`): MLflow's queue
lives in the training process's memory, so a crash, an out-of-memory kill or a preemption loses what it holds,
and a batch that fails after its retries is dropped; the journal is on disk before any request is tried.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vae.config import RunConfig
from vae.tracking import provenance
from vae.tracking.metrics import checked, checked_image
from vae.tracking.store import configure, create_run, resolve_uri

# Registers what a finished run left in an output directory: (output_dir, run_id, tracking uri) -> anything.
Publisher = Callable[[str, str, str], Any]

JOURNAL_DIR = "mlflow-journal"  # in the run's output directory: <run id>.jsonl and <run id>.sent
SEND_TIMEOUT_S = 5  # one HTTP attempt (connect and read); MLflow's default is 120 s, times 7 retries
FIRST_RETRY_S, LAST_RETRY_S = 1.0, 30.0  # back-off between flushes after a failure: doubles up to the last
CLOSE_WAIT_S = 10.0  # how long the end of training waits for a server that does not answer: the retry budget
PUBLISH_RETRIES, PUBLISH_TIMEOUT_S = 2, 60  # registering uploads the model: longer requests, a couple of retries
BATCH_METRICS = 1000  # MLflow's REST limit of metrics per log-batch request
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _http_settings(retries: int, timeout_s: float):
    """MLflow's documented HTTP settings, for the requests made inside only. Its client reads them from the
    environment at each request (rank 0 makes no other request meanwhile)."""
    short = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {k: os.environ.get(k) for k in short}
    os.environ.update(short)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _one_short_attempt():
    """One attempt of at most SEND_TIMEOUT_S per request."""
    return _http_settings(0, SEND_TIMEOUT_S)


class MetricJournal:
    """Append-only JSONL journal of one run's metrics and status changes, sent to MLflow when it answers.

    `<run id>.jsonl` holds one entry per line, written and fsynced before any network call; `<run id>.sent`
    counts the leading entries MLflow acknowledged. Losing the count only makes entries go again (harmless,
    see the module docstring), so it is replaced atomically but not fsynced.
    """

    def __init__(self, path: str | os.PathLike, run_id: str, uri: str, publisher: Publisher | None = None) -> None:
        self.path, self.run_id, self.uri, self.publisher = Path(path), run_id, uri, publisher
        self.sent_path = self.path.with_suffix(".sent")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_bytes().split(b"\n") if self.path.exists() else [b""]
        if lines[-1]:  # a process killed inside a write leaves a torn last line: never acknowledged, so cut it
            log.warning("%s: dropping a torn last line (%d bytes) left by a killed process", self.path, len(lines[-1]))
            with open(self.path, "r+b") as f:
                f.truncate(sum(len(line) + 1 for line in lines[:-1]))
        self.sent = int(self.sent_path.read_text()) if self.sent_path.exists() else 0
        self.pending = [json.loads(line) for line in lines[self.sent : -1]]
        self.delay, self.retry_at, self.down_since = FIRST_RETRY_S, 0.0, None
        self._client = None  # created at the first send: the mlflow import takes a second
        self.monitor = None  # MLflow's system-metrics monitor, started by open_journal, stopped by close

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Journal floats under the fixed names at `step`, then send what is pending unless backing off."""
        self._append({"kind": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": checked(metrics)})
        self.flush()

    def log_image(self, path: str | os.PathLike, key: str, step: int) -> None:
        """Journal the PNG at `path` (in the output directory, where it stays) as image `key` at `step`, then send
        what is pending unless backing off. The file itself goes when its entry is sent."""
        self._append({"kind": "image", "key": checked_image(key), "step": int(step), "timestamp": _now_ms(),
                      "path": str(Path(path).resolve())})
        self.flush()

    def set_status(self, status: str) -> None:
        """Journal a status change (RUNNING at a start or resume; FINISHED, KILLED, FAILED at the end)."""
        self._append({"kind": "status", "status": status, "timestamp": _now_ms()})
        self.flush()

    def stop_monitor(self) -> None:
        """Stop the system-metrics monitor, if one runs: at the end of training, before the model is registered
        (its figures describe training, not the upload)."""
        if self.monitor is not None:
            # no wait for a server the journal found down: the monitor's last samples are not worth the retry budget
            provenance.stop_system_metrics(self.monitor, 0.0 if self.down_since is not None else
                                           provenance.STOP_MONITOR_S)
            self.monitor = None

    def publish(self, output_dir: str | os.PathLike) -> None:
        """Journal the registration of the model and evaluation kept in `output_dir` (done by the journal's
        publisher when the entry is sent), then send what is pending unless backing off."""
        if self.publisher is None:  # a programming error, refused before anything is journaled
            raise ValueError("this journal was opened without a publisher, so it cannot register the model; open it "
                             "with publisher=vae.registry.publish.publish_run (vae/train.py does)")
        self.stop_monitor()
        self._append({"kind": "publish", "output_dir": str(Path(output_dir).resolve()), "timestamp": _now_ms()})
        self.flush()

    @property
    def publish_pending(self) -> bool:
        """Whether a registration is journaled but not done."""
        return any(entry["kind"] == "publish" for entry in self.pending)

    def sync_command(self) -> str:
        """The one command that sends what is left: metrics, the registration, the final status."""
        return f"python -m vae.tracking {self.path} {self.run_id} --uri {self.uri}"

    def flush(self, force: bool = False) -> bool:
        """Send the pending entries in one short attempt per request; True when none is left. While backing off
        after a failure this returns at once unless `force`."""
        if not self.pending:
            return True
        if not force and time.monotonic() < self.retry_at:
            return False
        held = len(self.pending)
        try:
            with _one_short_attempt():
                self.send()
        except Exception as err:  # unreachable, timed out, 5xx: all kept in the journal and retried later
            self.retry_at, self.delay = time.monotonic() + self.delay, min(2 * self.delay, LAST_RETRY_S)
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("MLflow at %s did not take run %s's metrics (%s); training goes on, they are kept in "
                            "%s and sent when it answers", self.uri, self.run_id, short(err), self.path)
            return False
        if self.down_since is not None:
            log.warning("MLflow at %s answers again after %.0f s: sent %d held entries", self.uri,
                        time.monotonic() - self.down_since, held)
        self.delay, self.retry_at, self.down_since = FIRST_RETRY_S, 0.0, None
        return True

    def close(self, status: str, wait_s: float = CLOSE_WAIT_S) -> bool:
        """Journal the final status and flush, trying for up to `wait_s`; if entries remain, say how to send them.
        The system-metrics monitor, when one still runs, stops first, while the run is still RUNNING."""
        self.stop_monitor()
        self._append({"kind": "status", "status": status, "timestamp": _now_ms()})
        deadline = time.monotonic() + wait_s
        while not self.flush(force=True) and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        if self.pending:
            what = "metrics, the model's registration and" if self.publish_pending else "metrics and"
            log.error("MLflow at %s is still unreachable: %d entries of run %s (%s the %s status) are safe in %s "
                      "but not sent. Once the server is back run: %s", self.uri, len(self.pending), self.run_id,
                      what, status, self.path, self.sync_command())
        return not self.pending

    def send(self) -> None:
        """Send every pending entry in order, with MLflow's client settings as they are; raises on failure."""
        import mlflow
        from mlflow.entities import Metric

        client = self._client = self._client or mlflow.MlflowClient(self.uri)
        while self.pending:
            first = self.pending[0]
            if first["kind"] == "publish":
                if self.publisher is None:
                    raise RuntimeError(f"{self.path} holds a model registration, but this journal was opened without "
                                       f"a publisher; send it with: {self.sync_command()}")
                with _http_settings(PUBLISH_RETRIES, PUBLISH_TIMEOUT_S):
                    self.publisher(first["output_dir"], self.run_id, self.uri)
                self._acknowledge(1)
                continue
            if first["kind"] == "status":
                if first["status"] == "RUNNING":
                    client.update_run(self.run_id, status="RUNNING")
                else:
                    client.set_terminated(self.run_id, first["status"], end_time=first["timestamp"])
                self._acknowledge(1)
                continue
            if first["kind"] == "image":
                self._send_image(client, first)
                self._acknowledge(1)
                continue
            count, metrics = 0, []
            for entry in self.pending:  # consecutive metric entries, up to the REST limit per request
                if entry["kind"] != "metrics" or len(metrics) + len(entry["metrics"]) > BATCH_METRICS:
                    break
                metrics += [Metric(k, v, entry["timestamp"], entry["step"]) for k, v in entry["metrics"].items()]
                count += 1
            client.log_batch(self.run_id, metrics=metrics)
            self._acknowledge(count)

    def _send_image(self, client, entry: dict) -> None:
        """One journaled image, with its key, step and first timestamp; nothing when MLflow holds it already (a
        resend after a lost response) or its file is gone (no later attempt could send it, and it must not hold
        back the entries after it)."""
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES
        from PIL import Image

        path = Path(entry["path"])
        if not path.is_file():
            log.warning("%s: image %s of step %d is not sent: %s no longer exists", self.path, entry["key"],
                        entry["step"], path)
            return
        if _image_logged(client, self.run_id, entry):
            client.set_tag(self.run_id, MLFLOW_LOGGED_IMAGES, True)  # log_image's last request, maybe lost
            return
        with Image.open(path) as image:
            client.log_image(self.run_id, image, key=entry["key"], step=entry["step"], timestamp=entry["timestamp"],
                             synchronous=True)

    def _append(self, entry: dict) -> None:
        line = json.dumps(entry) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())  # on disk before the network is tried: a kill or a crash loses nothing
        except OSError as err:
            if err.errno == errno.ENOSPC:  # say whose disk and how much, rather than a bare errno
                raise OSError(errno.ENOSPC, f"no space left on {self.path.parent}: the metric journal could not "
                                            f"write {len(line)} bytes; free space there") from err
            raise
        self.pending.append(entry)

    def _acknowledge(self, count: int) -> None:
        """MLflow took the first `count` pending entries. Failing to record that (a full disk) is only a warning:
        the entries were delivered, and after a restart they go again, which is harmless (module docstring)."""
        self.pending, self.sent = self.pending[count:], self.sent + count
        tmp = self.sent_path.with_name(f".{self.sent_path.name}.tmp")
        try:
            tmp.write_text(str(self.sent))
            os.replace(tmp, self.sent_path)
        except OSError as err:
            reason = f"no space left on {self.path.parent}" if err.errno == errno.ENOSPC else short(err)
            log.warning("MLflow took %d entries of run %s, but their count could not be recorded in %s (%s); "
                        "a restart sends them again, which is harmless", count, self.run_id, self.sent_path, reason)


def open_journal(cfg: RunConfig, output_dir: str | os.PathLike, run_id: str | None = None,
                 publisher: Publisher | None = None) -> MetricJournal:
    """The journal of the run to log into: `run_id` (a resumed run), else MLFLOW_RUN_ID (set by the flow), else a
    new run, the one case that needs the server now. The run is marked RUNNING through the journal, so a resume
    works while the server is down; entries an earlier process left unsent go first."""
    uri = configure(cfg)
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or create_run(cfg)
    journal = MetricJournal(Path(output_dir) / JOURNAL_DIR / f"{run_id}.jsonl", run_id, uri, publisher)
    journal.set_status("RUNNING")
    if cfg.tracking.system_metrics:
        journal.monitor = _start_monitor(run_id, uri)
    return journal


def _start_monitor(run_id: str, uri: str):
    """MLflow's system-metrics monitor on the run (provenance.py), or None with a warning when it cannot start:
    its figures are worth a warning, never a failed run. Its first request (where a resumed run's system metrics
    stand) gets one short attempt, as the journal's do."""
    try:
        with _one_short_attempt():
            return provenance.start_system_metrics(run_id, uri)
    except Exception as err:  # not swallowed: the warning names it; training goes on without system metrics
        log.warning("no system metrics for run %s: %s", run_id, short(err))
        return None


def sync_journal(path: str | os.PathLike, run_id: str, uri: str | None = None,
                 publisher: Publisher | None = None) -> int:
    """Send what a journal holds unsent to run `run_id` (default store: `resolve_uri()`), a registration through
    `publisher`; return how many entries went. Uses MLflow's own retries and raises when the server still does not
    answer."""
    journal = MetricJournal(path, run_id, uri or resolve_uri(), publisher)
    count = len(journal.pending)
    journal.send()
    return count


def _image_logged(client, run_id: str, entry: dict) -> bool:
    """Whether run `run_id` holds the image of a journal entry. MLflow 3's log_image uploads
    images/<key, '/' as '~'>+step+<step>+timestamp+<ms>+<uuid>.png, then the same name +compressed.webp: the entry's
    fixed timestamp finds a complete earlier upload (under another naming nothing is found, and a resend logs the
    image twice)."""
    prefix = f"images/{entry['key'].replace('/', '~')}+step+{entry['step']}+timestamp+{entry['timestamp']}+"
    return any(f.path.startswith(prefix) and f.path.endswith("+compressed.webp")
               for f in client.list_artifacts(run_id, "images"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def short(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 200 else text[:200] + "..."
