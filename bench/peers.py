"""The reference scenarios: the raw aiosmtplib blast (ceiling), the same blast signing every
message with DKIM as it sends (the ceiling with DKIM on), and the naive peer."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.procs import Group, Proc, python, wait_until
from bench.stack import Config, Measurement, Sink, Window

_BENCH = Path(__file__).resolve().parent


def dkim_key(path: Path) -> None:
    """Write a fresh RSA-2048 key (PKCS#8 PEM), as a user's DKIM key would be."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def blast(cfg: Config, sink_kind: str, index: int, *, uvloop: bool = False,
          signed: bool = False) -> Measurement:
    """Pre-built messages from ``cfg.processes`` blasters x ``cfg.pool_size`` connections.

    ``signed``: each blaster also DKIM-signs every message (RSA-2048) as it sends it.
    """
    name = "signed blast" if signed else "raw blast"
    work = cfg.work / f"{name.replace(' ', '-')}-{sink_kind}-{index}"
    work.mkdir(parents=True)
    sink = Sink(sink_kind, work)
    go = work / "go"
    key = work / "dkim.pem"
    if signed:
        dkim_key(key)
    blasters: list[Proc] = []
    readies: list[Path] = []
    try:
        share = -(-cfg.messages // cfg.processes)
        for p in range(cfg.processes):
            first, count = p * share, min(share, cfg.messages - p * share)
            ready = work / f"ready-{p}"
            readies.append(ready)
            argv = [python(), str(_BENCH / "blast.py"), "--port", str(sink.port),
                    "--first", str(first), "--count", str(count), "--label", f"b{index}",
                    "--connections", str(cfg.pool_size), "--ready", str(ready), "--go", str(go)]
            if uvloop:
                argv.append("--uvloop")
            if signed:
                argv += ["--dkim-key", str(key)]
            blasters.append(Proc(f"blaster {p}", argv, log=work / f"blast-{p}.log"))

        def check() -> None:
            for b in blasters:
                if b.popen.poll() not in (None, 0):
                    b.check()

        def all_ready() -> bool:
            check()
            return all(r.exists() for r in readies)

        wait_until("blasters ready", all_ready, cfg.timeout)
        window = Window({"worker": Group("worker", [b.pid for b in blasters]),
                         "redis": Group("redis", [cfg.redis_pid]),
                         "sink": Group("sink", [sink.proc.pid]),
                         "client": Group("client", [os.getpid()], tree=False)})
        go.write_text("go\n")
        start = time.monotonic()
        last = sink.wait_for(cfg.messages, cfg.timeout, check)
        cpu, rss = window.close()
        loop = "uvloop" if uvloop else "asyncio"
        note = f"{cfg.processes} proc x {cfg.pool_size} conns, {loop}"
        if signed:
            note += ", DKIM rsa-sha256 signed at send time"
        return Measurement(name, sink_kind, cfg.messages, last - start, cpu, rss, note=note,
                           background=window.background)
    finally:
        for b in blasters:
            b.stop()
        sink.stop()


def naive(cfg: Config, sink_kind: str, index: int) -> Measurement:
    """One queue message per email; render + EmailMessage + send_message per send."""
    work = cfg.work / f"naive-{sink_kind}-{index}"
    work.mkdir(parents=True)
    sink = Sink(sink_kind, work)
    env = {"BENCH_REDIS_URL": cfg.redis_url, "BENCH_SMTP_PORT": str(sink.port)}
    procs: list[Proc] = []
    try:
        worker = Proc("naive worker", [python(), "-m", "dramatiq", "bench.naive_peer",
                                       "--processes", str(cfg.processes),
                                       "--threads", str(cfg.threads)],
                      env, log=work / "worker.log")
        procs.append(worker)
        warm = Proc("naive warm-up producer",
                    [python(), "-m", "bench.naive_peer", "produce", "--label", f"nw{index}",
                     "--count", str(cfg.warmup)], env, log=work / "warm.log")
        procs.append(warm)
        sink.wait_for(cfg.warmup, cfg.timeout, worker.check)
        ready, go = work / "ready", work / "go"
        producer = Proc("naive producer",
                        [python(), "-m", "bench.naive_peer", "produce", "--label", f"n{index}",
                         "--count", str(cfg.naive_messages), "--ready", str(ready),
                         "--go", str(go)], env, log=work / "producer.log")
        procs.append(producer)

        def check() -> None:
            worker.check()
            if producer.popen.poll() not in (None, 0):
                producer.check()

        def producer_ready() -> bool:
            check()
            return ready.exists()

        wait_until("naive producer ready", producer_ready, cfg.timeout)
        window = Window({"worker": Group("worker", [worker.pid]),
                         "api": Group("producer", [producer.pid]),
                         "redis": Group("redis", [cfg.redis_pid]),
                         "sink": Group("sink", [sink.proc.pid]),
                         "client": Group("client", [os.getpid()], tree=False)})
        go.write_text("go\n")
        start = time.monotonic()
        last = sink.wait_for(cfg.warmup + cfg.naive_messages, cfg.timeout, check)
        cpu, rss = window.close()
        return Measurement("naive peer", sink_kind, cfg.naive_messages, last - start, cpu, rss,
                           note="1 email per queue message, EmailMessage",
                           background=window.background)
    finally:
        for proc in reversed(procs):
            proc.stop()
        sink.stop()
