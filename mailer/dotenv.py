"""The ``.env`` file that ``make run`` writes and every ``mailer`` command reads (SPEC 11)."""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path

from mailer.errors import ConfigError

_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``NAME=value`` lines, ``#`` comments, optional quotes.

    No interpolation and no escapes: the file ``make run`` writes holds plain values, and
    a shell can ``source`` it too (values with spaces are single-quoted).
    """
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if match is None:
            raise ConfigError(f"{path}:{number}: not a NAME=value line")
        name, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def load_env_file(path: Path, environ: MutableMapping[str, str] | None = None) -> bool:
    """Add the variables of ``path`` to the environment, never replacing one already set.

    Returns whether the file existed. A variable exported in the shell wins over the file,
    so ``MAILER_SMTP_PORT=2526 mailer sink`` does what it says.
    """
    env = os.environ if environ is None else environ
    if not path.is_file():
        return False
    for name, value in read_env_file(path).items():
        env.setdefault(name, value)
    return True
