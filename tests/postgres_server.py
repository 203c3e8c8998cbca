"""A real PostgreSQL server for the tests: ``initdb`` into a temporary
directory, started on a free port, its Unix socket in that directory too.

One server serves a whole test session (start-up takes about a second); each
test takes a fresh database from ``new_database()`` (0.4 s), or a fresh
schema from ``new_schema()`` (a few ms). PostgreSQL refuses to run
as root, so as root its files belong to the ``postgres`` user and its programs
run as that user (``runuser``). ``fsync`` is off for speed unless asked for:
``kill9()`` then loses nothing that a test can see, since the operating system
still holds what was written (a commit that returned before its WAL was
written, ``synchronous_commit = off``, is lost). ``settings`` adds or
overrides server settings (``postgres -c NAME=VALUE``). Given a ``root``, the
server keeps its files there across runs (``make cluster``), rather than in a
temporary directory removed at ``close()``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.helpers import free_port

START_TIMEOUT_S = 30.0
SUPERUSER = "postgres"


def find_program(name: str) -> str:
    """A PostgreSQL program: on the PATH, or in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    raise FileNotFoundError(
        f"PostgreSQL's {name} is not installed: `make test` installs Debian's postgresql"
    )


class PostgresServer:
    """One PostgreSQL server of the tests' own, in a temporary directory (or ``root``)."""

    def __init__(
        self,
        *,
        fsync: bool = False,
        settings: dict[str, str] | None = None,
        root: Path | None = None,
        port: int | None = None,
    ) -> None:
        self._fsync = fsync
        self._settings = dict(settings or {})
        self._kept = root is not None
        self._root = root if root is not None else Path(tempfile.mkdtemp(prefix="llamachat-pg-"))
        self.data_dir = self._root / "data"
        self.socket_dir = self._root / "socket"
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._databases = itertools.count(1)
        self._as_root = os.geteuid() == 0
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            shutil.chown(self._root, SUPERUSER)
            shutil.chown(self.socket_dir, SUPERUSER)
        if not (self.data_dir / "PG_VERSION").exists():
            initdb = [find_program("initdb"), "-D", str(self.data_dir), "-U", SUPERUSER]
            self._run([*initdb, "-A", "trust", "--no-sync", "-E", "UTF8", "--locale", "C"])

    def _command(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", SUPERUSER, "--", *argv] if self._as_root else argv

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(self._command(argv), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}")

    def dsn_of(self, database: str) -> str:
        """A ``postgresql://`` URL of one of this server's databases (over TCP)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        """The URL of the server's ``postgres`` database."""
        return self.dsn_of("postgres")

    def start(self) -> None:
        """Start the server (again, after ``kill9``) and wait until it answers."""
        settings = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "on" if self._fsync else "off",
            "full_page_writes": "on" if self._fsync else "off",
            "max_connections": "100",
            "shared_buffers": "16MB",
            **self._settings,
        }
        argv = [find_program("postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        log = (self._root / "postgres.log").open("ab")
        self._process = subprocess.Popen(
            self._command(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited at start: {self.log_tail()}")
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        path = self._root / "postgres.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"test_{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_of(name)

    def new_schema(self) -> str:
        """A fresh, empty schema of the database ``schemas`` (cheaper than a
        database: no files copied); returns a URL whose ``search_path`` is it,
        so that what a client creates goes there."""
        name = f"test_{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            if not admin.execute("SELECT 1 FROM pg_database WHERE datname = 'schemas'").fetchone():
                admin.execute("CREATE DATABASE schemas")
        with psycopg.connect(self.dsn_of("schemas"), autocommit=True) as admin:
            admin.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.dsn_of('schemas')}?options=-csearch_path%3D{name}"

    def kill9(self) -> None:
        """Kill the server at once (SIGKILL), as a crash of its machine would."""
        if self._process is not None and self._process.poll() is None:
            # The postmaster's process group: its backends die with it.
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:  # until every backend is gone too
                try:
                    os.killpg(self._process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.01)
        self._forget_stale_pid_file()

    def _forget_stale_pid_file(self) -> None:
        """What a killed server leaves behind and a new one would refuse to start on."""
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*"):
            lock.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and wait for it."""
        if self._process is not None and self._process.poll() is None:
            # To the postmaster itself: runuser, between, does not pass SIGINT on.
            try:
                postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
                os.kill(postmaster, signal.SIGINT)
            except (OSError, ValueError, IndexError):
                self.kill9()
                return
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def close(self) -> None:
        """Stop the server and remove its files (unless they are kept in a ``root``)."""
        self.stop()
        if not self._kept:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
