"""A real Postfix relay for tests, on a free loopback port, with its own config and queue.

:class:`PostfixRelay` runs Debian's Postfix as a private instance (``master -c DIR``):
its own ``main.cf``/``master.cf``, queue and data directories in a temp dir, one smtpd on
``127.0.0.1:<free port>`` and nothing on port 25. It refuses a non-FQDN EHLO name
(``reject_non_fqdn_helo_hostname``: 504 5.5.2 at RCPT, as production relays do), can offer
or require STARTTLS with a certificate from a private CA made here, and can require SMTP
AUTH. Accepted mail is relayed (``relayhost``) to an aiosmtpd sink on another free port,
so delivery is observable: :meth:`PostfixRelay.wait_delivered`.

SASL: Postfix has no password store of its own; it asks Cyrus SASL or Dovecot. We use
Dovecot's auth service (Debian package ``dovecot-core``) run as our own process with its
own ``base_dir`` and a ``passwd-file``, with no mail protocols at all: a plain file of
users, one socket Postfix talks to, no system-wide state. Cyrus would need ``sasl2-bin``
and a sasldb whose realm must match Postfix's host name.

Every process is started here and stopped by its PID; the temp dir is removed.
Needs root (Postfix's master must start as root to drop to the ``postfix`` user).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import grp
import ipaddress
import os
import pwd
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.services import (
    ContextService,
    ServiceError,
    free_port,
    pid_alive,
    require,
    stop_process,
    tail_of,
    user_exists,
)
from tests.smtp_servers import ReceivedMessage, Recorder, running_smtp_server

#: Debian's Postfix programs.
POSTFIX = "/usr/sbin/postfix"
POSTFIX_DAEMON_DIR = "/usr/lib/postfix/sbin"
#: Postfix's manifest of its files and directories, with owners and modes.
POSTFIX_FILES = "/etc/postfix/postfix-files"
#: Debian's Dovecot (package dovecot-core), for SMTP AUTH.
DOVECOT = "/usr/sbin/dovecot"
#: The host name our Postfix gives itself (never the sink's, or it sees a mail loop).
RELAY_HOSTNAME = "relay.mailer.test"
#: How long Postfix or Dovecot may take to come up, and to exit after SIGTERM.
DEFAULT_START_TIMEOUT = 20.0
DEFAULT_STOP_TIMEOUT = 10.0


def postfix_available() -> tuple[bool, str]:
    """Whether a private Postfix can run here, and if not, why."""
    if not (os.access(POSTFIX, os.X_OK) and os.access(f"{POSTFIX_DAEMON_DIR}/master", os.X_OK)):
        return False, "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return False, "postfix's master must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return False, "the postfix system user is missing"
    return True, ""


def dovecot_available() -> tuple[bool, str]:
    """Whether Dovecot's auth service (for SMTP AUTH) can run here, and if not, why."""
    if not os.access(DOVECOT, os.X_OK):
        return False, "dovecot is not installed (apt-get install dovecot-core)"
    for user in ("dovecot", "dovenull"):
        if not user_exists(user):
            return False, f"the {user} system user is missing"
    return True, ""


def require_postfix(auth: bool = False) -> None:
    """Fail (under CI=true) or skip the current test when Postfix (or Dovecot) is missing."""
    ok, why = postfix_available()
    require("postfix", ok, why)
    if auth:
        ok, why = dovecot_available()
        require("dovecot", ok, why)


