"""What every command module shares: the type of the sub-command registry."""

from __future__ import annotations

import argparse
from typing import TypeAlias

#: What ``ArgumentParser.add_subparsers()`` returns; each command module adds its group to it.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
