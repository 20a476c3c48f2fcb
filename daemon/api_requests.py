"""What a request to the HTTP API may ask, and how it is read and answered.

The request limits the routes and the OpenAPI document share (``MAX_LIMIT``, the
job states, filter and job-id lengths, ``MAX_URL_BYTES``); the query parsers
(``parse_time``: seconds since the epoch or ISO 8601; ``parse_job_filters``), which
raise ``BadRequest`` with a message naming the parameter; and the JSON answers
(``json_response``; ``error_response``: ``{"error": {"status": N, "message": "..."}}``).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

MAX_LIMIT = 10_000
JOB_STATES = ("running", "finished")
MAX_FILTER_CHARS = 1024  # label= and user= filters
MAX_JOB_ID_CHARS = 128
# The request target (path + query, percent-encoded, as sent). Every request the
# OpenAPI document allows fits: two 1024-character filters of 4-byte UTF-8 characters
# percent-encoded are 24 KiB.
MAX_URL_BYTES = 32 * 1024

_UNSIGNED_INT = re.compile(r"[0-9]{1,18}")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?")


class BadRequest(Exception):
    """A request the API refuses with 400; the message says why."""


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, allow_nan=False, default=str), status=status,
                        content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": {"status": status, "message": message}}, status=status)


def shown(value: str, limit: int = 80) -> str:
    """A client's value for an error message: repr'd, and cut when long."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def parse_time(name: str, value: str) -> float:
    """Seconds since epoch (decimal digits, optionally a fraction and an exponent), or
    an ISO 8601 date-time (naive means UTC)."""
    value = value.strip()
    if _DECIMAL.fullmatch(value):
        t = float(value)
        if not math.isfinite(t):
            raise BadRequest(f"{name}: {shown(value)} is not a valid time")
        return t
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00")) if value.isascii() else None
    except ValueError:
        dt = None
    if dt is None:
        raise BadRequest(f"{name}: {shown(value)} is neither seconds since epoch nor an ISO 8601 time")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        return dt.timestamp()
    except (OverflowError, OSError, ValueError):
        raise BadRequest(f"{name}: {shown(value)} is out of range") from None


def utf8_text(name: str, value: str) -> str:
    """A query value that is valid text (no lone surrogates from undecodable bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name}: not valid UTF-8") from None
    return value


def parse_job_filters(query: Any) -> dict[str, Any]:
    allowed = {"state", "since", "until", "label", "user", "limit"}
    unknown = sorted(set(query.keys()) - allowed)
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    out: dict[str, Any] = {}
    for key in query.keys():
        if len(query.getall(key)) > 1:
            raise BadRequest(f"{key}: given more than once")
    state = query.get("state")
    if state is not None:
        if state not in JOB_STATES:
            raise BadRequest(f"state: {state!r} is not one of {', '.join(JOB_STATES)}")
        out["state"] = state
    for key in ("since", "until"):
        if key in query:
            out[key] = parse_time(key, query[key])
    if "since" in out and "until" in out and out["since"] > out["until"]:
        raise BadRequest("since is after until")
    for key in ("label", "user"):
        if key in query:
            if len(query[key]) > MAX_FILTER_CHARS:
                raise BadRequest(f"{key}: longer than {MAX_FILTER_CHARS} characters")
            out[key] = utf8_text(key, query[key])
    limit = query.get("limit")
    if limit is not None:
        if not _UNSIGNED_INT.fullmatch(limit.strip()):
            raise BadRequest(f"limit: {shown(limit)} is not an integer")
        n = int(limit)
        if not 1 <= n <= MAX_LIMIT:
            raise BadRequest(f"limit: {n} is outside 1..{MAX_LIMIT}")
        out["limit"] = n
    return out
