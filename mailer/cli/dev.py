"""``mailer sink`` and ``mailer dev``: a whole mailer on one machine, for development."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mailer.cli.parsing import Subcommands
from mailer.config import Settings


def cmd_sink(args: argparse.Namespace) -> int:
    """Run the capturing SMTP sink in the foreground."""
    from mailer.smtp.sink import run_sink

    settings = Settings.from_environ()
    run_sink(args.host, args.port or settings.smtp_port, Path(args.dir or settings.sink_dir),
             args.view_port)
    return 0


#: ``mailer dev``: how long to wait for the API's ``/readyz`` to answer 200 (seconds).
DEV_READY_TIMEOUT = 60.0
#: ``mailer dev``: how long the processes get to finish in-flight work once stopped, before
#: SIGTERM; and after that SIGTERM, before SIGKILL (seconds).
DEV_STOP_TIMEOUT = 30.0
DEV_KILL_TIMEOUT = 5.0


def _readyz(host: str, port: int) -> str:
    """GET the API's ``/readyz`` once: ``"ready"``, else what answered (for a message)."""
    import urllib.error
    import urllib.request

    if host in ("", "0.0.0.0"):  # noqa: S104 - a wildcard bind answers on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    netloc = f"[{host}]" if ":" in host else host
    # No proxy: a proxy named in the environment must not answer for our own API.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{netloc}:{port}/readyz", timeout=2) as reply:
            return "ready" if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        try:
            checks = json.loads(exc.read())["checks"]
            return f"HTTP {exc.code} ({', '.join(f'{k} {v}' for k, v in checks.items())})"
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"HTTP {exc.code}"
    except OSError as exc:
        return f"no answer ({type(exc).__name__})"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        # The command name may hold spaces and ')': the parent pid follows the last ')'.
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait until every process has ended or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _stop_all(running: dict[str, subprocess.Popen[bytes]], first_signal: int | None,
              timeout: float) -> int:
    """Stop the ``mailer dev`` processes with one signal each, waiting ``timeout`` seconds.

    Ctrl-C reaches the whole foreground process group, these processes included, so after
    SIGINT nothing is sent: a second signal would make dramatiq kill its workers in the
    middle of a message (its second signal means "now") and uvicorn skip its graceful
    shutdown. A SIGTERM (or a crashed process) was sent to us alone: it is passed on once.
    Whatever is still running after ``timeout`` gets SIGTERM, then SIGKILL with its
    descendants. Returns 1 when a process had to be forced or ended badly, else 0.
    """
    live = {name: proc for name, proc in running.items() if proc.poll() is None}
    if first_signal != signal.SIGINT:
        for proc in live.values():
            proc.send_signal(signal.SIGTERM)
    if live:
        print(f"stopping: waiting up to {timeout:g} s for {', '.join(live)} to finish",
              file=sys.stderr)
    _wait_all(list(live.values()), timeout)
    code = 0
    late = {name: proc for name, proc in live.items() if proc.poll() is None}
    if late:
        code = 1
        print(f"{', '.join(late)} still running after {timeout:g} s: sending SIGTERM",
              file=sys.stderr)
        for proc in late.values():
            proc.send_signal(signal.SIGTERM)
        _wait_all(list(late.values()), DEV_KILL_TIMEOUT)
        for name, proc in late.items():
            if proc.poll() is None:
                print(f"{name} still running: killing it (pid {proc.pid})", file=sys.stderr)
                # Its descendants first: once it is gone they no longer name it as parent.
                for pid in [*_descendants(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
    # A process stopped by a signal ends with 0 or by that signal (uvicorn re-raises it).
    clean = {0, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM}
    for name, proc in live.items():
        if name not in late and proc.returncode not in clean:
            print(f"{name} exited with {proc.returncode} while stopping", file=sys.stderr)
            code = 1
    return code


def cmd_dev(args: argparse.Namespace) -> int:
    """Run web, worker, scheduler and sink until Ctrl-C or SIGTERM; "up" once ``/readyz`` is 200."""
    settings = Settings.from_environ()
    from mailer.store.db import upgrade

    upgrade(settings.database_url)
    # The Procfile's web reads PORT too, so one variable moves the API everywhere.
    port = args.port or int(os.environ.get("PORT") or 8000)
    received: list[int] = []

    def _on_signal(signum: int, frame: object) -> None:
        received.append(signum)

    # Before the processes start, so a Ctrl-C during start-up is a clean stop too.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    python = sys.executable
    procs = {
        "sink": [python, "-m", "mailer.cli", "sink",
                 "--view-port", str(settings.sink_view_port)],
        "web": [python, "-m", "uvicorn", "--factory", "mailer.api.app:create_app",
                "--host", args.host, "--port", str(port), "--no-access-log"],
        "worker": [python, "-m", "dramatiq", "workers.actors", "--processes",
                   str(args.processes), "--threads", str(args.threads)],
        "scheduler": [python, "-m", "workers.scheduler"],
    }
    running: dict[str, subprocess.Popen[bytes]] = {}
    for name, command in procs.items():
        running[name] = subprocess.Popen(command, env=dict(os.environ))  # noqa: S603 - ours
        print(f"started {name} (pid {running[name].pid})", file=sys.stderr)

    def crashed() -> str | None:
        for name, proc in running.items():
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}"
        return None

    code = 0
    deadline = time.monotonic() + args.ready_timeout
    last = "no answer"
    while not received:
        failure = crashed()
        if failure is not None:
            print(f"{failure} before the API was ready; stopping", file=sys.stderr)
            code = 1
            break
        last = _readyz(args.host, port)
        if last == "ready":
            print(f"mailer is up: API on http://{args.host}:{port}, SMTP sink on "
                  f"127.0.0.1:{settings.smtp_port} storing mail in {settings.sink_dir}/, "
                  f"captured mail at http://127.0.0.1:{settings.sink_view_port}/ - "
                  "Ctrl-C stops everything", file=sys.stderr)
            break
        if time.monotonic() > deadline:
            print(f"the API did not answer /readyz with 200 within {args.ready_timeout:g} s "
                  f"(last: {last}); stopping", file=sys.stderr)
            code = 1
            break
        time.sleep(0.2)
    while code == 0 and not received:
        failure = crashed()
        if failure is not None:
            print(f"{failure}; stopping", file=sys.stderr)
            code = 1
        time.sleep(0.2)
    stopped = _stop_all(running, received[0] if received else None, args.stop_timeout)
    if received:
        print("mailer stopped", file=sys.stderr)
    return max(code, stopped)



def add_commands(sub: Subcommands) -> None:
    """Register ``mailer sink`` and ``mailer dev``."""
    sink = sub.add_parser("sink", help="local capturing SMTP server storing .eml files")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=0, help="default: MAILER_SMTP_PORT")
    sink.add_argument("--dir", help="default: MAILER_SINK_DIR or var/sink")
    sink.add_argument("--view-port", type=int, default=None,
                      help="also serve a read-only web view of the captured mail on this "
                           "loopback port (0 picks a free one)")
    sink.set_defaults(func=cmd_sink)

    dev = sub.add_parser("dev", help="run API, worker, scheduler and sink on one machine")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=0, help="API port (default: PORT or 8000)")
    dev.add_argument("--processes", type=int, default=2)
    dev.add_argument("--threads", type=int, default=4)
    dev.add_argument("--ready-timeout", type=float, default=DEV_READY_TIMEOUT,
                     help="seconds to wait for /readyz before giving up")
    dev.add_argument("--stop-timeout", type=float, default=DEV_STOP_TIMEOUT,
                     help="seconds in-flight work gets after Ctrl-C before SIGTERM")
    dev.set_defaults(func=cmd_dev)
