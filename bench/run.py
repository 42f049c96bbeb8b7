"""The benchmark: our pipeline against the raw aiosmtplib ceiling and a naive peer.

``make bench`` (or ``.venv/bin/python bench/run.py``; ``--quick`` for a short run) starts
its own Redis, sinks, API and workers on 127.0.0.1, runs every scenario several times and
prints one table of medians: messages per second, the ratio to the raw blast of the same
run, CPU microseconds per message per process group, and peak RSS. The ``deployment``
scenario (bench/deployment.py) runs the Procfile's processes as shipped, DKIM on, and is
summarised on its own, once per database (``--databases``: a SQLite file, and a private
PostgreSQL cluster with its default durability, see bench/postgres.py): raw blast, naive
peer, single sends and campaign side by side, and the latency from acceptance to the
sink's 250 at half load. The blast and the naive peer do not touch a database; they run
once per run and every database's ratios are taken against them. The signed blast is the
raw blast DKIM-signing each message (RSA-2048) as it sends it: the ceiling for a pipeline
with DKIM on, which the deployment's figures are also divided by.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench import campaign, deployment, peers, pipeline
from bench.procs import ROOT, BenchError, machine_busy_seconds, python
from bench.stack import GROUPS, Config, Measurement
from tests.services import RedisServer

CAMPAIGN_SCRIPT = ROOT / "bench" / "campaign_fanout.py"
#: Cores' worth of CPU used by other processes during a run above which it is flagged.
BACKGROUND_WARN = 0.05
#: How long to wait for the machine to become quiet before each run (seconds).
QUIET_WAIT = 90.0
#: The databases the deployment scenario (and the fan-out) can run on.
DATABASES = ("sqlite", "postgresql")
#: Process groups measured only on some rows (the PostgreSQL server on its runs).
EXTRA_GROUPS = ("postgresql",)
#: Longest a fan-out benchmark may run, per database (seconds).
FANOUT_TIMEOUT = 3600


def machine() -> str:
    """A one-line description of the machine and interpreter."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} vCPU ({model}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def wait_quiet(limit: float = QUIET_WAIT) -> float:
    """Wait (at most ``limit`` s) until other processes use under BACKGROUND_WARN cores.

    The bench shares the machine with whatever else runs there; starting a run while, say,
    a test suite is busy would charge its CPU to our figures. Returns the last load seen.
    """
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy_seconds()
        time.sleep(1.0)
        load = machine_busy_seconds() - before
        if load < BACKGROUND_WARN or time.monotonic() > deadline:
            return load


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: Sequence[float], spec: str) -> str:
    """`` (runs LOW-HIGH)`` when there was more than one run: a median alone hides how far
    single runs strayed on a noisy machine."""
    if len(values) < 2:
        return ""
    return f" (runs {format(min(values), spec)}-{format(max(values), spec)})"


def summarise(results: list[Measurement], runs: int) -> list[dict[str, object]]:
    """Median rows: one per (scenario, sink, database), with ratios taken within each run."""
    ceilings = {(m.sink, i): m.rate for i, m in _indexed(results) if m.scenario == "raw blast"}
    naive = {(m.sink, i): m.rate for i, m in _indexed(results) if m.scenario == "naive peer"}
    rows: list[dict[str, object]] = []
    keys: list[tuple[str, str, str]] = []
    for m in results:
        if _key(m) not in keys:
            keys.append(_key(m))
    for scenario, sink, database in keys:
        mine = [(i, m) for i, m in _indexed(results) if _key(m) == (scenario, sink, database)]
        ratio = [m.rate / ceilings[(sink, i)] for i, m in mine if (sink, i) in ceilings]
        vs_naive = [m.rate / naive[(sink, i)] for i, m in mine if (sink, i) in naive]
        row: dict[str, object] = {
            "scenario": _label(scenario, database), "sink": sink, "runs": len(mine),
            "rate": _median([m.rate for _, m in mine]),
            "ratio": _median(ratio) if ratio else None,
            "vs_naive": _median(vs_naive) if vs_naive else None,
            "note": mine[0][1].note,
            "background": max(m.background for _, m in mine),
        }
        for group in (*GROUPS, *EXTRA_GROUPS):
            cpu = [c for _, m in mine if (c := m.cpu_us(group)) is not None]
            row[f"cpu_{group}"] = _median(cpu) if cpu else None
            rss = [m.rss[group] for _, m in mine if group in m.rss]
            row[f"rss_{group}"] = max(rss) if rss else None
        rows.append(row)
    del runs
    return rows


