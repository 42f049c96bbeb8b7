"""Typed reading of untrusted JSON bodies: every wrong shape becomes a ParseError."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mailer.webhooks._support.errors import ParseError


def load_json(body: bytes) -> Any:
    """Decode a UTF-8 JSON body; raise ParseError for anything else."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ParseError("body is not UTF-8 JSON") from None


def as_object(value: Any, what: str) -> Mapping[str, Any]:
    """Return ``value`` if it is a JSON object, else raise ParseError naming ``what``."""
    if not isinstance(value, dict):
        raise ParseError(f"{what} is not a JSON object")
    return value


def as_list(value: Any, what: str) -> list[Any]:
    """Return ``value`` if it is a JSON array, else raise ParseError naming ``what``."""
    if not isinstance(value, list):
        raise ParseError(f"{what} is not a JSON array")
    return value


def req_str(obj: Mapping[str, Any], key: str) -> str:
    """Return the string at ``obj[key]``; raise ParseError when absent or not a string."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise ParseError(f"{key} is missing or not a string")
    return value


def opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    """Return the string at ``obj[key]``, None when absent or null; ParseError for other types."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParseError(f"{key} is not a string")
    return value


def opt_text(obj: Mapping[str, Any], key: str) -> str | None:
    """Return ``obj[key]`` as text when it is a string or number (SMTP codes come as both)."""
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str | int):
        return str(value)
    raise ParseError(f"{key} is not a string or integer")


def opt_object(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """Return the object at ``obj[key]``, an empty one when absent or null."""
    value = obj.get(key)
    if value is None:
        return {}
    return as_object(value, key)
