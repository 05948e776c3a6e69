"""A private, throwaway PostgreSQL cluster for tests that restart, stop, crash or cut it off.

Why this exists: every other PostgreSQL test shares the server at 127.0.0.1:5432. A test that
restarts, kills or disconnects *that* server would break whatever else runs against it, so tests
that do violence to PostgreSQL get their own cluster instead: own data directory (in /dev/shm or
/tmp, owned by the ``postgres`` OS user), own free TCP port on 127.0.0.1, own unix socket
directory (the data directory, so nothing lands in /var/run/postgresql).

Speed: ``initdb`` costs ~0.45 s, so it runs once per process into a template that each cluster
copies (``cp -a``: ~0.03 s on the tmpfs /dev/shm, used when it has room; 0.2-0.3 s on /tmp).
The postmaster is started directly as our child instead of through ``pg_ctl start -w``: pg_ctl
polls in 100 ms steps (start ~110 ms, stop ~100 ms) while polling ``postmaster.pid`` ourselves
sees the server ready in ~20 ms. Owning the postmaster also lets ``kill()`` reap it at once; a
daemonised postmaster stays a zombie of PID 1 until PID 1 gets round to reaping it (seconds, in
this container), and a zombie's PID in ``postmaster.pid`` makes the next start refuse to run.

Durability settings: ``fsync=off`` and ``full_page_writes=off`` are safe because only processes
crash here, never the machine, and the page cache survives a process crash. ``synchronous_commit``
stays on (with fsync off it costs almost nothing) so that a committed row survives ``kill()``,
which is what crash tests want to rely on.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest

from tests.ports import free_port

if TYPE_CHECKING:
    import psycopg

SERVER_USER = "postgres"
"""OS user that owns the data directory and runs the server when the tests run as root."""

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0
CHILD_GRACE = 3.0
"""After a kill, how long orphaned server processes get to exit by themselves before SIGKILL."""

POLL_INTERVAL = 0.005
SHM_MIN_FREE = 1 << 30
"""Use /dev/shm only with this much room: a cluster takes ~40 MB, plus ~7 MB per database."""

STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
"""pg_ctl's shutdown modes and the signals pg_ctl would send the postmaster for them."""

SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "50",
    "autovacuum": "off",
    "huge_pages": "off",
    "jit": "off",
}
"""Settings for a fast, quiet throwaway server; port and socket directory are added per cluster."""


class PrivatePostgresError(RuntimeError):
    """The private cluster could not be created, started, stopped or reached."""


class PrivatePostgresUnavailable(PrivatePostgresError):
    """This machine cannot run a private cluster (no binaries, no server user, no psycopg)."""


@dataclass(frozen=True)
class _Owner:
    """The OS identity the server binaries run as (they refuse to run as root)."""

    uid: int
    gid: int


def find_bin_dir() -> Path | None:
    """Where initdb and postgres live: $STOPLINE_PG_BIN, else the newest Debian-style
    /usr/lib/postgresql/N/bin, else the directory of `initdb` on PATH."""
    configured = os.environ.get("STOPLINE_PG_BIN")
    candidates: list[Path] = []
    if configured:
        candidates.append(Path(configured))
    else:

        def version(path: Path) -> int:
            name = path.parent.name
            return int(name) if name.isdigit() else -1

        candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version)[::-1])
        on_path = shutil.which("initdb")
        if on_path is not None:
            candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    return None