def _key(m: Measurement) -> tuple[str, str, str]:
    return m.scenario, m.sink, m.database


def _label(scenario: str, database: str) -> str:
    """The scenario's name, with the database when the scenario ran on more than one."""
    return f"{scenario} [{database}]" if database else scenario


def _indexed(results: list[Measurement]) -> list[tuple[int, Measurement]]:
    # Each measurement's run number is its position among its own (scenario, sink, db).
    seen: dict[tuple[str, str, str], int] = {}
    out = []
    for m in results:
        key = _key(m)
        out.append((seen.get(key, 0), m))
        seen[key] = seen.get(key, 0) + 1
    return out


def _fmt(value: object, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(rows: list[dict[str, object]]) -> str:
    """The Markdown table printed at the end (and pasted into the README)."""
    groups = [*GROUPS, *(g for g in EXTRA_GROUPS if any(r[f"cpu_{g}"] is not None for r in rows))]
    names = [_group_name(g) for g in groups]
    head = ("| scenario | sink | msg/s | x ceiling | x naive | CPU us/msg " + " | ".join(names)
            + " | peak RSS MiB " + " | ".join(names) + " |")
    lines = [head, "|" + "---|" * (5 + 2 * len(groups))]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['sink']} | {_fmt(r['rate'])} | {_fmt(r['ratio'], 2)} "
            f"| {_fmt(r['vs_naive'], 1)} "
            + "".join(f"| {_fmt(r[f'cpu_{g}'])} " for g in groups)
            + "".join(f"| {_fmt(r[f'rss_{g}'])} " for g in groups)
            + "|"
        )
    return "\n".join(lines)


def _group_name(group: str) -> str:
    return {"api": "API", "redis": "Redis", "postgresql": "PostgreSQL"}.get(group, group)


def deployment_summary(results: list[Measurement], sink: str, database: str = "",
                       describe: str = "") -> str:
    """The default deployment on one database next to the blast and the naive peer.

    The blast and the naive peer use no database: each database's runs are divided by the
    blast and naive peer of the same run index.
    """
    runs: dict[str, list[Measurement]] = {}
    for m in results:
        if m.sink == sink and (m.database == database or not m.scenario.startswith("deploy")):
            runs.setdefault(m.scenario, []).append(m)
    blasts, naives = runs.get("raw blast", []), runs.get("naive peer", [])
    signeds = runs.get("signed blast", [])
    lines = [f"Default deployment (Procfile web, worker, scheduler as shipped; DKIM on), "
             f"{sink} sink" + (f", on {database}" if database else "")
             + "; medians over runs, ratios within each run:"]
    if describe:
        lines.append(f"  database: {describe}")
    for name in ("raw blast", "signed blast", "naive peer", "deployment: single sends",
                 "deployment: campaign", "deployment: 50 % load"):
        mine = runs.get(name, [])
        if not mine:
            continue
        ratio = [m.rate / b.rate for m, b in zip(mine, blasts, strict=False)]
        naive = [m.rate / n.rate for m, n in zip(mine, naives, strict=False)]
        cpu = ", ".join(
            f"{g} {_median(values):,.0f}" for g in (*GROUPS, *EXTRA_GROUPS)
            if (values := [c for m in mine if (c := m.cpu_us(g)) is not None])
        )
        line = f"  {name:<26} {_median([m.rate for m in mine]):>8,.0f} msg/s"
        if ratio and name != "raw blast":
            line += f"  {_median(ratio):.2f}x blast{_spread(ratio, '.2f')}"
        if naive and name != "naive peer":
            line += f"  {_median(naive):.1f}x naive{_spread(naive, '.1f')}"
        signed = [m.rate / b.rate for m, b in zip(mine, signeds, strict=False)]
        if signed and name.startswith("deployment"):
            line += f"  {_median(signed):.2f}x signed blast"
        lines.append(line)
        if name.startswith("deployment"):
            lines.append(f"  {'':<26} CPU us/msg: {cpu}")
        latency = [m.latency for m in mine if m.latency]
        if latency:
            lines.append(
                f"  {'':<26} latency 202 -> 250 at {_median([x['offered'] for x in latency]):,.0f}"
                f" msg/s offered: p50 {_median([x['p50_ms'] for x in latency]):,.1f} ms, "
                f"p99 {_median([x['p99_ms'] for x in latency]):,.1f} ms"
                + (f"; from the request: p50 "
                   f"{_median([x['request_p50_ms'] for x in latency]):,.1f} ms, p99 "
                   f"{_median([x['request_p99_ms'] for x in latency]):,.1f} ms"
                   if all("request_p50_ms" in x for x in latency) else "")
            )
    return "\n".join(lines)


