"""GNU Mailman's bounce detectors (``flufl.bounce``, Apache-2.0) behind our own readers.

flufl.bounce knows a long tail of old and odd MTA formats. It runs only when our readers
found nothing, and only its addresses are taken: whether a failure is hard is still
decided by our rules (SPEC section 4) from the prose around each address, because its
"permanent" means "not a delay warning", not "evidence that the mailbox is gone". It is
optional: without the package this reader finds nothing.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from email.message import Message
from typing import cast

_Detector = Callable[[Message], tuple[frozenset[bytes], frozenset[bytes]]]


def _quiet(record: logging.LogRecord) -> bool:
    """Drop flufl.bounce's own tracebacks: an exception text may quote the message."""
    return record.exc_info is None


def _load() -> _Detector | None:
    try:
        module = importlib.import_module("flufl.bounce")
    except Exception:
        return None
    # We catch its errors ourselves; its logged traceback could carry addresses (no
    # addresses or bodies in logs).
    logging.getLogger("flufl.bounce").addFilter(_quiet)
    detector = getattr(module, "all_failures", None)
    return cast(_Detector, detector) if callable(detector) else None


_ALL_FAILURES = _load()


def available() -> bool:
    """Tell whether flufl.bounce is installed."""
    return _ALL_FAILURES is not None


def failures(message: Message) -> tuple[list[str], list[str]]:
    """Return ``(temporary, permanent)`` addresses flufl.bounce finds; empty on any error."""
    if _ALL_FAILURES is None:
        return [], []
    try:
        temporary, permanent = _ALL_FAILURES(message)
    except Exception:
        # A detector that trips over a malformed message must not sink the report.
        return [], []
    return _text(temporary), _text(permanent)


def _text(found: object) -> list[str]:
    out: list[str] = []
    if not isinstance(found, (set, frozenset, list, tuple)):
        return out
    for item in list(found)[:1000]:
        if isinstance(item, bytes):
            out.append(item.decode("utf-8", "replace"))
        elif isinstance(item, str):
            out.append(item)
    return sorted(out)
