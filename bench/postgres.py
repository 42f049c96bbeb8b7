"""A private PostgreSQL cluster for the benchmark, with PostgreSQL's own durability defaults.

The cluster is the test suite's (:class:`tests.services.PostgresServer`: Debian's binaries
from /usr/lib/postgresql/*/bin, initdb in a temp dir, a free loopback port, the unix socket
in that dir, run as an unprivileged user when we are root, stopped with ``pg_ctl stop`` and
the postmaster's PID, the dir removed), with one difference: the tests turn durability off
for speed, the benchmark measures what a deployment gets, so ``fsync``, ``synchronous_commit``
and ``full_page_writes`` are back at PostgreSQL's defaults (on). Everything else is untuned
(128 MB shared_buffers), except ``max_connections`` (200, the tests' value) so the web,
worker and scheduler pools of the Procfile fit with room to spare.

    with database("fanout") as url:      # one cluster, one fresh database
        ...
    with cluster() as pg:                 # one cluster, a fresh database per run
        with pg.fresh_database("run1") as url:
            ...
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator

from psycopg import sql

from bench.procs import BenchError
from tests.services import PostgresServer, ServiceError, postgres_available

#: Appended after the tests' settings (a later line of postgresql.conf wins): durability as
#: PostgreSQL ships it, so a commit is on disk when the application is told it is.
DURABILITY = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


class Cluster(PostgresServer):
    """The test suite's private cluster with PostgreSQL's default durability."""

    def _configure(self) -> None:
        super()._configure()
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("# mailer benchmark: durability as shipped\n")
            conf.writelines(f"{key} = {value}\n" for key, value in DURABILITY.items())

    def version(self) -> str:
        """The server's version, as ``postgres --version`` prints it (e.g. ``15.18``)."""
        out = subprocess.run([str(self.bin_dir / "postgres"), "--version"],
                             capture_output=True, text=True, check=False).stdout
        found = re.search(r"\d+(\.\d+)+", out)
        return found.group() if found else "?"

    def describe(self) -> str:
        """One line for the printed output: version and the durability settings in force."""
        settings = ", ".join(f"{key} {value}" for key, value in DURABILITY.items())
        return f"PostgreSQL {self.version()} (private cluster, {settings})"

    @contextlib.contextmanager
    def fresh_database(self, name: str) -> Iterator[str]:
        """A fresh, empty database ``name`` (lowercase identifier); dropped afterwards.

        Dropping it keeps autovacuum of earlier runs' tables from loading later runs.
        """
        url = self.create_database(name)
        try:
            yield url
        finally:
            with contextlib.suppress(Exception), self._connect() as conn:
                # FORCE: a process that died mid-run may still hold a connection.
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(name)))


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """Start a private cluster; stop it by PID and remove its dir on the way out."""
    if not postgres_available():
        raise BenchError("no PostgreSQL server binaries under /usr/lib/postgresql "
                         "(apt-get install postgresql), or no way to run them as non-root; "
                         "pass --databases sqlite to skip the PostgreSQL runs")
    server = Cluster()
    try:
        server.start()
    except ServiceError as exc:
        server.close()
        raise BenchError(f"PostgreSQL did not start: {exc}") from exc
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def database(name: str = "bench") -> Iterator[str]:
    """A fresh database on a private cluster: its ``postgresql+psycopg://`` SQLAlchemy URL."""
    with cluster() as server, server.fresh_database(name) as url:
        yield url
