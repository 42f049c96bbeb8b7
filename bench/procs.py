"""Processes the benchmark starts: launch, wait, stop by PID, and read their CPU and RSS.

CPU comes from ``/proc/<pid>/stat`` (utime + stime, in clock ticks) and peak RSS from
``VmHWM`` in ``/proc/<pid>/status``; a group (dramatiq forks its workers) is the process
and all its descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The repository root: subprocesses run from here with it on PYTHONPATH.
ROOT = Path(__file__).resolve().parent.parent
#: Seconds a started process may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0

_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark step failed (a process died, a deadline passed, a count was wrong)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(what: str, predicate: Callable[[], bool], timeout: float,
               interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; raise :class:`BenchError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not done within {timeout:.0f} s")
        time.sleep(interval)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name sits in parentheses and may hold spaces; fields follow the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children = _children_map()
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 10_000:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # Fields 14 and 15 of proc(5) (utime, stime), counted from 1 with pid and comm first.
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used so far (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait is work.
    values = [int(v) for v in fields[:8]]
    return (sum(values) - values[3] - values[4]) / _TICK


def peak_rss_mb(pid: int) -> float:
    """The process's resident-set high-water mark (VmHWM) in MiB, 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Group:
    """A named set of root PIDs whose process trees are measured together."""

    name: str
    roots: list[int] = field(default_factory=list)
    #: False: the roots alone, without the processes they started.
    tree: bool = True

    def pids(self) -> list[int]:
        """Every live process of the group."""
        if not self.tree:
            return list(self.roots)
        found: list[int] = []
        for root in self.roots:
            found.extend(descendants(root))
        return found

    def cpu(self) -> dict[int, float]:
        """CPU seconds per live PID."""
        return {pid: cpu_seconds(pid) for pid in self.pids()}

    def peak_rss(self) -> float:
        """The largest VmHWM of any one process of the group, MiB."""
        return max((peak_rss_mb(pid) for pid in self.pids()), default=0.0)


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds used between two snapshots (a process born in between counts in full)."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


class Proc:
    """A subprocess in its own session, stopped by its PID (and its process group)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.name = name
        extra = os.environ.get("PYTHONPATH")
        path = f"{ROOT}{os.pathsep}{extra}" if extra else str(ROOT)
        full_env = {**os.environ, **(env or {}), "PYTHONPATH": path}
        self._log = log
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            self.popen = subprocess.Popen(
                list(argv), cwd=ROOT, env=full_env, start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )
        finally:
            if log is not None and not isinstance(out, int):
                out.close()

    @property
    def pid(self) -> int:
        """The PID of the process we started."""
        return self.popen.pid

    def check(self) -> None:
        """Raise :class:`BenchError` if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            tail = ""
            if self._log is not None and self._log.exists():
                tail = "\n".join(self._log.read_text(errors="replace").splitlines()[-15:])
            raise BenchError(f"{self.name} exited with {code}\n{tail}")

    def stop(self) -> None:
        """SIGTERM the process group this process leads, then SIGKILL it if it lingers."""
        if self.popen.poll() is None:
            # start_new_session made the child a group leader: its pgid is its own PID, so
            # this reaches exactly the processes it forked (dramatiq's workers) and no other.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT)


def python() -> str:
    """The interpreter running the benchmark (the project's .venv under ``make bench``)."""
    return sys.executable
