"""A real Dovecot IMAP server for tests, on a free loopback port, with its own dirs and users.

:class:`ImapServer` runs Debian's Dovecot (packages ``dovecot-core`` and ``dovecot-imapd``)
as a private instance, as :mod:`tests.relays` does for SMTP AUTH: its own ``base_dir``,
``state_dir``, log and a ``passwd-file`` of one user, IMAP only, on ``127.0.0.1:<free
port>``, mail kept as a Maildir in a temp dir owned by the unprivileged ``dovecot`` user.
Nothing system-wide is touched. Started and stopped by PID; the temp dir is removed.
Needs root (Dovecot's master starts as root to drop privileges).
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.services import ServiceError, free_port, require, stop_process, tail_of, user_exists

#: Debian's Dovecot master and its IMAP service (package dovecot-imapd).
DOVECOT = "/usr/sbin/dovecot"
DOVECOT_IMAP = "/usr/lib/dovecot/imap"
#: How long Dovecot may take to come up, and to exit after SIGTERM.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
#: The system user that owns the mail (Dovecot never serves mail as root).
MAIL_USER = "dovecot"


def imap_available() -> tuple[bool, str]:
    """Whether a private Dovecot IMAP server can run here, and if not, why."""
    if not (os.access(DOVECOT, os.X_OK) and os.access(DOVECOT_IMAP, os.X_OK)):
        return False, "dovecot is not installed (apt-get install dovecot-core dovecot-imapd)"
    if os.geteuid() != 0:
        return False, "dovecot's master must be started as root"
    for user in ("dovecot", "dovenull"):
        if not user_exists(user):
            return False, f"the {user} system user is missing"
    return True, ""


def require_imap() -> None:
    """Fail (under CI=true) or skip the current test when Dovecot IMAP is missing."""
    ok, why = imap_available()
    require("dovecot-imapd", ok, why)


_CONF = """\
instance_name = mailer-imap-{port}
base_dir = {home}/run
state_dir = {home}/state
log_path = {home}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
auth_failure_delay = 0
mail_location = maildir:{home}/mail/%u
first_valid_uid = {uid}
last_valid_uid = {uid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {home}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={home}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


class ImapServer:
    """A private Dovecot serving one IMAP user on 127.0.0.1; stopped by PID."""

    def __init__(self, username: str = "bounces") -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.username = username
        self.password = secrets.token_urlsafe(12)
        self.directory: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, folder: str = "INBOX", query: str = "") -> str:
        """The ``MAILER_BOUNCE_IMAP_URL`` of this server's mailbox."""
        suffix = f"?{query}" if query else ""
        return f"imap://{self.username}:{self.password}@{self.host}:{self.port}/{folder}{suffix}"

    def start(self) -> ImapServer:
        """Write the config, start Dovecot, wait until IMAP answers."""
        ok, why = imap_available()
        if not ok:
            raise ServiceError(why)
        self.directory = Path(tempfile.mkdtemp(prefix="mailer-imap-"))
        self.directory.chmod(0o755)
        user = pwd.getpwnam(MAIL_USER)
        mail = self.directory / "mail"
        mail.mkdir()
        os.chown(mail, user.pw_uid, user.pw_gid)
        users = self.directory / "users"
        users.write_text(f"{self.username}:{{PLAIN}}{self.password}::::::\n")
        users.chmod(0o640)
        os.chown(users, 0, user.pw_gid)
        self.port = free_port()
        conf = self.directory / "dovecot.conf"
        conf.write_text(_CONF.format(home=self.directory, port=self.port, uid=user.pw_uid,
                                     gid=user.pw_gid))
        self._proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_tail()
                self.close()
                raise ServiceError(f"dovecot did not start:\n{log}")
            with (contextlib.suppress(OSError),
                  socket.create_connection((self.host, self.port), timeout=1.0) as sock):
                if sock.recv(64).startswith(b"* OK"):
                    return self
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        """The end of Dovecot's log."""
        if self.directory is None:
            return "(no log)"
        return tail_of(self.directory / "dovecot.log", lines)

    def client(self) -> imaplib.IMAP4:
        """A logged-in imaplib client (the test's own view of the mailbox)."""
        imap = imaplib.IMAP4(self.host, self.port, timeout=30)
        imap.login(self.username, self.password)
        return imap

    def append(self, raw: bytes, folder: str = "INBOX") -> None:
        """Put one message into ``folder``, as a mail provider's delivery would."""
        imap = self.client()
        try:
            status, _ = imap.append(f'"{folder}"', None, None, raw)
            if status != "OK":
                raise ServiceError("IMAP APPEND failed")
        finally:
            imap.logout()

    def count(self, folder: str) -> int:
        """How many messages ``folder`` holds (0 when it does not exist)."""
        imap = self.client()
        try:
            status, data = imap.select(f'"{folder}"', readonly=True)
            return int(data[0] or b"0") if status == "OK" else 0
        finally:
            imap.logout()

    def close(self) -> None:
        """Stop Dovecot by PID and remove the temp dir."""
        stop_process(self._proc, STOP_TIMEOUT)
        self._proc = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


@contextlib.contextmanager
def running_imap_server() -> Iterator[ImapServer]:
    """An :class:`ImapServer` for the duration of the block."""
    require_imap()
    server = ImapServer().start()
    try:
        yield server
    finally:
        server.close()
