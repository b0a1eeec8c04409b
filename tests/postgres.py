"""A throwaway PostgreSQL server for tests: initdb, start on a free loopback port, create databases, stop.

PostgreSQL refuses to run as root, and the tests run as root on the project machines, so the server runs as
the `postgres` system user the Debian package creates. Its directory is made with `tempfile.mkdtemp()` under
/tmp and handed to that user: pytest's own temporary directories are 0700 root and out of its reach. The
unix socket lives inside that directory too (never /var/run/postgresql, which another server may use).
Authentication is `trust`, on 127.0.0.1 only: a test database, gone when the session ends.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "install the server with `apt-get install postgresql` (Debian/Ubuntu) or set VAEPIPE_PG_BIN"
SUPERUSER = "postgres"  # the database role initdb creates (-U)


def bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: $VAEPIPE_PG_BIN, else the newest /usr/lib/postgresql/*/bin."""
    candidates = [Path(os.environ["VAEPIPE_PG_BIN"])] if os.environ.get("VAEPIPE_PG_BIN") else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    return next((p for p in candidates if (p / "initdb").is_file() and (p / "pg_ctl").is_file()), None)


def _os_user() -> str:
    """Who runs the server: the `postgres` system user when we are root, else ourselves."""
    if os.geteuid() != 0:
        return getpass.getuser()
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip(f"running as root, and PostgreSQL refuses root, but there is no `postgres` user; {INSTALL_HINT}")
    return "postgres"


def _run(cmd: list, user: str, timeout: float = 120) -> subprocess.CompletedProcess:
    as_user = {} if user == getpass.getuser() else {"user": user, "group": pwd.getpwnam(user).pw_gid,
                                                    "extra_groups": []}  # drop root's groups too
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                            cwd="/", **as_user)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {result.returncode}:\n"
                           f"{result.stdout}{result.stderr}")
    return result


@contextlib.contextmanager
def postgres_server(port: int) -> Iterator[str]:
    """A running server on 127.0.0.1:`port`; yields its base URL `postgresql://postgres@127.0.0.1:<port>`.

    Skips the test (it does not fail) when the server binaries are not installed.
    """
    pg_bin = bin_dir()
    if pg_bin is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin; "
                    f"{INSTALL_HINT}")
    user = _os_user()
    root = Path(tempfile.mkdtemp(prefix="vaepipe-pg-"))  # 0700 under /tmp, so only its owner gets in
    account = pwd.getpwnam(user)
    os.chown(root, account.pw_uid, account.pw_gid)
    data, log = root / "data", root / "server.log"
    try:
        try:
            _run([pg_bin / "initdb", "-D", data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"], user)
            # -k: the unix socket inside our directory; -F: no fsync, a test database need not survive a crash
            options = f"-h 127.0.0.1 -p {port} -k {root} -F"
            _run([pg_bin / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "120", "start"], user, 180)
        except RuntimeError as err:
            if (data / "postmaster.pid").exists():  # started but not ready in time: leave nothing running
                subprocess.run([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                               capture_output=True, timeout=60, user=user if os.geteuid() == 0 else None)
            raise RuntimeError(f"{err}\nserver log:\n{log.read_text() if log.exists() else '(none)'}") from None
        try:
            yield f"postgresql://{SUPERUSER}@127.0.0.1:{port}"
        finally:
            _run([pg_bin / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop"], user)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(base_url: str, name: str) -> str:
    """Create database `name` on the server at `base_url`; its SQLAlchemy URL.

    A plain `postgresql://` URL: SQLAlchemy 2.1 connects through psycopg 3 (`psycopg[binary]`) by default.
    """
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"{base_url}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return f"{base_url}/{name}"
