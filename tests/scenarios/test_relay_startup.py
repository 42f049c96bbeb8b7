"""Every process checks its whole configuration at start-up (SPEC 6, 10, 11).

A bad setting must stop the API, the worker and the scheduler at once, with exit status 2
and one line on stderr, instead of failing messages one by one later. The entry points run
as real subprocesses, exactly as the Procfile starts them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailer.config import Settings, check
from mailer.errors import ConfigError
from tests.conftest import ROOT
from tests.services import free_port

GOOD = {
    "MAILER_ENV": "test",
    "MAILER_SECRET_KEY": "test-secret-key-0123456789abcdef",
    "MAILER_FROM": "Example <no-reply@news.example.test>",
    # Nothing listens here: a process that wrongly starts must not reach real services.
    "MAILER_REDIS_URL": "redis://127.0.0.1:1/0",
    "MAILER_DATABASE_URL": "sqlite:////nonexistent/never-opened.db",
}


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048-bit RSA private key file for DKIM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("dkim") / "dkim.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _dkim(key: Path, domain: str, **extra: str) -> dict[str, str]:
    return {"MAILER_DKIM_DOMAIN": domain, "MAILER_DKIM_SELECTOR": "s1",
            "MAILER_DKIM_PRIVATE_KEY_FILE": str(key), **extra}


def _problem(env: dict[str, str]) -> str | None:
    try:
        check(Settings.from_environ({**GOOD, **env}))
    except ConfigError as exc:
        return str(exc)
    return None


# -- the checks, one by one ------------------------------------------------------------


def test_a_good_configuration_passes(dkim_key: Path) -> None:
    # Given a From domain, DKIM for its parent domain, pace limits and a CA file
    env = _dkim(dkim_key, "example.test", MAILER_SMTP_MAX_RATE="14",
                MAILER_DOMAIN_LIMITS="gmail.com=20/s:5,*=100/s:20",
                MAILER_SMTP_CA_FILE="/etc/ssl/certs/ca-certificates.crt")
    # Then nothing is wrong (relaxed DMARC alignment: d= may be a parent of the From domain)
    assert _problem(env) is None
    assert _problem(_dkim(dkim_key, "NEWS.Example.test")) is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MAILER_FROM": "not an address"}, "MAILER_FROM"),
        ({"MAILER_REPLY_TO": "Support <support@>"}, "MAILER_REPLY_TO"),
        ({"MAILER_RETURN_PATH": "bounces@"}, "MAILER_RETURN_PATH"),
        ({"MAILER_SEND_LEASE": "two minutes"}, "not a duration"),
        ({"MAILER_SEND_LEASE": "0s"}, "MAILER_SEND_LEASE must be longer than 0"),
        ({"MAILER_SMTP_POOL_SIZE": "0"}, "MAILER_SMTP_POOL_SIZE must be at least 1"),
        ({"MAILER_SMTP_PORT": "70000"}, "MAILER_SMTP_PORT"),
        ({"MAILER_SMTP_MAX_RATE": "fast"}, "MAILER_SMTP_MAX_RATE"),
        ({"MAILER_DOMAIN_LIMITS": "gmail.com=20"}, "MAILER_DOMAIN_LIMITS"),
        ({"MAILER_SMTP_HELO_NAME": "localhost"}, "MAILER_SMTP_HELO_NAME"),
        ({"MAILER_SMTP_CA_FILE": "/nonexistent/ca.pem"}, "MAILER_SMTP_CA_FILE"),
        ({"MAILER_SMTP_CA_FILE": "/etc/hostname"}, "no readable PEM certificate"),
        ({"MAILER_DKIM_ALLOW_UNALIGNED": "maybe"}, "MAILER_DKIM_ALLOW_UNALIGNED"),
        ({"MAILER_PUBLIC_URL": "mail.example.test"}, "MAILER_PUBLIC_URL"),
    ],
)
def test_each_bad_setting_is_named(env: dict[str, str], expected: str) -> None:
    # Given one bad setting, when the configuration is checked, then the error names it
    problem = _problem(env)
    assert problem is not None and expected in problem, problem


def test_dkim_must_be_aligned_with_the_from_domain_unless_allowed(dkim_key: Path) -> None:
    # Given DKIM for a domain that is neither the From domain nor a parent of it
    for domain in ("other.example", "mail.news.example.test", "test", "xample.test"):
        problem = _problem(_dkim(dkim_key, domain))
        # Then start-up is refused with the DMARC reason
        assert problem is not None and "not aligned" in problem, (domain, problem)
    # And MAILER_DKIM_ALLOW_UNALIGNED=true lets it start
    assert _problem(_dkim(dkim_key, "other.example",
                          MAILER_DKIM_ALLOW_UNALIGNED="true")) is None


def test_an_unreadable_dkim_key_is_refused(tmp_path: Path) -> None:
    assert "MAILER_DKIM_PRIVATE_KEY_FILE" in (_problem(_dkim(tmp_path / "missing.pem",
                                                             "example.test")) or "")
    (tmp_path / "junk.pem").write_text("not a key")
    assert "not an unencrypted PEM key" in (_problem(_dkim(tmp_path / "junk.pem",
                                                           "example.test")) or "")


# -- the real entry points -------------------------------------------------------------


def _run(command: list[str], env: dict[str, str], shell: bool = False) -> tuple[int, str]:
    full = {**os.environ, **GOOD, **env, "PYTHONPATH": str(ROOT),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    for name in ("MAILER_SMTP_HELO_NAME", "MAILER_DKIM_DOMAIN"):
        if name not in env:
            full.pop(name, None)
    done = subprocess.run(command if not shell else " ".join(command), cwd=ROOT, env=full,
                          shell=shell, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stderr


def _procfile(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in the Procfile")


ENTRY_POINTS = {
    "uvicorn factory": [sys.executable, "-m", "uvicorn", "--factory",
                        "mailer.api.app:create_app", "--port", "0"],
    "dramatiq worker": [sys.executable, "-m", "dramatiq", "workers.actors", "--processes", "1",
                        "--threads", "1"],
    "scheduler": [sys.executable, "-m", "workers.scheduler"],
    "inbound listener": [sys.executable, "-m", "mailer.cli", "inbound"],
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_process_refuses_an_unaligned_dkim_domain(entry: str, dkim_key: Path) -> None:
    # Given DKIM for a domain not aligned with MAILER_FROM
    env = _dkim(dkim_key, "other.example")
    # When the process starts
    code, stderr = _run(ENTRY_POINTS[entry], env)
    # Then it exits 2 with one line naming the problem, and no traceback
    assert code == 2, stderr
    lines = [x for x in stderr.splitlines() if x.startswith("mailer:")]
    assert lines and set(lines) == {lines[0]}, stderr
    assert "MAILER_DKIM_DOMAIN 'other.example' is not aligned" in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("entry", "env", "expected"),
    [
        ("scheduler", {"MAILER_DOMAIN_LIMITS": "gmail.com=fast"}, "MAILER_DOMAIN_LIMITS"),
        ("dramatiq worker", {"MAILER_SMTP_CA_FILE": "/nonexistent/ca.pem"},
         "MAILER_SMTP_CA_FILE"),
        ("uvicorn factory", {"MAILER_FROM": "Mailer <no-reply@>"}, "MAILER_FROM"),
    ],
)
def test_other_bad_settings_stop_the_process_too(
    entry: str, env: dict[str, str], expected: str
) -> None:
    code, stderr = _run(ENTRY_POINTS[entry], env)
    assert code == 2, stderr
    [line] = {x for x in stderr.splitlines() if x.startswith("mailer:")}
    assert expected in line and "Traceback" not in stderr


def test_the_procfile_web_line_stops_even_with_several_uvicorn_workers(dkim_key: Path) -> None:
    # Given the Procfile's web command with WEB_CONCURRENCY=2 (uvicorn's supervisor would
    # restart failing workers for ever) and a bad setting
    env = {**_dkim(dkim_key, "other.example"), "WEB_CONCURRENCY": "2",
           "PORT": str(free_port())}
    # When it starts
    code, stderr = _run([_procfile("web")], env, shell=True)
    # Then it exits 2 with the one line, before uvicorn starts at all
    assert code == 2, stderr
    assert stderr.strip().count("\n") == 0 and "not aligned" in stderr
