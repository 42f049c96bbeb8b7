"""``make run`` (scripts/run.sh), ``mailer dev`` and scripts/install-deps.sh, run as a user would.

Ports come from the environment, "mailer is up" means the API answers ``/readyz``, one
Ctrl-C (SIGINT to the process group) stops every process gracefully, and a port held by a
stranger is one line naming the variable to set (SPEC 10 and 11).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, wait_for
from tests.services import RedisServer, free_port, redis_server_available, require

MAILER = Path(sys.executable).parent / "mailer"
#: Start-up of the API, worker, scheduler and sink on 2 shared cores takes about 8 s.
START_TIMEOUT = 120.0
#: A graceful stop takes about 6 s (dramatiq's workers, then Redis flushing its AOF);
#: ``mailer dev`` escalates on its own after 30 s.
STOP_BOUND = 45.0


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any MAILER_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_") and k != "PORT"}
    env.update(extra)
    return env


def checkout(tmp_path: Path) -> Path:
    """A copy of the run scripts beside the real .venv, with a stub for the install step.

    run.sh writes .env and var/ next to itself, so a copy leaves the developer's checkout
    alone; the stub keeps pip from installing into the shared .venv from a foreign folder
    (install-deps.sh has its own tests below).
    """
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("run.sh", "start-redis.sh"):
        shutil.copy(ROOT / "scripts" / name, root / "scripts" / name)
    (root / "scripts" / "install-deps.sh").write_text("echo '==> dependencies ready (stub)'\n")
    (root / ".venv").symlink_to(ROOT / ".venv")
    return root


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_leftovers(pids: list[int]) -> None:
    """Clean-up after a failed test: SIGKILL what is still running, by PID."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Started:
    """A command in its own session and process group, its output in a log file."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.pids: list[int] = [self.proc.pid]

    def text(self) -> str:
        """Everything printed so far."""
        return self.log.read_text(errors="replace")

    def wait_for_line(self, needle: str, timeout: float) -> None:
        """Wait until ``needle`` is printed; fail early if the command ends first."""
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"ended with {self.proc.returncode} before {needle!r}:\n"
                                     f"{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not printed within {timeout}s:\n"
                                     f"{self.text()[-3000:]}")
            time.sleep(0.1)

    def remember_tree(self) -> list[int]:
        """Record every process below the command (to check each one ends, by PID)."""
        self.pids = [self.proc.pid, *descendants(self.proc.pid)]
        return self.pids

    def stop_and_check(self, signum: int, *, group: bool) -> int:
        """Send ``signum`` once; every recorded process must end within STOP_BOUND."""
        if group:
            os.killpg(self.proc.pid, signum)  # what a terminal does on Ctrl-C
        else:
            os.kill(self.proc.pid, signum)
        code = self.proc.wait(timeout=STOP_BOUND)
        wait_for(lambda: not any(alive(pid) for pid in self.pids), timeout=5)
        return code

    def cleanup(self) -> None:
        """Kill by PID whatever a failed test left running."""
        if self.proc.poll() is None:
            self.pids = [self.proc.pid, *descendants(self.proc.pid), *self.pids]
        kill_leftovers(self.pids)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@pytest.fixture
def need_redis() -> None:
    """The run script starts a real redis-server."""
    require("redis-server", redis_server_available(), "redis-server is not installed")


def distinct_free_ports(count: int) -> list[int]:
    """``count`` different free loopback ports."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


# --- make run: the README's first message, then one Ctrl-C ---------------------------------


