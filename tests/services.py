"""Private Redis and PostgreSQL servers for the test suite, started and stopped by PID."""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow

#: How long a server may take to answer after being started (seconds).
DEFAULT_START_TIMEOUT = 10.0
#: How long a server may take to exit after SIGTERM before it is killed (seconds).
DEFAULT_STOP_TIMEOUT = 10.0
#: System user that owns the PostgreSQL cluster when the tests run as root, because
#: postgres refuses to run with root privileges.
PG_SYSTEM_USER = "mailertest"
#: Database created in every new cluster.
DEFAULT_DATABASE = "mailer"
#: Where Debian installs Chromium.
CHROMIUM = "/usr/bin/chromium"

_DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class _Closable(Protocol):
    def close(self) -> None: ...


# Servers still running; the atexit hook stops them if a test run ends without doing so.
_LIVE: list[_Closable] = []


@atexit.register
def _close_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nobody is listening on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require(name: str, available: bool, why: str) -> None:
    """Fail (under CI) or skip (elsewhere) the current test when ``name`` is unavailable."""
    if available:
        return
    # CI must prove every integration test ran; a silent skip there would hide a broken setup.
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is required under CI but unavailable: {why}", pytrace=False)
    pytest.skip(f"{name} unavailable: {why}")


def redis_server_available() -> bool:
    """Tell whether a ``redis-server`` binary is on PATH."""
    return shutil.which("redis-server") is not None


def postgres_bin_dir() -> Path | None:
    """Return the ``bin`` dir of the highest PostgreSQL under /usr/lib/postgresql, if any."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bin_dir = Path(initdb).parent
        version = bin_dir.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version) and (bin_dir / "pg_ctl").exists():
            found.append((tuple(int(part) for part in version.split(".")), bin_dir))
    return max(found)[1] if found else None


def postgres_available() -> bool:
    """Tell whether a private PostgreSQL cluster can be started on this machine."""
    if postgres_bin_dir() is None:
        return False
    if os.geteuid() != 0:
        return True
    return shutil.which("runuser") is not None and (
        user_exists(PG_SYSTEM_USER) or shutil.which("useradd") is not None
    )


def chromium_path() -> str | None:
    """Return the path of the Chromium binary, or None when it is not installed."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium")


def user_exists(name: str) -> bool:
    """Whether the system user ``name`` exists."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Tell whether ``pid`` runs; a zombie awaiting its reaper counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def stop_process(process: subprocess.Popen[Any] | None, timeout: float,
                 kill: Callable[[], None] | None = None) -> None:
    """SIGTERM ``process`` and wait up to ``timeout`` s for it; then ``kill`` (default:
    SIGKILL the process itself and reap it). Nothing when it is absent or gone."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        if kill is not None:
            kill()
        else:
            process.kill()
            process.wait()


def tail_of(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for failure messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ContextService:
    """A test server used as ``with Server() as server:``: started on entry, and stopped
    (by PID) and cleaned up on exit, whatever happened inside."""

    def start(self) -> Self:
        """Start the server; subclasses return themselves."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the server and remove what it left behind."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ServiceError(RuntimeError):
    """Raised when a test server cannot be started or stopped."""


class RedisServer(ContextService):
    """A private ``redis-server`` on 127.0.0.1 with AOF persistence, in its own temp dir."""

    def __init__(self, *, port: int | None = None, directory: Path | None = None) -> None:
        """Prepare (not start) a server; pick a free port and a temp dir when none given."""
        self.port = port if port is not None else free_port()
        self._owns_dir = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="mailer-redis-")) if directory is None else directory
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0 on this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The PID of the running server."""
        if self._process is None or self._process.poll() is not None:
            raise ServiceError("redis-server is not running")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "redis.log"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; return self."""
        if self._process is not None and self._process.poll() is None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        # appendfsync everysec as in production: a kill -9 then loses at most ~1 s of writes.
        args = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.directory,
        )
        if self not in _LIVE:
            _LIVE.append(self)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + DEFAULT_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                raise ServiceError(f"redis-server exited with {code}:\n{tail_of(self.log_path)}")
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.kill()
        limit = DEFAULT_START_TIMEOUT
        raise ServiceError(
            f"redis-server did not answer within {limit} s:\n{tail_of(self.log_path)}")

    def _answers_ping(self) -> bool:
        # While the AOF is replayed Redis answers "-LOADING", so only "+PONG" means ready.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server with SIGTERM (it flushes the AOF), falling back to SIGKILL."""
        stop_process(self._process, DEFAULT_STOP_TIMEOUT)
        self._process = None

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would; data stays for :meth:`restart`."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._process = None

    def restart(self) -> RedisServer:
        """Start again on the same port and dir (replaying the AOF) and wait until ready."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its temp dir if this object created it."""
        self.stop()
        if self in _LIVE:
            _LIVE.remove(self)
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)


