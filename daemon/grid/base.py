"""The one interface every grid carbon-intensity provider implements, its typed error,
and the shared HTTP helper that turns any bad answer into that error.

A provider fetches the grid's carbon intensity (gCO2e/kWh) for one zone as a list of
``IntensityPoint`` values, each valid for ``[start, end)`` in UTC and marked ``actual``
(realised, published) or ``forecast`` (a stand-in until the realised value exists).
Every failure surfaces as ``ProviderError`` with a short ``reason`` code and a one-line
message; no traceback, HTML page or body dump ever reaches health or logs.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Literal, Mapping, Protocol

import aiohttp
from yarl import URL

from ..httpdates import parse_retry_after  # the one Retry-After parser (also importable from here)

Kind = Literal["actual", "forecast"]
Reason = Literal["timeout", "rate_limited", "http_error", "bad_body", "auth", "no_data"]
REASONS: tuple[str, ...] = ("timeout", "rate_limited", "http_error", "bad_body", "auth", "no_data")

MAX_TIMEOUT_S = 10.0  # no grid request may wait longer than this (design rule)
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
USER_AGENT = "wattprint-grid/0.1 (+https://github.com/wattprint)"


@dataclass(frozen=True)
class IntensityPoint:
    """Grid carbon intensity valid for ``[start, end)``; times are tz-aware UTC."""

    start: datetime
    end: datetime
    g_per_kwh: float
    kind: Kind
    zone: str
    provider: str

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
                raise ValueError(f"IntensityPoint.{name} must be a timezone-aware datetime, got {value!r}")
            object.__setattr__(self, name, value.astimezone(timezone.utc))
        if self.end <= self.start:
            raise ValueError(f"IntensityPoint end {self.end} is not after start {self.start}")
        if not isinstance(self.g_per_kwh, (int, float)) or not math.isfinite(self.g_per_kwh) or self.g_per_kwh < 0:
            raise ValueError(f"IntensityPoint g_per_kwh must be a finite number >= 0, got {self.g_per_kwh!r}")
        object.__setattr__(self, "g_per_kwh", float(self.g_per_kwh))
        if self.kind not in ("actual", "forecast"):
            raise ValueError(f"IntensityPoint kind must be actual or forecast, got {self.kind!r}")

    @property
    def duration_s(self) -> float:
        return (self.end - self.start).total_seconds()


class ProviderError(Exception):
    """A fetch failed. ``reason`` is one of REASONS; ``str(err)`` is a one-line message.

    ``retry_after_s`` is set for ``rate_limited`` when the server said how long to wait;
    ``status`` is the HTTP status when there was one.
    """

    def __init__(self, reason: Reason, message: str, *, retry_after_s: float | None = None,
                 status: int | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown ProviderError reason {reason!r}")
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message
        self.retry_after_s = retry_after_s
        self.status = status

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class IntensityProvider(Protocol):
    """A source of grid carbon intensity for one zone."""

    name: str  # "energidataservice", "carbonintensity_uk", "electricitymaps", "static"
    zone: str  # the zone as written on every point (never empty: InfluxDB drops empty tags)
    resolution_s: int  # width of one point: 300, 1800 or 3600
    has_actuals: bool  # False: this zone only ever has forecasts (e.g. UK regional)
    last_warnings: tuple[str, ...]  # non-fatal problems of the last fetch ("no forecast in plan")

    async def fetch(self, session: aiohttp.ClientSession, since: datetime, until: datetime) -> list[IntensityPoint]:
        """Realised values in [since, now] and forecasts up to ``until`` where the API
        has them, sorted by start, one point per start (actual preferred).
        Raises ProviderError."""
        ...


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _epoch_s(now: datetime | None) -> float | None:
    """``now`` (a test's clock) as seconds since the epoch for parse_retry_after."""
    return None if now is None else as_utc(now, "now").timestamp()


def as_utc(t: datetime, what: str = "time") -> datetime:
    """``t`` in UTC; naive datetimes are refused rather than guessed."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {t!r}")
    return t.astimezone(timezone.utc)


def floor_time(t: datetime, step_s: int) -> datetime:
    """``t`` (UTC) rounded down to a multiple of ``step_s`` since the epoch."""
    ts = int(as_utc(t).timestamp())
    return datetime.fromtimestamp(ts - ts % step_s, timezone.utc)


def ceil_time(t: datetime, step_s: int) -> datetime:
    floored = floor_time(t, step_s)
    return floored if floored == as_utc(t) else floored + timedelta(seconds=step_s)


def parse_number(value: Any) -> float | None:
    """A finite, non-negative float from a JSON value, else None (nulls, strings, NaN)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str):
        try:
            v = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(v) or v < 0:
        return None
    return v