def _server_owner() -> _Owner | None:
    """None when we are not root: then the binaries simply run as ourselves."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(SERVER_USER)
    return _Owner(entry.pw_uid, entry.pw_gid)


def unavailable_reason(bin_dir: Path | None = None) -> str | None:
    """Why a private cluster cannot run here, or None if it can. Cheap: starts nothing."""
    if bin_dir is None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            return (
                "no PostgreSQL server binaries (initdb, postgres) found in $STOPLINE_PG_BIN, "
                "/usr/lib/postgresql/*/bin or on PATH"
            )
    missing = [name for name in ("initdb", "postgres") if not (bin_dir / name).is_file()]
    if missing:
        return f"PostgreSQL server binaries {missing} not found in {bin_dir}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root but there is no {SERVER_USER!r} OS user to run PostgreSQL as"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (pip install 'stopline[postgres]')"
    return None


def require_private_postgres(bin_dir: Path | None = None) -> None:
    """Skip the calling test when no private cluster can run here, but fail it instead when
    STOPLINE_REQUIRE_POSTGRES=1, so CI cannot go green by silently skipping crash tests."""
    reason = unavailable_reason(bin_dir)
    if reason is None:
        return
    if os.environ.get("STOPLINE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (STOPLINE_REQUIRE_POSTGRES=1: private PostgreSQL tests must run)")
    pytest.skip(reason)


def _as_owner(args: list[str], owner: _Owner | None) -> list[str]:
    """Switch to the server user with setpriv, after exec, rather than with Popen(user=...):
    the test process has gRPC threads, and changing uid/gid inside a child forked from a
    multi-threaded process crashed that child now and then (SIGSEGV before exec)."""
    if owner is None:
        return args
    return [
        "setpriv",
        f"--reuid={owner.uid}",
        f"--regid={owner.gid}",
        "--clear-groups",
        "--",
        *args,
    ]


def _run_as_server_user(
    args: list[str], owner: _Owner | None, cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool as the server user; subprocess switches user itself, so this does
    not depend on runuser/su/sudo being installed."""
    try:
        return subprocess.run(
            _as_owner(args, owner),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PrivatePostgresError(f"{args[0]} did not finish within {timeout}s") from exc


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        raise PrivatePostgresError(
            f"{what} failed with exit code {result.returncode}:\n{result.stdout}{result.stderr}"
        )


def _scratch_parent(owner: _Owner | None) -> str | None:
    """Where data directories go: $STOPLINE_PG_TMPDIR, else /dev/shm when it is a roomy tmpfs
    (copying a data directory there takes ~0.03 s against 0.2-0.3 s on this machine's /tmp, and
    the server's own writes never touch a disk), else /tmp. Never $TMPDIR or pytest's tmp_path
    when root: /tmp/pytest-of-root is mode 0700, so `postgres` could not reach inside."""
    configured = os.environ.get("STOPLINE_PG_TMPDIR")
    if configured:
        return configured
    try:
        shm = os.statvfs("/dev/shm")
        if shm.f_bavail * shm.f_frsize >= SHM_MIN_FREE and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return "/tmp" if owner is not None else None


def _scratch_dir(prefix: str, owner: _Owner | None) -> Path:
    """A fresh directory (mode 0700) that the server user owns."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=_scratch_parent(owner)))
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)
    return path


_templates: dict[Path, Path] = {}
_templates_lock = threading.Lock()


def _template_data_dir(bin_dir: Path, owner: _Owner | None) -> Path:
    """An initdb'd data directory, made once per process and copied for every cluster, because
    initdb is by far the slowest step."""
    with _templates_lock:
        base = _templates.get(bin_dir)
        if base is not None and (base / "data" / "PG_VERSION").is_file():
            return base / "data"
        base = _scratch_dir("stopline-pg-template-", owner)
        try:
            result = _run_as_server_user(
                [
                    str(bin_dir / "initdb"),
                    "--pgdata",
                    str(base / "data"),
                    "--auth",
                    "trust",
                    "--username",
                    "postgres",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",
                    "--no-instructions",
                ],
                owner,
                cwd=base,
                timeout=120,
            )
            _check(result, "initdb")
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        _templates[bin_dir] = base
        return base / "data"


@dataclass(frozen=True)
class _ProcessId:
    """A PID plus its start time, so a recycled PID is never mistaken for the process we saw."""

    pid: int
    start_time: str

    def alive(self) -> bool:
        fields = _stat_fields(self.pid)
        # Zombies (Z) and dead tasks (X) have exited and released the shared memory; only our
        # parent can reap them, and for orphans that is PID 1, which may take its time.
        return fields is not None and fields[19] == self.start_time and fields[0] not in "ZX"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _children_of(pid: int) -> list[_ProcessId]:
    """The server processes a postmaster forked (each calls setsid, so no process group helps)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []  # no procfs: we cannot track them, and crash recovery will complain if needed
    children = []
    for name in names:
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and fields[1] == str(pid):
                children.append(_ProcessId(int(name), fields[19]))
    return children


_live_clusters: set[PrivatePostgres] = set()
"""Clusters not closed yet; held strongly so a forgotten one is still shut down at exit."""


@atexit.register
def _cleanup_at_exit() -> None:
    """Don't leave servers running or data directories behind if a test forgot close()."""
    for cluster in list(_live_clusters):
        with suppress(Exception):
            cluster.close()
    with _templates_lock:
        for base in _templates.values():
            shutil.rmtree(base, ignore_errors=True)
        _templates.clear()


class PrivatePostgres:
    """One throwaway cluster. Create it through `private_postgres()`, which starts it and always
    closes it; the constructor only prepares the (stopped) data directory."""

    port: int

    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or find_bin_dir()
        reason = unavailable_reason(found)
        if reason is not None or found is None:
            raise PrivatePostgresUnavailable(reason or "no PostgreSQL binaries")
        self.bin_dir = found
        self._owner = _server_owner()
        self._process: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._crashed = False
        template = _template_data_dir(self.bin_dir, self._owner)
        self.base_dir = _scratch_dir("stopline-pg-", self._owner)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.port = free_port()
        try:
            result = _run_as_server_user(
                ["cp", "-a", str(template), str(self.data_dir)],
                self._owner,
                cwd=self.base_dir,
                timeout=60,
            )
            _check(result, "copying the template data directory")
        except BaseException:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            raise
        _live_clusters.add(self)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PrivatePostgres 127.0.0.1:{self.port} {state} {self.data_dir}>"

    @property
    def running(self) -> bool:
        """Whether our postmaster process is alive (it may still be starting or stopping)."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return self._process.pid if self.running and self._process else None

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL for `database`, over TCP like the application connects."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{quote(database, safe='')}"

    def log_text(self) -> str:
        """The server log so far (every start appends to it), for assertions and diagnostics."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start the server and return once it accepts connections (what `pg_ctl start -w`
        does, without its 100 ms polling steps). Raises with the server log when it cannot.

        The port is kept across restarts so URLs stay valid; only if the very first start finds
        the port taken meanwhile does it move to another free one.
        """
        if self.running:
            raise PrivatePostgresError(f"{self!r} is already running")
        attempts = 1 if self._started_once else 3
        for attempt in range(1, attempts + 1):
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            process = self._launch()
            problem = self._wait_ready(process)
            if problem is None:
                self._process = process
                self._started_once = True
                self._crashed = False
                return
            log = self.log_text()[log_offset:]
            if attempt < attempts and "could not bind" in log:
                self.port = free_port()
                continue
            raise PrivatePostgresError(f"{problem}\n--- {self.log_path} ---\n{log[-4000:]}")
        raise AssertionError("unreachable")

    def _launch(self) -> subprocess.Popen[bytes]:
        settings = {
            **SERVER_SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": str(self.data_dir),
        }
        args = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                _as_owner(args, self._owner),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for pytest must not also shut the server down.
                start_new_session=True,
            )

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> str | None:
        """Poll postmaster.pid for this postmaster's "ready" status, the signal pg_ctl uses:
        it is written once the sockets listen and any crash recovery has finished."""
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = process.poll()
            if code is not None:
                return f"postgres exited with code {code} while starting"
            try:
                lines = pid_file.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) >= 8 and lines[0] == str(process.pid) and lines[7].strip() == "ready":
                return None
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                return f"postgres did not become ready within {START_TIMEOUT}s"
            time.sleep(POLL_INTERVAL)

    def stop(self, mode: str = "fast") -> None:
        """Shut down like `pg_ctl stop -m MODE` and wait for the postmaster to exit (it waits
        for all its children first). smart waits for clients to leave, fast disconnects them,
        immediate quits without a checkpoint (the next start runs crash recovery).
        Does nothing if the server is not running, so cleanup code can call it unconditionally.
        """
        if mode not in STOP_SIGNALS:
            raise ValueError(f"stop mode must be one of {sorted(STOP_SIGNALS)}, not {mode!r}")
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(STOP_SIGNALS[mode])
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise PrivatePostgresError(
                f"{mode} shutdown did not finish within {STOP_TIMEOUT}s; killed the server"
            ) from exc
        finally:
            if process.poll() is not None:
                self._process = None

    def restart(self) -> None:
        """Fast shutdown then start, on the same port: existing connections break, new ones
        work once this returns."""
        self.stop("fast")
        self.start()

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster, then wait until it and every process it
        had forked are gone, so that `start()` can run crash recovery on the same data
        directory (it refuses while old processes still hold the shared memory).

        The postmaster is frozen first so it cannot fork a backend we would not know about.
        Orphaned backends exit by themselves on noticing the postmaster's death; any that has
        not within a few seconds (e.g. busy in a long query) is SIGKILLed too.
        """
        process = self._process
        if process is None or process.poll() is not None:
            raise PrivatePostgresError(f"{self!r} is not running, so there is nothing to kill")
        process.send_signal(signal.SIGSTOP)
        children = _children_of(process.pid)
        self._crashed = True
        process.kill()
        try:
            process.wait(timeout=KILL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise PrivatePostgresError(f"postmaster {process.pid} survived SIGKILL") from exc
        self._process = None
        if _wait_gone(children, CHILD_GRACE):
            return
        for child in children:
            if child.alive():
                os.kill(child.pid, signal.SIGKILL)
        if not _wait_gone(children, KILL_TIMEOUT):
            left = [child.pid for child in children if child.alive()]
            raise PrivatePostgresError(f"server processes {left} survived SIGKILL")

    def _connect(self, database: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        if not self.running:
            raise PrivatePostgresError(f"{self!r} is not running")
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=5,
        )

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (quoted as an identifier) and return its SQLAlchemy URL."""
        from psycopg import sql

        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def client_backends(self) -> int:
        """How many client backends other than the one asking the server lists (one whose
        client has just disconnected is listed until it has exited)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchall()
        return len(rows)

    def cut_connections(self) -> int:
        """Terminate every client backend except the one asking, like an admin or a failover
        would, and return how many were terminated. Returns only after they have exited, so a
        cut-off client's next use fails right away and deterministically."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchall()
        return sum(1 for (terminated,) in rows if terminated)

    def close(self) -> None:
        """Stop the server if it runs (killing it if a fast shutdown hangs) and delete the data
        directory. Safe to call more than once.

        After a kill() that was never followed by start(), the crashed server's System V shared
        memory header and its /dev/shm segments are still allocated, and only a postmaster
        starting on the same data directory knows them and frees them; so close() starts and
        stops the server once more (~30 ms) rather than leak them on every crash test.
        """
        _live_clusters.discard(self)
        try:
            if self._crashed and not self.running:
                with suppress(PrivatePostgresError):
                    self.start()
            if self.running:
                self.stop("fast")
        finally:
            if self.running:
                self.kill()
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _wait_gone(processes: list[_ProcessId], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(process.alive() for process in processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


@contextmanager
def private_postgres(bin_dir: Path | None = None) -> Iterator[PrivatePostgres]:
    """A started private cluster, stopped and deleted afterwards. Raises
    PrivatePostgresUnavailable at once when this machine cannot run one; tests call
    `require_private_postgres()` first to skip (or, in CI, fail) instead."""
    cluster = PrivatePostgres(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