class PostgresServer(ContextService):
    """A private PostgreSQL cluster on 127.0.0.1, tuned for speed, in its own temp dir."""

    def __init__(self, *, port: int | None = None, database: str = DEFAULT_DATABASE) -> None:
        """Prepare (not start) a cluster; pick a free port when none is given."""
        _check_database_name(database)
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise ServiceError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin_dir = bin_dir
        self.port = port if port is not None else free_port()
        self.database = database
        self._as_root = os.geteuid() == 0
        self.user = PG_SYSTEM_USER if self._as_root else pwd.getpwuid(os.geteuid()).pw_name
        self.directory: Path | None = None
        self._started = False

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._dir() / "data"

    @property
    def socket_dir(self) -> Path:
        """The directory holding the cluster's unix socket."""
        return self._dir() / "socket"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self._dir() / "postgres.log"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the default database."""
        return self.url_for(self.database)

    @property
    def pid(self) -> int:
        """The postmaster's PID, read from ``postmaster.pid``."""
        pid = self._postmaster_pid()
        if pid is None:
            raise ServiceError("PostgreSQL is not running")
        return pid

    def url_for(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this cluster."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _dir(self) -> Path:
        if self.directory is None:
            raise ServiceError("PostgreSQL cluster was not started")
        return self.directory

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", self.user, "--", *command]
        # LC_ALL=C: a minimal machine may lack the caller's locale, which initdb rejects.
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        result = subprocess.run(
            command,
            cwd=self._dir(),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ServiceError(
                f"{Path(args[0]).name} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n{tail_of(self.log_path)}"
            )

    def start(self) -> PostgresServer:
        """Create the cluster and its database, start it and wait until ready; return self."""
        if self._started:
            return self
        if self._as_root:
            _ensure_system_user(self.user)
        self.directory = Path(tempfile.mkdtemp(prefix="mailer-pg-", dir=_temp_base(self._as_root)))
        self.socket_dir.mkdir()
        if self._as_root:
            user = pwd.getpwnam(self.user)
            for path in (self.directory, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        _LIVE.append(self)
        self._run(
            str(self.bin_dir / "initdb"),
            "--pgdata", str(self.data_dir),
            "--username", self.user,
            "--auth", "trust",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",
        )  # fmt: skip
        self._configure()
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "--pgdata", str(self.data_dir),
            "--log", str(self.log_path),
            "--wait", "--timeout", str(int(DEFAULT_START_TIMEOUT) * 3),
            "start",
        )  # fmt: skip
        self._started = True
        self._create(self.database)
        return self

    def _configure(self) -> None:
        # Durability is off on purpose: the cluster is thrown away after the run, and
        # fsync/full-page writes dominate the time of the many small test transactions.
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# mailer test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        # Trust only the loopback address and the private socket; nothing else may connect.
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )

    def _connect(self) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True
        )

    def _create(self, name: str) -> None:
        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (lowercase identifier) and return its URL."""
        _check_database_name(name)
        self._dir()
        self._create(name)
        return self.url_for(name)

    def _postmaster_pid(self) -> int | None:
        if self.directory is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def stop(self) -> None:
        """Stop the cluster with ``pg_ctl stop -m fast``, killing the postmaster if that fails."""
        if not self._started:
            return
        pid = self._postmaster_pid()
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "--pgdata", str(self.data_dir),
                      "--mode", "fast", "--wait", "stop")  # fmt: skip
            # pg_ctl returns once postmaster.pid is gone, a moment before the process exits.
            if pid is not None:
                _wait_gone(pid, DEFAULT_STOP_TIMEOUT)
        except ServiceError:
            # Only the postmaster recorded in our own data dir is signalled; SIGQUIT is
            # PostgreSQL's immediate shutdown, SIGKILL the last resort.
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
                if not _wait_gone(pid, DEFAULT_STOP_TIMEOUT):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    _wait_gone(pid, DEFAULT_STOP_TIMEOUT)
        self._started = False

    def close(self) -> None:
        """Stop the cluster and remove its temp dir."""
        self.stop()
        if self in _LIVE:
            _LIVE.remove(self)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def _check_database_name(name: str) -> None:
    if not _DATABASE_NAME.match(name):
        raise ValueError(f"database name must match {_DATABASE_NAME.pattern}: {name!r}")


def _ensure_system_user(name: str) -> None:
    if user_exists(name):
        return
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    # A parallel test process may have created the user between the check and useradd.
    if result.returncode != 0 and not user_exists(name):
        raise ServiceError(f"useradd {name} failed: {result.stderr.strip()}")


def _temp_base(as_root: bool) -> str:
    """Pick a temp base the unprivileged cluster owner can reach (every parent o+x)."""
    base = Path(tempfile.gettempdir()).resolve()
    if not as_root:
        return str(base)
    for path in (base, *base.parents):
        if not os.stat(path).st_mode & 0o001:
            return "/tmp"  # world-traversable (mode 1777) on Debian
    return str(base)


#: Where Debian installs RabbitMQ's own start script (the /usr/sbin one switches user).
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
#: RabbitMQ boots an Erlang VM and recovers its queues before it listens (seconds).
RABBITMQ_START_TIMEOUT = 60.0
#: How long a graceful RabbitMQ shutdown may take before it is killed (seconds).
RABBITMQ_STOP_TIMEOUT = 30.0
#: The first bytes of every AMQP 0-9-1 connection (its protocol header).
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def rabbitmq_available() -> bool:
    """Tell whether RabbitMQ and Erlang's port mapper (epmd) are installed."""
    return RABBITMQ_SERVER.exists() and shutil.which("epmd") is not None