@pytest.mark.usefixtures("need_redis")
def test_make_run_on_chosen_ports_serves_a_first_message_and_stops_on_one_ctrl_c(
    tmp_path: Path,
) -> None:
    # Given ports chosen through the environment the README names
    root = checkout(tmp_path)
    redis_port, api_port, smtp_port, view_port = distinct_free_ports(4)
    env = clean_env(MAILER_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", PORT=str(api_port),
                    MAILER_SMTP_PORT=str(smtp_port), MAILER_SINK_VIEW_PORT=str(view_port))
    run = Started(["bash", "scripts/run.sh"], root, env, tmp_path / "run.log")
    redis_pid = 0
    try:
        # When it says it is up
        run.wait_for_line("mailer is up", START_TIMEOUT)
        # Then the API is ready at that moment, on the chosen port
        assert httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=5).status_code == 200
        # And Redis is this checkout's own, on the chosen port
        redis_pid = int((root / "var" / "redis" / "redis.pid").read_text())
        assert f"redis started on 127.0.0.1:{redis_port}" in run.text()
        pids = run.remember_tree()
        # And .env holds the development settings for a second terminal
        dotenv = (root / ".env").read_text()
        for line in ("MAILER_ENV='development'",
                     f"MAILER_REDIS_URL='redis://127.0.0.1:{redis_port}/0'",
                     f"MAILER_SMTP_PORT='{smtp_port}'",
                     f"MAILER_SINK_VIEW_PORT='{view_port}'",
                     f"MAILER_PUBLIC_URL='http://127.0.0.1:{api_port}'",
                     f"MAILER_DATABASE_URL='sqlite:///{root.resolve()}/var/mailer.db'"):
            assert line in dotenv.splitlines()

        # When a second terminal follows "A first message", with no MAILER_* variable set
        key = subprocess.run(
            [str(MAILER), "keys", "create", "demo", "--scope", "messages:transactional"],
            cwd=root, env=clean_env(), capture_output=True, text=True, timeout=60)
        assert key.returncode == 0, key.stderr
        auth = {"Authorization": f"Bearer {key.stdout.strip()}"}
        base = f"http://127.0.0.1:{api_port}"
        posted = httpx.post(f"{base}/v1/messages", headers=auth, timeout=10, json={
            "template": "registration_confirmation", "to": "ada@example.com",
            "data": {"name": "Ada", "confirm_url": "https://example.com/confirm/1"}})
        assert posted.status_code == 202, posted.text
        assert posted.json()["status"] == "queued"
        # Then the .eml arrives in var/sink and the message shows as sent
        sink = root / "var" / "sink"
        emls = wait_for(lambda: list(sink.glob("*.eml")) if sink.is_dir() else [], timeout=30)
        assert b"ada@example.com" in emls[0].read_bytes()
        # And the sink's web view, at the URL it printed, lists it
        view = f"http://127.0.0.1:{view_port}/"
        assert f"captured mail at {view}" in run.text()
        assert "ada@example.com" in httpx.get(view, timeout=5).text

        def status() -> str:
            got = httpx.get(f"{base}/v1/messages/{posted.json()['id']}", headers=auth, timeout=5)
            return str(got.json()["status"])
        wait_for(lambda: status() == "sent", timeout=30)

        # When Ctrl-C is pressed once (SIGINT to the whole foreground process group)
        code = run.stop_and_check(signal.SIGINT, group=True)
        # Then everything ended gracefully within the bound, Redis included, by PID
        assert code == 0, run.text()[-3000:]
        assert not alive(redis_pid)
        log = run.text()
        assert "mailer stopped" in log
        assert "Killing worker process" not in log  # dramatiq's answer to a second signal
        assert "still running after" not in log and "Traceback" not in log
        assert len(pids) >= 7  # run.sh, mailer dev, sink, web, worker (+ its processes), scheduler
    finally:
        run.cleanup()
        kill_leftovers([redis_pid] if redis_pid else [])


# --- make run: a port held by a stranger is one line, and nothing is left running -------------


