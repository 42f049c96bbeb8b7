"""Settings read once from the ``MAILER_*`` environment variables (SPEC section 10)."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from mailer.errors import ConfigError
from mailer.smtp.limits import DomainLimit, parse_domain_limits, parse_max_rate

#: The project root, where the shipped ``templates/`` folder lives.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Used only when ``MAILER_ENV`` is ``development`` or ``test`` and no key is set.
DEVELOPMENT_SECRET_KEY = "development-only-secret-key-do-not-use-in-production"  # noqa: S105

#: URL schemes of the brokers dramatiq can use here (SPEC 10).
BROKER_SCHEMES = ("redis://", "rediss://", "unix://", "amqp://", "amqps://")

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

    database_url: str = "sqlite:///var/mailer.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: SPEC 10: the dramatiq broker, ``redis://`` or ``amqp://`` (RabbitMQ); empty means
    #: ``redis_url``. Redis stays required besides it (pacing, metrics, key use).
    broker_url: str = ""
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
    #: SPEC 14: the language of templates' default versions (a BCP 47 tag).
    default_locale: str = "en"
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
    #: ``mailer dev``: the loopback port of the sink's web view of captured mail.
    sink_view_port: int = 8025
    env: str = "production"
    webhooks: Mapping[str, str] = field(default_factory=dict)
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_private_key_file: str | None = None
    #: SPEC 6: sign with a DKIM domain not aligned with the From domain anyway.
    dkim_allow_unaligned: bool = False
    #: An additional Ed25519 signature (RFC 8463) beside the RSA one, when both are set.
    dkim_ed25519_selector: str | None = None
    dkim_ed25519_private_key_file: str | None = None
    #: RFC 2920 pipelining with relays that offer it; off only for a relay that mishandles it.
    smtp_pipelining: bool = True
    #: SPEC 6: the EHLO name; None means helo.helo_name's default (never localhost).
    smtp_helo_name: str | None = None
    #: Extra CA certificates (PEM) trusted for the relay's TLS, besides the system store.
    smtp_ca_file: str | None = None
    #: SPEC 5: messages per second across all workers; None is unlimited.
    smtp_max_rate: float | None = None
    #: SPEC 5: per recipient domain rate and concurrency (``MAILER_DOMAIN_LIMITS``).
    domain_limits: Mapping[str, DomainLimit] = field(default_factory=dict)
    #: SPEC 12: the domain of ``mailer inbound`` (VERP bounces, ``mailto:`` unsubscribe).
    inbound_domain: str | None = None
    inbound_host: str = "127.0.0.1"
    inbound_port: int = 2525
    #: SPEC 12: ``imap(s)://user:pass@host[:port]/folder[?delete=true]`` to poll.
    bounce_imap_url: str | None = None
    bounce_poll_interval: timedelta = timedelta(minutes=1)
    #: SPEC 6: the envelope sender when VERP is off (else the From address).
    return_path: str | None = None
    #: Where mail to ``postmaster@`` the inbound domain is kept for a person (a Maildir).
    postmaster_dir: Path = Path("var/postmaster")
    #: SPEC 7: the bearer token ``/metrics`` requires; None leaves it open.
    metrics_token: str | None = None
    #: SPEC 13: let outbound event webhooks target loopback and private addresses.
    webhook_allow_private: bool = False
    #: SPEC 13: first retry delay of a failing event webhook endpoint (doubles per failure).
    webhook_retry_base: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        if not self.broker_url:
            # Frozen: the default is filled in once, here, so every reader sees one URL.
            object.__setattr__(self, "broker_url", self.redis_url)

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
            broker_url=get("BROKER_URL", "") or "",
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
            default_locale=get("DEFAULT_LOCALE", "en") or "en",
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
            sink_view_port=get_int("SINK_VIEW_PORT", 8025),
            env=mode,
            webhooks=webhooks,
            dkim_domain=get("DKIM_DOMAIN"),
            dkim_selector=get("DKIM_SELECTOR"),
            dkim_private_key_file=get("DKIM_PRIVATE_KEY_FILE"),
            dkim_allow_unaligned=_flag("DKIM_ALLOW_UNALIGNED", get("DKIM_ALLOW_UNALIGNED")),
            dkim_ed25519_selector=get("DKIM_ED25519_SELECTOR"),
            dkim_ed25519_private_key_file=get("DKIM_ED25519_PRIVATE_KEY_FILE"),
            smtp_pipelining=_flag("SMTP_PIPELINING", get("SMTP_PIPELINING", "true")),
            smtp_helo_name=get("SMTP_HELO_NAME"),
            smtp_ca_file=get("SMTP_CA_FILE"),
            smtp_max_rate=parse_max_rate(get("SMTP_MAX_RATE")),
            domain_limits=parse_domain_limits(get("DOMAIN_LIMITS")),
            inbound_domain=_inbound_domain(get("INBOUND_DOMAIN")),
            inbound_host=get("INBOUND_HOST", "127.0.0.1") or "127.0.0.1",
            inbound_port=get_int("INBOUND_PORT", 2525),
            bounce_imap_url=_imap_url(get("BOUNCE_IMAP_URL")),
            bounce_poll_interval=get_duration("BOUNCE_POLL_INTERVAL", timedelta(minutes=1)),
            return_path=_return_path(get("RETURN_PATH")),
            postmaster_dir=Path(get("POSTMASTER_DIR", "var/postmaster") or "var/postmaster"),
            metrics_token=get("METRICS_TOKEN"),
            webhook_allow_private=_flag("WEBHOOK_ALLOW_PRIVATE", get("WEBHOOK_ALLOW_PRIVATE")),
            webhook_retry_base=get_duration("WEBHOOK_RETRY_BASE", timedelta(seconds=30)),
        )


_DOMAIN = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_MAILBOX = re.compile(r"^[^\s@<>]{1,64}@[^\s@<>]{1,253}$")


def _inbound_domain(raw: str | None) -> str | None:
    """``MAILER_INBOUND_DOMAIN``, lower-cased; a bad one stops the process (SPEC 6)."""
    if raw is None:
        return None
    domain = raw.strip().rstrip(".").lower()
    if not _DOMAIN.match(domain):
        raise ConfigError(f"MAILER_INBOUND_DOMAIN is not a domain name: {raw!r}")
    return domain


def _return_path(raw: str | None) -> str | None:
    """``MAILER_RETURN_PATH``: a bare address (it goes into MAIL FROM as it is)."""
    if raw is None:
        return None
    address = raw.strip().strip("<>").strip()
    if not _MAILBOX.match(address):
        raise ConfigError("MAILER_RETURN_PATH must be a bare address like bounces@example.com")
    return address


def _imap_url(raw: str | None) -> str | None:
    """``MAILER_BOUNCE_IMAP_URL``, checked at start-up (SPEC 6: a bad setting stops us)."""
    if raw is None:
        return None
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ConfigError("MAILER_BOUNCE_IMAP_URL is not a valid URL") from None
    if parts.scheme not in ("imap", "imaps") or not parts.hostname:
        raise ConfigError("MAILER_BOUNCE_IMAP_URL must be imap://user:pass@host/folder "
                          "or imaps://...")
    if not parts.username or parts.password is None:
        raise ConfigError("MAILER_BOUNCE_IMAP_URL must name a user and a password")
    del port
    return raw


def _flag(name: str, raw: str | None) -> bool:
    """A boolean variable: true/false (also 1/0, yes/no); anything else stops the process."""
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"MAILER_{name} must be true or false, not {raw!r}")


def check(settings: Settings) -> None:
    """Check the whole configuration beyond parsing; raise :class:`ConfigError` on the first
    problem (SPEC 6: a bad setting stops the process instead of failing messages one by one).
    """
    # Imported here: these modules import this one.
    from mailer.mail.dkim import DkimSigner
    from mailer.mail.headers import parse_sender
    from mailer.smtp.helo import helo_name
    from mailer.smtp.pool import tls_context

    for name, value in (("FROM", settings.mail_from), ("REPLY_TO", settings.reply_to),
                        ("RETURN_PATH", settings.return_path)):
        if value is not None:
            try:
                parse_sender(value)
            except ConfigError as exc:
                raise ConfigError(f"MAILER_{name}: {exc}") from None
    if not re.fullmatch(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*", settings.default_locale):
        raise ConfigError(f"MAILER_DEFAULT_LOCALE {settings.default_locale!r} is not a "
                          "language tag (write it like en, de or pt-BR)")
    if not 0 < settings.smtp_port < 65536:
        raise ConfigError(f"MAILER_SMTP_PORT must be 1-65535, not {settings.smtp_port}")
    if not 0 < settings.sink_view_port < 65536:
        raise ConfigError(
            f"MAILER_SINK_VIEW_PORT must be 1-65535, not {settings.sink_view_port}")
    for name, number in (("SMTP_POOL_SIZE", settings.smtp_pool_size),
                         ("MAX_ATTEMPTS", settings.max_attempts)):
        if number < 1:
            raise ConfigError(f"MAILER_{name} must be at least 1, not {number}")
    for name, duration in (("SMTP_TIMEOUT", timedelta(seconds=settings.smtp_timeout)),
                           ("SEND_LEASE", settings.send_lease),
                           ("SWEEP_INTERVAL", settings.sweep_interval),
                           ("RETRY_BASE", settings.retry_base),
                           ("WEBHOOK_RETRY_BASE", settings.webhook_retry_base)):
        if duration <= timedelta(0):
            raise ConfigError(f"MAILER_{name} must be longer than 0")
    if not settings.broker_url.startswith(BROKER_SCHEMES):
        raise ConfigError("MAILER_BROKER_URL must be a redis:// (rediss://, unix://) or "
                          "amqp:// (amqps://) URL")
    if not settings.public_url.startswith(("https://", "http://")):
        raise ConfigError("MAILER_PUBLIC_URL must start with https:// (or http://)")
    if not settings.templates_dir.is_dir():
        raise ConfigError(f"MAILER_TEMPLATES_DIR {str(settings.templates_dir)!r} is not a folder")
    helo_name(settings.smtp_helo_name, settings.mail_from)
    tls_context(settings.smtp_ca_file)
    if DkimSigner.from_settings(settings) is not None:
        _check_alignment(settings, parse_sender(settings.mail_from)[1])


def _check_alignment(settings: Settings, from_address: str) -> None:
    """SPEC 6, DMARC (RFC 7489 section 3.1.1): ``d=`` must be the From domain or a parent."""
    signing = (settings.dkim_domain or "").lower().rstrip(".")
    sender = from_address.rpartition("@")[2].lower().rstrip(".")
    # A bare top-level domain ("com") is a parent of everything and nobody's own domain:
    # an organisational domain (RFC 7489 section 3.2) has at least two labels.
    if "." in signing and (sender == signing or sender.endswith("." + signing)):
        return
    if settings.dkim_allow_unaligned:
        return
    raise ConfigError(
        f"MAILER_DKIM_DOMAIN {signing!r} is not aligned with the From domain {sender!r} "
        "(DMARC would fail): use the From domain or a parent of it, or set "
        "MAILER_DKIM_ALLOW_UNALIGNED=true"
    )


def load_or_exit(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check the configuration at a process's start-up; on a problem, print one
    line to stderr and exit with status 2 (SPEC 6 and 11: every process checks at start)."""
    try:
        settings = Settings.from_environ(environ)
        check(settings)
    except ConfigError as exc:
        print(f"mailer: configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return settings


if __name__ == "__main__":
    # ``python -m mailer.config``: check the configuration and exit 0, or 2 with one line.
    # The Procfile's ``web`` runs it first, because uvicorn with several workers
    # (WEB_CONCURRENCY) restarts a worker that exits instead of stopping.
    load_or_exit()
