"""Settings read once from the ``MAILER_*`` environment variables (SPEC section 10)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from mailer.errors import ConfigError

#: The project root, where the shipped ``templates/`` folder lives.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Used only when ``MAILER_ENV`` is ``development`` or ``test`` and no key is set.
DEVELOPMENT_SECRET_KEY = "development-only-secret-key-do-not-use-in-production"  # noqa: S105

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``2m``, ``1h``, ``7d`` (a bare number is seconds)."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"not a duration: {text!r} (write it like 30s, 2m, 1h, 7d)")
    number, unit = match.groups()
    return timedelta(seconds=int(number) * _UNITS[unit or "s"])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    """Typed configuration; build it with :meth:`from_environ`."""

    database_url: str = "sqlite:///var/mailer.store.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_security: str = "none"
    smtp_pool_size: int = 8
    smtp_timeout: float = 30.0
    public_url: str = "http://127.0.0.1:8000"
    secret_key: str = DEVELOPMENT_SECRET_KEY
    old_secret_keys: tuple[str, ...] = ()
    mail_from: str = "Mailer <no-reply@example.com>"
    reply_to: str | None = None
    postal_address: str | None = None
    policy_version: str = "1"
    service_alert_limit: int = 3
    service_alert_window: timedelta = timedelta(days=7)
    soft_bounce_limit: int = 3
    soft_bounce_window: timedelta = timedelta(days=7)
    templates_dir: Path = PROJECT_ROOT / "templates"
    send_lease: timedelta = timedelta(minutes=2)
    sweep_interval: timedelta = timedelta(seconds=30)
    campaign_max_lateness: timedelta = timedelta(hours=1)
    max_attempts: int = 8
    retry_base: timedelta = timedelta(seconds=30)
    sink_dir: Path = Path("var/sink")
    env: str = "production"
    webhooks: Mapping[str, str] = field(default_factory=dict)
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_private_key_file: str | None = None

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, require_secret: bool = True
    ) -> Settings:
        """Read every ``MAILER_*`` variable once; raise :class:`ConfigError` on bad values.

        ``require_secret=False`` is for commands that never sign or hash with the key
        (migrations, API key creation): they run without it outside development too.
        """
        env = os.environ if environ is None else environ

        def get(name: str, default: str | None = None) -> str | None:
            value = env.get(f"MAILER_{name}")
            return default if value is None or value == "" else value

        def get_int(name: str, default: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"MAILER_{name} must be a whole number, not {raw!r}") from None

        def get_duration(name: str, default: timedelta) -> timedelta:
            raw = get(name)
            return default if raw is None else parse_duration(raw)

        mode = (get("ENV", "production") or "production").lower()
        secret = get("SECRET_KEY")
        if secret is None:
            if mode not in ("development", "test") and require_secret:
                raise ConfigError(
                    "MAILER_SECRET_KEY is required outside development "
                    "(set MAILER_ENV=development to use a throw-away key)"
                )
            secret = DEVELOPMENT_SECRET_KEY
        old_keys = tuple(k for k in (get("OLD_SECRET_KEYS", "") or "").split(",") if k)

        smtp_host = get("SMTP_HOST", "127.0.0.1") or "127.0.0.1"
        security = (get("SMTP_SECURITY") or ("none" if _is_loopback(smtp_host) else "starttls"))
        if security not in ("none", "starttls", "tls"):
            raise ConfigError("MAILER_SMTP_SECURITY must be none, starttls or tls")

        webhooks = {
            key[len("MAILER_"):].lower(): value
            for key, value in env.items()
            if key.startswith(
                ("MAILER_SES_", "MAILER_SNS_", "MAILER_SENDGRID_", "MAILER_MAILGUN_",
                 "MAILER_POSTMARK_", "MAILER_DSN_")
            ) and value
        }
        return cls(
            database_url=get("DATABASE_URL", cls.database_url) or cls.database_url,
            redis_url=get("REDIS_URL", cls.redis_url) or cls.redis_url,
            smtp_host=smtp_host,
            smtp_port=get_int("SMTP_PORT", 1025),
            smtp_username=get("SMTP_USERNAME"),
            smtp_password=get("SMTP_PASSWORD"),
            smtp_security=security,
            smtp_pool_size=get_int("SMTP_POOL_SIZE", 8),
            smtp_timeout=get_duration("SMTP_TIMEOUT", timedelta(seconds=30)).total_seconds(),
            public_url=(get("PUBLIC_URL", cls.public_url) or cls.public_url).rstrip("/"),
            secret_key=secret,
            old_secret_keys=old_keys,
            mail_from=get("FROM", cls.mail_from) or cls.mail_from,
            reply_to=get("REPLY_TO"),
            postal_address=get("POSTAL_ADDRESS"),
            policy_version=get("POLICY_VERSION", "1") or "1",
            service_alert_limit=get_int("SERVICE_ALERT_LIMIT", 3),
            service_alert_window=get_duration("SERVICE_ALERT_WINDOW", timedelta(days=7)),
            soft_bounce_limit=get_int("SOFT_BOUNCE_LIMIT", 3),
            soft_bounce_window=get_duration("SOFT_BOUNCE_WINDOW", timedelta(days=7)),
            templates_dir=Path(get("TEMPLATES_DIR") or PROJECT_ROOT / "templates"),
            send_lease=get_duration("SEND_LEASE", timedelta(minutes=2)),
            sweep_interval=get_duration("SWEEP_INTERVAL", timedelta(seconds=30)),
            campaign_max_lateness=get_duration("CAMPAIGN_MAX_LATENESS", timedelta(hours=1)),
            max_attempts=get_int("MAX_ATTEMPTS", 8),
            retry_base=get_duration("RETRY_BASE", timedelta(seconds=30)),
            sink_dir=Path(get("SINK_DIR", "var/sink") or "var/sink"),
            env=mode,
            webhooks=webhooks,
            dkim_domain=get("DKIM_DOMAIN"),
            dkim_selector=get("DKIM_SELECTOR"),
            dkim_private_key_file=get("DKIM_PRIVATE_KEY_FILE"),
        )
