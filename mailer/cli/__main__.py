"""``python -m mailer.cli``: the same as the ``mailer`` console script."""

from __future__ import annotations

import sys

from mailer.cli import main

sys.exit(main())