def campaign_rows(quick: bool, database: str, log: Path) -> str | None:
    """Run the campaign fan-out benchmark when campaigns have landed; return its output."""
    if not CAMPAIGN_SCRIPT.exists() or not (ROOT / "mailer" / "campaigns" / "tick.py").exists():
        return None
    argv = [python(), str(CAMPAIGN_SCRIPT), "--database", database,
            "--timeout", str(FANOUT_TIMEOUT - 60), *(["--quick"] if quick else [])]
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=FANOUT_TIMEOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    except subprocess.TimeoutExpired:
        return f"campaign fan-out benchmark on {database} timed out after {FANOUT_TIMEOUT} s"
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return (f"campaign fan-out benchmark on {database} failed (exit {done.returncode}); "
                f"see {log}")
    return done.stdout.strip()


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="one short run per scenario (about a minute)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=10_000,
                        help="messages per pipeline and blast run")
    parser.add_argument("--naive-messages", type=int, default=4_000)
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker process")
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--pool-size", type=int, default=16,
                        help="SMTP connections per worker process (and per blaster)")
    parser.add_argument("--batch", type=int, default=500, help="messages per API request")
    parser.add_argument("--clients", type=int, default=2, help="concurrent API clients")
    parser.add_argument("--sinks", default="fast,aiosmtpd",
                        help="comma-separated: fast, aiosmtpd")
    parser.add_argument("--databases", default=",".join(DATABASES),
                        help="comma-separated: sqlite, postgresql (a private cluster): what "
                             "the deployment scenario and the fan-out run on")
    parser.add_argument("--scenarios", default="blast,pipeline,campaign,naive,deployment",
                        help="comma-separated: blast, signed (the blast, DKIM-signing each "
                             "message as it sends), pipeline, campaign, naive, deployment "
                             "(the Procfile as shipped, on the first sink; adds blast, signed "
                             "and naive there); also drain (workers alone) and fanout "
                             "(bench/campaign_fanout.py)")
    parser.add_argument("--blast-uvloop", action="store_true",
                        help="run the blast on uvloop instead of the asyncio loop")
    parser.add_argument("--no-wait-quiet", action="store_true",
                        help="start each run at once, even while other processes are busy")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--timeline", action="store_true",
                        help="print the pipeline's per-stage CPU and sink rate every 0.5 s")
    parser.add_argument("--profile", type=Path,
                        help="sample the pipeline's worker and API with py-spy into this folder")
    parser.add_argument("--profile-mode", choices=("gil", "wall"), default="gil",
                        help="gil: where CPU goes; wall: what every thread waits for")
    args = parser.parse_args(argv)
    args.databases = [d for d in args.databases.split(",") if d]
    unknown = sorted(set(args.databases) - set(DATABASES))
    if unknown or not args.databases:
        parser.error(f"--databases: choose among {', '.join(DATABASES)} (got {unknown})")
    if args.quick:
        args.runs, args.messages, args.naive_messages = 1, 3_000, 1_500
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything and print the table."""
    args = parse(argv)
    sinks = [s for s in args.sinks.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="mailer-bench-"))
    print(f"machine: {machine()}", flush=True)
    results: list[Measurement] = []
    started = time.monotonic()
    server = RedisServer(directory=work / "redis")
    databases: dict[str, deployment.Database] = {}
    stack = contextlib.ExitStack()
    try:
        server.start()
        if "deployment" in scenarios and sinks:
            databases = {name: deployment.database(name, stack) for name in args.databases}
        cfg = Config(messages=args.messages, naive_messages=args.naive_messages,
                     processes=args.processes, threads=args.threads, pool_size=args.pool_size,
                     api_workers=args.api_workers,
                     batch=args.batch, clients=args.clients, redis_url=server.url,
                     redis_pid=server.pid, work=work, profile=args.profile,
                     profile_mode=args.profile_mode,
                     timeline=args.timeline)
        client = redis.Redis.from_url(server.url)
        plan: list[tuple[str, str, Callable[[Config, str, int],
                                             Measurement | list[Measurement]]]] = []
        if "deployment" in scenarios and sinks:
            # Its summary compares with the blast and the naive peer of the same run.
            scenarios += [s for s in ("blast", "signed", "naive") if s not in scenarios]
        for sink in sinks:
            if "blast" in scenarios:
                plan.append(("raw blast", sink, lambda c, s, i: peers.blast(
                    c, s, i, uvloop=args.blast_uvloop)))
            if "signed" in scenarios:
                plan.append(("signed blast", sink, lambda c, s, i: peers.blast(
                    c, s, i, uvloop=args.blast_uvloop, signed=True)))
            if "pipeline" in scenarios:
                plan.append(("pipeline", sink, pipeline.run))
            if "drain" in scenarios:
                plan.append(("worker drain", sink, pipeline.drain))
            if "campaign" in scenarios:
                plan.append(("campaign", sink, campaign.run))
            if "naive" in scenarios and sink in ("fast", sinks[0]):
                plan.append(("naive peer", sink, peers.naive))
            if "deployment" in scenarios and sink == sinks[0]:
                for database in databases.values():
                    plan.append(("deployment", sink,
                                 functools.partial(deployment.run, database=database)))
        for index in range(args.runs):
            for _name, sink, scenario in plan:
                client.flushall()
                if not args.no_wait_quiet:
                    wait_quiet()
                outcome = scenario(replace(cfg), sink, index)
                for m in outcome if isinstance(outcome, list) else [outcome]:
                    results.append(m)
                    print(f"run {index + 1}/{args.runs} {_label(m.scenario, m.database):<12} "
                          f"{sink:<8} "
                          f"{m.delivered:>6} msgs in {m.seconds:6.2f} s = {m.rate:7.0f} msg/s "
                          f"(other load {m.background:.2f} cores)", flush=True)
        client.close()
    except BenchError as exc:
        print(f"benchmark failed: {exc}\n(work files kept in {work})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        stack.close()  # the PostgreSQL cluster, if one was started
        server.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = summarise(results, args.runs)
    if rows:  # none when only the fan-out ran
        print()
        print(f"Medians of {args.runs} run(s); {args.messages} messages per pipeline/blast run, "
              f"{args.naive_messages} per naive run; {args.processes} worker processes x "
              f"{args.threads} threads, SMTP pool {args.pool_size} per process, "
              f"{args.api_workers} API processes; "
              f"{time.monotonic() - started:.0f} s in all.")
        print(table(rows))
        notes = sorted({f"{r['scenario']}: {r['note']}" for r in rows if r["note"]})
        for note in notes:
            print(f"  {note}")
    for name, database in databases.items():
        print()
        print(deployment_summary(results, sinks[0], name, database.describe))
    loaded = max((float(str(r["background"])) for r in rows), default=0.0)
    if loaded > BACKGROUND_WARN:
        print(f"  WARNING: other processes used up to {loaded:.2f} cores during a run; "
              "the figures understate this machine.")
    if "fanout" in scenarios:
        for name in args.databases:
            output = campaign_rows(args.quick, name,
                                   work.parent / f"{work.name}-campaign-{name}.log")
            print(output if output
                  else "campaign fan-out: not available (mailer/campaigns/tick.py)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows,
                                         "runs": [asdict(m) for m in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
