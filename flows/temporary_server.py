"""Prefect's temporary API server for `vaepipe demo` and `vaepipe ingest`, started here before the flow runs.

Without PREFECT_API_URL, Prefect starts a temporary ("ephemeral") server, a uvicorn child process
(`prefect.server.api.server.SubprocessASGIServer`), the first time a flow needs the API, and waits
PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (default 20 s) for it; on a busy 2-core machine it took 12-32 s
(DESIGN.md). Starting it here first, through the same singleton the flow then finds running, lets us

- wait STARTUP_TIMEOUT_S unless the user set that setting (environment, profile or prefect.toml);
- end with one line naming the setting, not a traceback, when even that is not enough;
- make it die with this process. Prefect stops it at exit (atexit), which a `kill -9` skips, and Prefect's
  `Popen` takes no `preexec_fn` where PR_SET_PDEATHSIG could be set. So a small guard process
  (`python -m flows.temporary_server --guard`, in its own session so Ctrl-C does not reach it) waits for this
  process to disappear and then stops every process carrying this start's token in its environment: the
  server, which inherits the token because it is in `os.environ` only while the server is started.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import subprocess
import sys
import time
import uuid

SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 180  # the slowest start measured on a loaded 2-core machine was 32 s
OWNER_VAR = "VAEPIPE_TEMPORARY_SERVER_OWNER"  # the start's token in the server's environment
GUARD_POLL_S = 0.5  # how often the guard looks for its parent; a lost server lives at most this much longer
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long (as Prefect's own stop)


class StartupError(RuntimeError):
    """The temporary server did not answer; the message is one line saying what to change."""


def startup_timeout(settings=None) -> int:
    """Seconds to wait for the server: the user's setting when they set it anywhere, else STARTUP_TIMEOUT_S."""
    from prefect.settings import get_current_settings

    ephemeral = (settings or get_current_settings()).server.ephemeral
    # pydantic-settings marks a field set when any source (environment, profile, toml) gave it a value
    return ephemeral.startup_timeout_seconds if "startup_timeout_seconds" in ephemeral.model_fields_set \
        else STARTUP_TIMEOUT_S


def start() -> str | None:
    """Start Prefect's temporary server with a generous wait and a guard; its API URL, or None when a server is
    configured (PREFECT_API_URL) or temporary servers are off (the flow then uses or refuses as Prefect does).

    Raises StartupError when it does not answer in time or exits first.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, get_current_settings

    if PREFECT_API_URL.value() or not get_current_settings().server.ephemeral.enabled:
        return None
    token = uuid.uuid4().hex
    # started before the server, so no moment exists when the server runs unguarded
    guard = subprocess.Popen([sys.executable, "-m", "flows.temporary_server", "--guard", str(os.getpid()), token],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    # registered before Prefect registers the server's stop, so it runs after it (atexit runs in reverse)
    atexit.register(_stop_guard, guard)
    server = SubprocessASGIServer()  # the instance (port None) Prefect's own calls find already running
    timeout = startup_timeout()
    # Prefect logs nothing while it waits, and on a busy machine the wait is minutes
    print(f"starting Prefect's temporary API server (waiting up to {timeout} s, {SETTING}; or set PREFECT_API_URL "
          "to use a running server) ...", file=sys.stderr, flush=True)
    os.environ[OWNER_VAR] = token
    try:
        server.start(timeout=timeout)
    except RuntimeError as err:
        code = server.server_process.poll() if server.server_process else None
        server.stop()
        if code is not None:
            raise StartupError(f"Prefect's temporary API server exited with code {code} before answering "
                               "(its output is above)") from err
        if not str(err).startswith("Timed out"):
            raise
        raise StartupError(f"Prefect's temporary API server did not answer within {timeout} s (a busy machine "
                           f"starts it slowly): set {SETTING} higher, or PREFECT_API_URL to a running Prefect "
                           "server") from err
    finally:
        del os.environ[OWNER_VAR]  # later children (training, Dask) are not the guard's to stop
    return server.api_url


def _stop_guard(guard: subprocess.Popen) -> None:
    guard.terminate()
    guard.wait()


def guard(parent: int, token: str) -> None:
    """Wait until `parent` is gone, then stop the processes whose environment carries `token`."""
    import psutil

    while os.getppid() == parent:  # reparented (to init or a subreaper) once the parent is gone
        time.sleep(GUARD_POLL_S)
    # environ is None for processes of other users (AccessDenied): never ours
    orphans = [p for p in psutil.process_iter(["environ"]) if (p.info["environ"] or {}).get(OWNER_VAR) == token]
    for proc in orphans:
        with contextlib.suppress(psutil.NoSuchProcess):  # it may end on its own meanwhile
            proc.terminate()
    _, left = psutil.wait_procs(orphans, timeout=STOP_GRACE_S)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    for proc in orphans:
        print(f"vaepipe: pid {parent} died without stopping Prefect's temporary server; stopped it (pid {proc.pid})",
              file=sys.stderr)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m flows.temporary_server",
                                  description="--guard PID TOKEN: stop the temporary server started by PID when "
                                  "PID is gone (started by `vaepipe demo` and `vaepipe ingest`).")
    cli.add_argument("--guard", nargs=2, metavar=("PID", "TOKEN"), required=True)
    args = cli.parse_args()
    guard(int(args.guard[0]), args.guard[1])
