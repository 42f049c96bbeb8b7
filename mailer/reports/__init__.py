"""Read bounces, complaints and auto-replies from raw mail (SPEC sections 4, 8 and 12).

Pure: the input is the raw bytes of one message, the output a :class:`Report`; no I/O,
no database, no clock, and never an exception. Applying a report (matching it to a
message we sent, suppressing, counting) is the caller's business.

>>> report = read_report(raw)
>>> report.kind, [(r.address, r.hard, r.policy) for r in report.recipients]
"""

from __future__ import annotations

from mailer.reports.model import (
    MAX_DIAGNOSTIC,
    MAX_RECIPIENTS,
    Recipient,
    Report,
    ReportKind,
)
from mailer.reports.reader import read_report

__all__ = [
    "MAX_DIAGNOSTIC",
    "MAX_RECIPIENTS",
    "Recipient",
    "Report",
    "ReportKind",
    "read_report",
]