class RabbitMQServer(ContextService):
    """A private ``rabbitmq-server`` on 127.0.0.1, with its own data dir and ports.

    Every port is its own: AMQP, Erlang distribution, and a private ``epmd`` (Erlang's
    port mapper, which the server would otherwise look for, or start detached, on the
    shared port 4369). The node name carries the AMQP port, so two test runs never meet.
    Both the server (its process group: a shell wrapper and the Erlang VM) and the epmd
    are started and stopped by PID.
    """

    def __init__(self) -> None:
        """Prepare (not start) a server on free ports in a new temp dir."""
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="mailer-rabbitmq-"))
        self.nodename = f"mailer-test-{self.port}@localhost"
        self._process: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``amqp://`` URL of the default virtual host (guest may log in on loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def log_path(self) -> Path:
        """The node's main log file."""
        return self.directory / "log" / f"{self.nodename}.log"

    def _environment(self) -> dict[str, str]:
        base = self.directory
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(base),  # the Erlang cookie is written here
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            # The distribution listener (used by rabbitmqctl) on loopback only.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def _configure(self) -> None:
        base = self.directory
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # The default 50 MB free-disk alarm would block publishers on a nearly full /tmp.
            "disk_free_limit.absolute = 1MB\n"
        )
        (base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's
        (base / "enabled_plugins").write_text("[].\n")

    def start(self) -> RabbitMQServer:
        """Start epmd and the server, and wait until AMQP answers; return self."""
        if self._process is not None and self._process.poll() is None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self._configure()
        if self not in _LIVE:
            _LIVE.append(self)
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )
        # Its own session: kill() signals the group (the script and the Erlang VM it runs).
        with (self.directory / "server.out").open("ab") as out:
            self._process = subprocess.Popen(
                [str(RABBITMQ_SERVER)], cwd=self.directory, env=self._environment(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + RABBITMQ_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                raise ServiceError(f"rabbitmq-server exited with {code}:\n"
                                   f"{tail_of(self.directory / 'server.out')}\n"
                                   f"{tail_of(self.log_path)}")
            if self._answers_amqp():
                return
            time.sleep(0.1)
        self.kill()
        raise ServiceError(f"rabbitmq-server did not answer within {RABBITMQ_START_TIMEOUT} s:"
                           f"\n{tail_of(self.log_path)}")

    def _answers_amqp(self) -> bool:
        # The server answers a protocol header with a Connection.Start method frame
        # (frame type 1, channel 0) once it accepts clients.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(_AMQP_HEADER)
                return sock.recv(3) == b"\x01\x00\x00"
        except OSError:
            return False

    @property
    def pid(self) -> int:
        """The PID of the server's process group leader (the start script)."""
        if self._process is None or self._process.poll() is not None:
            raise ServiceError("rabbitmq-server is not running")
        return self._process.pid

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM: the script stops the node), else kill it."""
        stop_process(self._process, RABBITMQ_STOP_TIMEOUT, self.kill)
        self._process = None

    def kill(self) -> None:
        """SIGKILL the server's process group, as a crash would; data stays for a restart."""
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # The Erlang VM is the script's child in the same group; wait until it is gone so
        # a restart can take its ports and its data dir.
        self._process = None
        deadline = time.monotonic() + DEFAULT_STOP_TIMEOUT
        while time.monotonic() < deadline and self._answers_amqp():
            time.sleep(0.05)

    def restart(self) -> RabbitMQServer:
        """Stop gracefully and start again on the same ports and data dir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and its epmd, and remove the temp dir."""
        self.stop()
        epmd = self._epmd
        if epmd is not None and epmd.poll() is None:
            epmd.terminate()
            try:
                epmd.wait(DEFAULT_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait()
        self._epmd = None
        if self in _LIVE:
            _LIVE.remove(self)
        shutil.rmtree(self.directory, ignore_errors=True)