def normalise(points: Iterable[IntensityPoint]) -> list[IntensityPoint]:
    """Sorted by start, one point per start. An actual beats a forecast for the same
    start; between two of the same kind the later one in ``points`` wins."""
    by_start: dict[datetime, IntensityPoint] = {}
    for p in points:
        prev = by_start.get(p.start)
        if prev is not None and prev.kind == "actual" and p.kind == "forecast":
            continue
        by_start[p.start] = p
    return [by_start[k] for k in sorted(by_start)]


def _short(text: str, limit: int = 120) -> str:
    """One printable line of at most ``limit`` characters, for messages."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _where(url: str) -> str:
    """Host and path of ``url`` without the query (queries may carry tokens)."""
    u = URL(url)
    return f"{u.host or ''}{u.path}"


def _json_error_message(body: bytes) -> str:
    """The ``error``/``message`` text of a JSON error body, if there is one."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return ""
    if isinstance(data, dict):
        for key in ("message", "error", "detail", "title"):
            v = data.get(key)
            if isinstance(v, str):
                return _short(v, 80)
            if isinstance(v, dict):
                for inner in ("message", "code"):
                    if isinstance(v.get(inner), str):
                        return _short(v[inner], 80)
    return ""


async def get_json(
    session: aiohttp.ClientSession,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = MAX_TIMEOUT_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    now: datetime | None = None,
) -> Any:
    """GET ``url`` and return its decoded JSON body, or raise ProviderError.

    - the whole request (connect, headers, body) is bounded by ``timeout_s`` (≤ 10 s)
    - 429 → rate_limited (Retry-After in seconds or as an HTTP date → retry_after_s)
    - 401/403 → auth; any other non-2xx → http_error with the status
    - a body over ``max_body_bytes``, empty, HTML, or not JSON → bad_body
    """
    timeout = aiohttp.ClientTimeout(total=min(float(timeout_s), MAX_TIMEOUT_S))
    where = _where(url)
    hdrs = {"Accept": "application/json", "User-Agent": USER_AGENT}
    hdrs.update(headers or {})
    try:
        async with session.get(url, params=dict(params or {}), headers=hdrs, timeout=timeout,
                               allow_redirects=True) as resp:
            status = resp.status
            content_type = resp.headers.get("Content-Type", "")
            retry_after = resp.headers.get("Retry-After")
            declared = resp.content_length
            if declared is not None and declared > max_body_bytes:
                raise ProviderError("bad_body", f"{where}: body of {declared} bytes is over the {max_body_bytes}-byte limit",
                                    status=status)
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > max_body_bytes:
                    raise ProviderError("bad_body", f"{where}: body is over the {max_body_bytes}-byte limit",
                                        status=status)
                chunks.append(chunk)
            body = b"".join(chunks)
    except ProviderError:
        raise
    except asyncio.TimeoutError:
        raise ProviderError("timeout", f"{where}: no complete answer within {timeout.total:g} s") from None
    except aiohttp.ClientError as exc:
        raise ProviderError("http_error", f"{where}: {type(exc).__name__}: {_short(str(exc), 100)}") from None
    except OSError as exc:
        raise ProviderError("http_error", f"{where}: {type(exc).__name__}: {_short(str(exc), 100)}") from None

    if status == 429:
        wait_s = parse_retry_after(retry_after, _epoch_s(now))
        hint = f", Retry-After {wait_s:g} s" if wait_s is not None else ""
        raise ProviderError("rate_limited", f"{where}: HTTP 429 Too Many Requests{hint}",
                            retry_after_s=wait_s, status=status)
    if status in (401, 403):
        detail = _json_error_message(body)
        raise ProviderError("auth", f"{where}: HTTP {status}" + (f": {detail}" if detail else ""),
                            status=status, retry_after_s=parse_retry_after(retry_after, _epoch_s(now)))
    if not 200 <= status < 300:
        detail = _json_error_message(body)
        raise ProviderError("http_error", f"{where}: HTTP {status}" + (f": {detail}" if detail else ""), status=status)

    if not body.strip():
        raise ProviderError("bad_body", f"{where}: empty body (HTTP {status})", status=status)
    ctype = content_type.split(";")[0].strip().lower()
    head = body.lstrip()[:64].lower()
    if ctype in ("text/html", "application/xhtml+xml") or head.startswith((b"<!doctype", b"<html", b"<")):
        raise ProviderError("bad_body", f"{where}: got an HTML page instead of JSON (HTTP {status}, {ctype or 'no content-type'})",
                            status=status)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ProviderError("bad_body", f"{where}: body is not UTF-8", status=status) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid"
        raise ProviderError("bad_body", f"{where}: body is not JSON ({msg}; content-type {ctype or 'none'})",
                            status=status) from None