class TestCA:
    """A private certificate authority and one server certificate for 127.0.0.1/localhost."""

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, directory: Path) -> None:
        """Create the CA and the server certificate as PEM files in ``directory``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailer test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost"),
                    x509.DNSName(RELAY_HOSTNAME),
                ]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.cert_file = directory / "server.pem"
        self.key_file = directory / "server.key"
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        # Postfix reads the key as root before it drops privileges: keep it private.
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ))

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts only this CA (and checks the host name)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


# One smtpd on our port and the internal services a relay needs; chroot off everywhere
# (our queue dir has no chroot jail), and no pickup/local: nothing is submitted or
# delivered locally. Columns: service type private unpriv chroot wakeup maxproc command.
_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixRelay(ContextService):
    """A private Postfix on 127.0.0.1 relaying to an aiosmtpd sink; stopped by PID."""

    def __init__(
        self,
        *,
        tls: bool = False,
        require_tls: bool = False,
        auth: bool = False,
        username: str = "mailer",
        password: str | None = None,
    ) -> None:
        """Prepare (not start) a relay: STARTTLS offered with ``tls`` (required with
        ``require_tls``), SMTP AUTH required for relaying with ``auth``."""
        self.tls = tls or require_tls
        self.require_tls = require_tls
        self.auth = auth
        self.username = username
        self.password = password if password is not None else secrets.token_urlsafe(12)
        self.host = "127.0.0.1"
        self.port = 0
        self.directory: Path | None = None
        self.ca: TestCA | None = None
        self.sink = Recorder()
        self.startup_seconds = 0.0
        self._stack = ExitStack()
        self._master: subprocess.Popen[bytes] | None = None
        self._dovecot: subprocess.Popen[bytes] | None = None

    # -- what tests use ------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """The private CA certificate (PEM) a client must trust for STARTTLS."""
        if self.ca is None:
            raise ServiceError("this relay was started without TLS")
        return self.ca.ca_file

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context trusting this relay's CA."""
        if self.ca is None:
            raise ServiceError("this relay was started without TLS")
        return self.ca.client_context()

    @property
    def master_pid(self) -> int:
        """The PID of Postfix's master process."""
        if self._master is None or self._master.poll() is not None:
            raise ServiceError("postfix is not running")
        return self._master.pid

    @property
    def dovecot_pid(self) -> int:
        """The PID of Dovecot's master process (relays with ``auth`` only)."""
        if self._dovecot is None or self._dovecot.poll() is not None:
            raise ServiceError("dovecot is not running")
        return self._dovecot.pid

    @property
    def delivered(self) -> list[ReceivedMessage]:
        """The messages Postfix has relayed to the sink so far."""
        return self.sink.messages

    def wait_delivered(self, count: int, timeout: float = 20.0) -> list[ReceivedMessage]:
        """Wait until the sink holds at least ``count`` messages; return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.sink.messages
            if len(messages) >= count:
                return messages
            time.sleep(0.05)
        raise AssertionError(
            f"{len(self.sink.messages)} of {count} messages reached the sink within "
            f"{timeout} s; postfix log:\n{self.log_tail()}"
        )

    def log_text(self) -> str:
        """Postfix's log (its ``maillog_file``)."""
        if self.directory is None:
            return ""
        try:
            return (self.directory / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of Postfix's log, for failure messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- start and stop ------------------------------------------------------------------

    def start(self) -> PostfixRelay:
        """Start the sink, Dovecot (with ``auth``) and Postfix; wait for the banner."""
        if self._master is not None:
            return self
        ok, why = postfix_available()
        if not ok:
            raise ServiceError(why)
        began = time.monotonic()
        try:
            self._start(began)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _start(self, began: float) -> None:
        _LIVE.append(self)  # stopped at exit even if the test run dies before close()
        # Postfix's unprivileged daemons must reach the queue and the Dovecot socket.
        directory = Path(tempfile.mkdtemp(prefix="mailer-postfix-", dir="/tmp"))
        directory.chmod(0o755)
        self.directory = directory
        _, sink_port, _ = self._stack.enter_context(running_smtp_server(self.sink))
        self.port = free_port()
        if self.tls:
            self.ca = TestCA(directory)
        if self.auth:
            self._start_dovecot(directory)
        config = directory / "etc"
        config.mkdir()
        (config / "main.cf").write_text(self._main_cf(directory, sink_port))
        (config / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        # Postfix re-reads a configuration file changed within the last 2 s until it has
        # settled (in 300 ms naps), in case an editor is still writing it: date ours back.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(config / name, (past, past))
        _make_queue(directory)
        # The master stays in the foreground without -w; it makes itself a session
        # leader, so its own SIGTERM to its process group never reaches pytest.
        self._master = subprocess.Popen(
            [f"{POSTFIX_DAEMON_DIR}/master", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "MAIL_CONFIG": str(config)},
        )
        self._wait_banner(began)

    def _main_cf(self, directory: Path, sink_port: int) -> str:
        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(directory / "queue"),
            "data_directory": str(directory / "data"),
            "maillog_file": str(directory / "maillog"),
            "maillog_file_prefixes": str(directory),
            "myhostname": RELAY_HOSTNAME,
            "mydomain": "mailer.test",
            "myorigin": "$myhostname",
            # Relay everything, deliver nothing locally.
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[127.0.0.1]:{sink_port}",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # What this relay is for: a client that greets with a non-FQDN name is refused
            # (504 5.5.2, at RCPT because smtpd_delay_reject defaults to yes).
            "smtpd_helo_required": "yes",
            "smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname",
            "smtpd_relay_restrictions": (
                "permit_sasl_authenticated, reject_unauth_destination" if self.auth
                else "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
            ),
            "smtpd_banner": "$myhostname ESMTP",
            "smtputf8_enable": "no",
            "biff": "no",
            # No network here: no reverse lookups of clients, no DNS for the relayhost.
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtp_tls_security_level": "none",
            # Tests send bursts: no flow-control pauses, quick retries if the sink blips.
            "in_flow_delay": "0",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
        }
        if self.ca is not None:
            settings.update({
                "smtpd_tls_security_level": "encrypt" if self.require_tls else "may",
                "smtpd_tls_cert_file": str(self.ca.cert_file),
                "smtpd_tls_key_file": str(self.ca.key_file),
                "smtpd_tls_auth_only": "yes",
            })
        if self.auth:
            settings.update({
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "dovecot",
                "smtpd_sasl_path": str(directory / "dovecot" / "auth-client"),
            })
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _start_dovecot(self, directory: Path) -> None:
        ok, why = dovecot_available()
        if not ok:
            raise ServiceError(why)
        home = directory / "dovecot"
        home.mkdir()
        home.chmod(0o755)
        users = home / "users"
        users.write_text(f"{self.username}:{{PLAIN}}{self.password}::::::\n")
        # The auth process reads the file after dropping to the dovecot user.
        users.chmod(0o640)
        os.chown(users, 0, pwd.getpwnam("dovecot").pw_gid)
        conf = home / "dovecot.conf"
        conf.write_text(_DOVECOT_CONF.format(home=home, instance=f"mailer-{self.port}"))
        self._dovecot = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        socket_path = home / "auth-client"
        deadline = time.monotonic() + DEFAULT_START_TIMEOUT
        while not socket_path.exists():
            if self._dovecot.poll() is not None or time.monotonic() > deadline:
                log = tail_of(home / "dovecot.log")
                raise ServiceError(f"dovecot did not start ({self._dovecot.poll()}):\n{log}")
            time.sleep(0.02)

    def _wait_banner(self, began: float) -> None:
        assert self._master is not None
        deadline = began + DEFAULT_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._master.poll() is not None:
                raise ServiceError(
                    f"postfix master exited with {self._master.returncode}:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=1.0) as sock,
            ):
                if sock.recv(128).startswith(b"220 "):
                    sock.sendall(b"QUIT\r\n")
                    return
            time.sleep(0.05)
        raise ServiceError(f"postfix did not answer within {DEFAULT_START_TIMEOUT} s:\n"
                           f"{self.log_tail()}")

    def close(self) -> None:
        """Stop Postfix and Dovecot by PID, stop the sink, remove the temp dir."""
        stop_process(self._master, DEFAULT_STOP_TIMEOUT)
        self._master = None
        stop_process(self._dovecot, DEFAULT_STOP_TIMEOUT)
        self._dovecot = None
        self._stack.close()
        if self in _LIVE:
            _LIVE.remove(self)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


# Auth only: no mail protocols, no listeners but the socket Postfix's smtpd talks to.
_DOVECOT_CONF = """\
instance_name = {instance}
base_dir = {home}/run
state_dir = {home}/state
log_path = {home}/dovecot.log
protocols =
ssl = no
# Postfix decides when AUTH is offered (smtpd_tls_auth_only); Dovecot must not refuse
# PLAIN because it cannot see the client's TLS.
disable_plaintext_auth = no
auth_mechanisms = plain login
# Dovecot delays a failed login (against password guessing) and adds a growing penalty
# per client IP, kept by its anvil process; tests log in wrongly on purpose, all from
# 127.0.0.1. An anvil penalty socket the (unprivileged) auth process cannot open turns the
# penalty off.
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {home}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent allow_all_users=yes
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener {home}/auth-client {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
"""

# Relays still running, stopped at exit if a test run ends without doing so.
_LIVE: list[PostfixRelay] = []


@atexit.register
def _close_all() -> None:
    for relay in list(_LIVE):
        with contextlib.suppress(Exception):
            relay.close()


def _make_queue(directory: Path) -> None:
    """Create the queue and data directories with the owners and modes Postfix expects.

    They come from Postfix's own manifest (``postfix-files``, the list `postfix check`
    works from), which is quicker than `postfix check` itself: about 2 s of shell.
    """
    owner = pwd.getpwnam("postfix")
    group = grp.getgrnam("postdrop").gr_gid
    places = {"$queue_directory": directory / "queue", "$data_directory": directory / "data"}
    made = 0
    for line in Path(POSTFIX_FILES).read_text().splitlines():
        fields = line.split(":")
        if len(fields) < 5 or fields[1] != "d" or fields[0].split("/")[0] not in places:
            continue
        top, _, rest = fields[0].partition("/")
        path = places[top] / rest if rest else places[top]
        path.mkdir(exist_ok=True)
        os.chown(
            path,
            owner.pw_uid if fields[2] == "$mail_owner" else 0,
            group if fields[3] == "$setgid_group" else (owner.pw_gid if fields[2] != "root" else 0),
        )
        path.chmod(int(fields[4], 8))
        made += 1
    if made < 3:
        raise ServiceError(f"{POSTFIX_FILES} lists no queue directories")


@contextmanager
def running_postfix(**options: Any) -> Iterator[PostfixRelay]:
    """Start a :class:`PostfixRelay` for a test (fail under CI=true, else skip, if missing)."""
    require_postfix(auth=bool(options.get("auth")))
    with PostfixRelay(**options) as relay:
        yield relay


def pid_running(pid: int) -> bool:
    """Whether ``pid`` is still running (for tests that check the clean-up)."""
    return pid_alive(pid)