def listener() -> socket.socket:
    """A loopback socket that accepts connections and never answers: "another program"."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.usefixtures("need_redis")
@pytest.mark.parametrize("taken", ["MAILER_REDIS_URL", "PORT", "MAILER_SMTP_PORT",
                                   "MAILER_SINK_VIEW_PORT"])
def test_make_run_refuses_a_port_another_program_holds(tmp_path: Path, taken: str) -> None:
    # Given another program listening on the port one variable names
    root = checkout(tmp_path)
    redis_port, api_port, smtp_port, view_port = distinct_free_ports(4)
    with listener() as stranger:
        busy = stranger.getsockname()[1]
        ports = {"MAILER_REDIS_URL": redis_port, "PORT": api_port, "MAILER_SMTP_PORT": smtp_port,
                 "MAILER_SINK_VIEW_PORT": view_port}
        ports[taken] = busy
        env = clean_env(MAILER_REDIS_URL=f"redis://127.0.0.1:{ports['MAILER_REDIS_URL']}/0",
                        PORT=str(ports["PORT"]), MAILER_SMTP_PORT=str(ports["MAILER_SMTP_PORT"]),
                        MAILER_SINK_VIEW_PORT=str(ports["MAILER_SINK_VIEW_PORT"]))
        # When make run starts
        done = subprocess.run(["bash", "scripts/run.sh"], cwd=root, env=env, text=True,
                              capture_output=True, timeout=60, start_new_session=True)
    # Then it stops with one line naming the port and the variable to set
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"make run: 127.0.0.1:{busy} is taken by ")
    assert f": set {taken} to a free port, e.g. {taken}=" in line
    # And nothing was left behind: no .env, no Redis (one started before the check is stopped)
    assert not (root / ".env").exists()
    started = re.search(r"redis started on \S+ \(pid (\d+)", done.stdout)
    if taken == "MAILER_REDIS_URL":
        assert started is None
    else:
        assert started is not None and not alive(int(started.group(1)))


@pytest.mark.usefixtures("need_redis")
def test_make_run_refuses_someone_elses_redis(tmp_path: Path) -> None:
    # Given a Redis that keeps its data elsewhere (another project's) on the chosen port
    root = checkout(tmp_path)
    api_port, smtp_port = distinct_free_ports(2)
    with RedisServer() as theirs:
        env = clean_env(MAILER_REDIS_URL=theirs.url, PORT=str(api_port),
                        MAILER_SMTP_PORT=str(smtp_port))
        # When make run starts
        done = subprocess.run(["bash", "scripts/run.sh"], cwd=root, env=env, text=True,
                              capture_output=True, timeout=60, start_new_session=True)
        # Then it is not reused: one line says so and names MAILER_REDIS_URL
        assert done.returncode == 1, done.stdout + done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(f"make run: 127.0.0.1:{theirs.port} is taken by a program other "
                               "than this checkout's Redis (var/redis): set MAILER_REDIS_URL")
        # And their Redis is untouched
        assert alive(theirs.pid)


@pytest.mark.usefixtures("need_redis")
def test_make_run_on_another_port_names_the_redis_an_earlier_run_left(tmp_path: Path) -> None:
    # Given this checkout's Redis left running by an earlier run (data in var/redis)
    root = checkout(tmp_path)
    old_port, new_port, api_port, smtp_port = distinct_free_ports(4)
    subprocess.run(["bash", "scripts/start-redis.sh", "var/redis", str(old_port)], cwd=root,
                   check=True, capture_output=True, timeout=30)
    old_pid = int((root / "var" / "redis" / "redis.pid").read_text())
    try:
        # When make run is asked for a Redis on another port
        env = clean_env(MAILER_REDIS_URL=f"redis://127.0.0.1:{new_port}/0", PORT=str(api_port),
                        MAILER_SMTP_PORT=str(smtp_port))
        done = subprocess.run(["bash", "scripts/run.sh"], cwd=root, env=env, text=True,
                              capture_output=True, timeout=60, start_new_session=True)
        # Then it refuses (two servers on one AOF file would corrupt it), naming the old port
        assert done.returncode == 1, done.stdout + done.stderr
        [line] = done.stderr.strip().splitlines()
        assert f"set MAILER_REDIS_URL=redis://127.0.0.1:{old_port}/0 or stop it" in line
        assert f"'kill {old_pid}'" in line
        # And the old Redis is left as it was
        assert alive(old_pid)
    finally:
        kill_leftovers([old_pid])


# --- mailer dev alone: SIGTERM from a process manager, and a bounded wait for /readyz --------


def dev_env(tmp_path: Path, redis_url: str) -> tuple[dict[str, str], int]:
    """A development environment for ``mailer dev`` on free ports; returns it and the API port."""
    api_port, smtp_port, view_port = distinct_free_ports(3)
    return clean_env(MAILER_ENV="development", MAILER_REDIS_URL=redis_url,
                     MAILER_DATABASE_URL=f"sqlite:///{tmp_path / 'dev.db'}",
                     MAILER_SMTP_PORT=str(smtp_port), PORT=str(api_port),
                     MAILER_SINK_VIEW_PORT=str(view_port)), api_port


def test_mailer_dev_passes_one_sigterm_on_and_stops_gracefully(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Given mailer dev up on free ports (the API port from PORT, like the Procfile)
    env, api_port = dev_env(tmp_path, redis_server.url)
    dev = Started([str(MAILER), "dev"], tmp_path, env, tmp_path / "dev.log")
    try:
        dev.wait_for_line("mailer is up", START_TIMEOUT)
        assert f"API on http://127.0.0.1:{api_port}" in dev.text()
        dev.remember_tree()
        # When a process manager sends SIGTERM to mailer dev alone
        code = dev.stop_and_check(signal.SIGTERM, group=False)
        # Then it passed one signal on: every process ended gracefully within the bound
        assert code == 0, dev.text()[-3000:]
        log = dev.text()
        assert "Killing worker process" not in log and "still running after" not in log
        assert "mailer stopped" in log
    finally:
        dev.cleanup()


def test_mailer_dev_gives_up_when_the_api_never_gets_ready(tmp_path: Path) -> None:
    # Given mailer dev pointed at a Redis that is not there, so /readyz answers 503
    env, _ = dev_env(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    dev = Started([str(MAILER), "dev", "--ready-timeout", "5"], tmp_path, env,
                  tmp_path / "dev.log")
    try:
        dev.wait_for_line("started scheduler", START_TIMEOUT)
        dev.remember_tree()
        # When the bounded wait for readiness ends
        code = dev.proc.wait(timeout=5 + STOP_BOUND + START_TIMEOUT)
        # Then it never claimed to be up, said why in one line, and stopped everything
        log = dev.text()
        assert code == 1
        assert "mailer is up" not in log
        assert ("the API did not answer /readyz with 200 within 5 s (last: HTTP 503 "
                "(database ok, redis unreachable)); stopping") in log
        wait_for(lambda: not any(alive(pid) for pid in dev.pids), timeout=5)
    finally:
        dev.cleanup()


# --- install-deps.sh: pins from constraints.txt, and patience with another apt ----------------


@pytest.fixture
def fake_checkout(tmp_path: Path) -> Iterator[Path]:
    """install-deps.sh with a stand-in .venv/bin/python that records how it was called."""
    require("redis-server", redis_server_available(), "redis-server is not installed")
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install-deps.sh", root / "scripts" / "install-deps.sh")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(ROOT / "constraints.txt", root / "constraints.txt")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$*" >>"$(dirname "$0")/../calls"\n')
    python.chmod(0o755)
    yield root


def pip_calls(root: Path) -> list[str]:
    """The pip command lines the stand-in python received."""
    calls = root / ".venv" / "calls"
    text = calls.read_text() if calls.exists() else ""
    return [line for line in text.splitlines() if line.startswith("-m pip")]


def install(root: Path) -> subprocess.CompletedProcess[str]:
    """Run the copied install-deps.sh (no --test: only redis-server is looked for)."""
    return subprocess.run(["bash", "scripts/install-deps.sh"], cwd=root, text=True,
                          capture_output=True, timeout=60, env=clean_env())


def test_install_pins_with_constraints_and_reinstalls_when_they_change(
    fake_checkout: Path,
) -> None:
    root = fake_checkout
    # When dependencies are installed the first time
    first = install(root)
    # Then pip ran once, with the constraints file
    assert first.returncode == 0, first.stderr
    assert len(pip_calls(root)) == 1
    assert " -c constraints.txt -e ." in pip_calls(root)[0]
    # And a second run with nothing changed does not run pip
    assert install(root).returncode == 0 and len(pip_calls(root)) == 1
    # When a pin changes (what `make lock` does)
    with (root / "constraints.txt").open("a") as pins:
        pins.write("# relocked\n")
    # Then the next run installs again
    assert install(root).returncode == 0 and len(pip_calls(root)) == 2
    # And without a constraints file it installs unpinned, and says so
    (root / "constraints.txt").unlink()
    unpinned = install(root)
    assert unpinned.returncode == 0 and len(pip_calls(root)) == 3
    assert "-c" not in pip_calls(root)[2].split() and "no constraints.txt" in unpinned.stdout


def test_committed_constraints_pin_every_dependency_by_version() -> None:
    # Given the committed constraints file
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    pinned = {re.split(r"==", line)[0].lower().replace("_", "-").replace(".", "-")
              for line in lines}
    # Then every line is name==version (no local file a fresh machine would lack)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line) for line in lines), lines
    # And every runtime dependency of pyproject.toml is among them
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    for requirement in wanted:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        assert name.lower().replace("_", "-").replace(".", "-") in pinned, requirement


def apt_harness(tmp_path: Path, failures: int) -> tuple[Path, Path]:
    """install-deps.sh's own apt_get, with a fake apt-get that is locked ``failures`` times."""
    script = (ROOT / "scripts" / "install-deps.sh").read_text()
    # A one-line function first, else one that ends with a "}" line of its own.
    parts = [re.search(rf"^{name}\(\) {{[^\n]*}}\n|^{name}\(\) {{\n.*?^}}\n", script,
                       re.M | re.S)
             for name in ("step", "as_root", "apt_get")]
    assert all(parts), "install-deps.sh no longer defines step, as_root and apt_get"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    count = tmp_path / "count"
    fake = bin_dir / "apt-get"
    fake.write_text(f"""#!/bin/bash
n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n >{count}
echo "$*" >>{tmp_path / "args"}
if [ $n -le {failures} ]; then
    echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1 (apt-get)"
    echo "E: Unable to lock directory /var/lib/apt/lists/"
    exit 100
fi
echo "Reading package lists..."
""")
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    for tool in (fake, bin_dir / "sudo"):
        tool.chmod(0o755)
    harness = tmp_path / "harness.sh"
    harness.write_text("set -euo pipefail\nAPT_LOCK_WAIT=20\nAPT_LOCK_POLL=0.2\n"
                       + "".join(m.group(0) for m in parts if m) + "apt_get update -qq\n")
    return harness, bin_dir


