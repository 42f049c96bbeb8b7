"""What every scenario shares: the run's settings, a sink process, and the measurement."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import (
    BenchError,
    Group,
    Proc,
    cpu_delta,
    free_port,
    machine_busy_seconds,
    python,
    wait_until,
)
from bench.sinks import read_status

#: The process groups every row reports, in table order ("scheduler": the default
#: deployment's scheduler process, which fans campaigns out there).
GROUPS = ("worker", "api", "scheduler", "redis", "sink")
#: Seconds between two samples of ``--timeline``.
TIMELINE_STEP = 0.5


@dataclass(frozen=True)
class Config:
    """Knobs of one benchmark invocation."""

    messages: int = 10_000
    naive_messages: int = 4_000
    warmup: int = 400
    processes: int = 2
    threads: int = 4
    api_workers: int = 2
    pool_size: int = 16
    batch: int = 500
    clients: int = 2
    timeout: float = 180.0
    redis_url: str = ""
    redis_pid: int = 0
    work: Path = Path("/tmp")
    profile: Path | None = None
    profile_mode: str = "gil"
    timeline: bool = False


@dataclass
class Measurement:
    """One scenario run: messages delivered, wall time, and CPU/RSS per process group."""

    scenario: str
    sink: str
    delivered: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    note: str = ""
    #: Cores' worth of CPU used meanwhile by processes outside the measured groups.
    background: float = 0.0
    #: Acceptance-to-250 latency figures (``p50_ms``, ``p99_ms``, ...), when measured.
    latency: dict[str, float] = field(default_factory=dict)
    #: The database the run kept its data in, when the scenario runs on more than one.
    database: str = ""

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    def cpu_us(self, group: str) -> float | None:
        """CPU microseconds per delivered message spent by ``group``."""
        if group not in self.cpu or not self.delivered:
            return None
        return self.cpu[group] * 1e6 / self.delivered


class Sink:
    """A sink subprocess on a free loopback port, read through its status file."""

    def __init__(self, kind: str, directory: Path, arrivals: Path | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.status = directory / f"sink-{kind}-{self.port}.status"
        extra = ["--arrivals", str(arrivals)] if arrivals is not None else []
        self.proc = Proc(
            f"{kind} sink",
            [python(), str(Path(__file__).resolve().parent / "sinks.py"), "--kind", kind,
             "--port", str(self.port), "--status-file", str(self.status), *extra],
            log=directory / f"sink-{kind}.log",
        )
        wait_until(f"{kind} sink start", lambda: self._up(), 15)

    def _up(self) -> bool:
        self.proc.check()
        return self.status.exists()

    def count(self) -> int:
        """Messages answered 250 so far."""
        return read_status(self.status)[0]

    def wait_for(self, total: int, timeout: float, check: Callable[[], None]) -> float:
        """Wait until ``total`` messages arrived; return the monotonic time of the last."""
        deadline = time.monotonic() + timeout
        while True:
            count, _, last = read_status(self.status)
            if count >= total:
                return last
            if time.monotonic() > deadline:
                raise BenchError(f"sink saw {count} of {total} messages within {timeout:.0f} s")
            check()
            self.proc.check()
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the sink process."""
        self.proc.stop()


class Profiler:
    """py-spy sampling the named process trees for the measured interval (``--profile``)."""

    def __init__(self, directory: Path | None, targets: Mapping[str, int],
                 mode: str = "gil") -> None:
        self.procs: list[Proc] = []
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        # --nonblocking: sample without pausing the target, so timing stays close. "gil":
        # only the thread holding the GIL, i.e. where Python code spends CPU; "wall": every
        # thread, idle or not, to see what the threads wait for.
        flags = ["--gil"] if mode == "gil" else ["--idle", "--threads"]
        for name, pid in targets.items():
            self.procs.append(Proc(f"py-spy {name}", [
                "py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
                "--rate", "250", *flags, "--format", "raw",
                "--output", str(directory / f"{name}.txt"),
            ], log=directory / f"py-spy-{name}.log"))
        time.sleep(1.0)  # py-spy needs a moment to attach

    def stop(self) -> None:
        """Ask py-spy to write its output (SIGINT) and wait for it."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
        for proc in self.procs:
            try:
                proc.popen.wait(30)
            except subprocess.TimeoutExpired:
                proc.stop()


class Window:
    """CPU snapshots of the named groups around the measured interval.

    With ``timeline`` set, a thread also samples every group's CPU and the sink's count
    every ``TIMELINE_STEP`` seconds, to show which stage is busy when (``--timeline``).
    """

    def __init__(self, groups: Mapping[str, Group], sink: Sink | None = None,
                 timeline: bool = False) -> None:
        self.groups = dict(groups)
        self.before = {name: g.cpu() for name, g in self.groups.items()}
        self.busy_before = machine_busy_seconds()
        self.opened = time.monotonic()
        #: CPU seconds per wall second that processes outside the groups used (load from
        #: other work on the machine, plus the load generator itself).
        self.background = 0.0
        self.samples: list[tuple[float, int, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeline and sink is not None:
            self._thread = threading.Thread(target=self._sample, args=(sink,), daemon=True)
            self._thread.start()

    def _sample(self, sink: Sink) -> None:
        started = time.monotonic()
        for _ in range(int(3600 / TIMELINE_STEP)):  # bounded: an hour at most
            totals = {name: sum(g.cpu().values()) for name, g in self.groups.items()}
            self.samples.append((time.monotonic() - started, sink.count(), totals))
            if self._stop.wait(TIMELINE_STEP):
                return

    def close(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds per group since the window opened, and peak RSS per group (MiB)."""
        cpu = {name: cpu_delta(self.before[name], g.cpu()) for name, g in self.groups.items()}
        rss = {name: g.peak_rss() for name, g in self.groups.items()}
        elapsed = max(time.monotonic() - self.opened, 1e-9)
        others = machine_busy_seconds() - self.busy_before - sum(cpu.values())
        self.background = max(others, 0.0) / elapsed
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        return cpu, rss

    def timeline(self) -> str:
        """Per step: messages per second at the sink and each group's share of one core."""
        lines = ["    t(s)  sink msg/s  " + "  ".join(f"{n:>7}%" for n in self.groups)]
        for (t0, n0, c0), (t1, n1, c1) in itertools.pairwise(self.samples):
            step = t1 - t0
            shares = "  ".join(f"{100 * (c1[n] - c0[n]) / step:8.0f}" for n in self.groups)
            lines.append(f"  {t1:6.1f}  {(n1 - n0) / step:10.0f}  {shares}")
        return "\n".join(lines)