def test_apt_waits_for_another_apt_to_release_its_lock(tmp_path: Path) -> None:
    # Given another apt holding the lock for the first two attempts
    harness, bin_dir = apt_harness(tmp_path, failures=2)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    # When install-deps.sh's apt_get runs `apt-get update`
    done = subprocess.run(["bash", str(harness)], env=env, text=True, capture_output=True,
                          timeout=60)
    # Then it waited (saying so once) and succeeded on the third attempt
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("waiting up to 20s for another apt") == 1
    assert (tmp_path / "count").read_text().strip() == "3"
    # And every attempt also asked dpkg's own lock to wait
    assert all(line.startswith("-o DPkg::Lock::Timeout=20 update")
               for line in (tmp_path / "args").read_text().splitlines())


def test_apt_gives_up_after_the_wait_and_shows_why(tmp_path: Path) -> None:
    # Given a lock that is never released within the wait
    harness, bin_dir = apt_harness(tmp_path, failures=10_000)
    harness.write_text(harness.read_text().replace("APT_LOCK_WAIT=20", "APT_LOCK_WAIT=1"))
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    # When apt_get runs
    done = subprocess.run(["bash", str(harness)], env=env, text=True, capture_output=True,
                          timeout=60)
    # Then it fails with apt's own message
    assert done.returncode == 1
    assert "Could not get lock" in done.stderr and "apt-get update failed" in done.stderr
