"""InfluxDB line protocol encoding: turn one point into exactly one safe line, for any input.

Job labels, user names and device names come from any local user, so every string is
treated as hostile. ``encode_point`` guarantees that its output is one line (no
newline or carriage return anywhere), that it parses back into exactly the values
given (after the documented rewrites below), and that no input can end a token early,
start a comment, merge into another series or inject a point.

Escaping (InfluxDB line protocol):
- measurement: ``,`` and space are escaped with a backslash;
- tag keys, tag values, field keys: ``,``, ``=`` and space are escaped;
- string field values: ``"`` and ``\\`` are escaped, the value is double-quoted.

Rewrites, applied before escaping (visible and consistent, so a rewritten value is
recognisable in Grafana and the same input always gives the same series):
1. Control characters (U+0000..U+001F, U+007F) anywhere, newline and carriage return
   included, become their Unicode "control pictures": U+2400 + code, DEL -> U+2421
   (so ``"\\n"`` -> ``"␊"``, ``"\\r"`` -> ``"␍"``, ``"\\t"`` -> ``"␉"``). A line can
   therefore never contain a newline or carriage return.
2. Lone surrogates (undecodable bytes smuggled in by ``surrogateescape``) become U+FFFD.
3. In the measurement, tag keys, tag values and field keys, a backslash that ends the
   text or directly precedes a character that gets escaped there becomes U+29F5
   ``⧵`` (REVERSE SOLIDUS OPERATOR). Line protocol has no escape for the backslash
   itself: the InfluxDB 1.x/2.x tag scanner treats a character as escaped when the
   previous byte is a backslash, while its line splitter skips backslash *pairs*, so
   ``a\\`` before a separator, or ``\\`` before ``\\,``, is read differently by the two
   and can swallow the next lines (verified against influxd 1.6: three points lost).
   Other backslashes (``DOMAIN\\user``) are kept as they are.
4. An empty tag value is never written (clients drop such tags and the point would
   merge into another series): it becomes ``EMPTY_TAG_VALUE`` (``_none_``).

Fields: floats are written with ``repr`` precision (shortest round-trip form); NaN and
±Inf are dropped; integers get the ``i`` suffix and must fit int64 (others are
dropped); bools are ``true``/``false``; strings are quoted. A point left without any
field is not written: ``encode_point`` returns None. Every drop is counted in
``counters``. Timestamps are integer nanoseconds since the epoch (the writer always
sends ``precision=ns``); ``ns_from_s`` converts wall-clock seconds, rounded to whole
microseconds so the same float always yields the same timestamp.

Programming errors (an empty measurement, tag key or field key; a measurement starting
with ``#``; two keys that are equal after the rewrites) raise ValueError: those names
come from code, not from users.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Union

FieldValue = Union[float, int, bool, str]

EMPTY_TAG_VALUE = "_none_"
BACKSLASH_REPLACEMENT = "\u29f5"  # ⧵
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Rewrite 1: C0 controls and DEL -> control pictures (U+2400 + code, DEL -> U+2421).
_CONTROL_PICTURES = {code: 0x2400 + code for code in range(0x20)}
_CONTROL_PICTURES[0x7F] = 0x2421
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")
# Rewrite 2: lone surrogates -> U+FFFD.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# Rewrite 3: a backslash before an escaped character or at the end of the text.
_BACKSLASH_MEASUREMENT_RE = re.compile(r"\\(?=[, ]|\Z)")
_BACKSLASH_KEY_RE = re.compile(r"\\(?=[,= ]|\Z)")

_ESCAPE_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ "})
_ESCAPE_KEY = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_ESCAPE_STRING = str.maketrans({"\\": "\\\\", '"': '\\"'})


@dataclass
class EncodeCounters:
    """What the encoder dropped, since the process started (process-wide)."""

    points_skipped_no_fields: int = 0
    fields_dropped_non_finite: int = 0
    fields_dropped_out_of_range: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "points_skipped_no_fields": self.points_skipped_no_fields,
                "fields_dropped_non_finite": self.fields_dropped_non_finite,
                "fields_dropped_out_of_range": self.fields_dropped_out_of_range,
            }


counters = EncodeCounters()


def _clean_text(text: str) -> str:
    """Rewrites 1 and 2: no control characters, no lone surrogates."""
    if _CONTROL_RE.search(text):
        text = text.translate(_CONTROL_PICTURES)
    if not text.isascii() and _SURROGATE_RE.search(text):
        text = _SURROGATE_RE.sub("\ufffd", text)
    return text


@lru_cache(maxsize=8192)
def sanitize_key(text: str) -> str:
    """A tag key, tag value or field key after rewrites 1-3 (not yet escaped)."""
    return _BACKSLASH_KEY_RE.sub(BACKSLASH_REPLACEMENT, _clean_text(text))


def sanitize_tag_value(text: str) -> str:
    """A tag value after rewrites 1-4 (not yet escaped): what InfluxDB will store."""
    return sanitize_key(text) or EMPTY_TAG_VALUE


def sanitize_measurement(text: str) -> str:
    """A measurement after rewrites 1-3 (not yet escaped)."""
    return _BACKSLASH_MEASUREMENT_RE.sub(BACKSLASH_REPLACEMENT, _clean_text(text))


def sanitize_string_field(text: str) -> str:
    """A string field value after rewrites 1-2 (not yet escaped)."""
    return _clean_text(text)


@lru_cache(maxsize=1024)
def escape_measurement(name: str) -> str:
    """The measurement as written on the wire. Raises ValueError when unusable."""
    clean = sanitize_measurement(name)
    if not clean:
        raise ValueError("measurement name is empty")
    if clean.startswith("#"):
        raise ValueError(f"measurement name {name!r} starts with '#' (a comment line)")
    return clean.translate(_ESCAPE_MEASUREMENT)


@lru_cache(maxsize=8192)
def escape_key(key: str) -> str:
    """A tag key or field key as written on the wire. Raises ValueError when empty."""
    clean = sanitize_key(key)
    if not clean:
        raise ValueError("tag or field key is empty")
    return clean.translate(_ESCAPE_KEY)


@lru_cache(maxsize=8192)
def escape_tag_value(value: str) -> str:
    """A tag value as written on the wire; never empty (see ``EMPTY_TAG_VALUE``)."""
    return sanitize_tag_value(value).translate(_ESCAPE_KEY)


def escape_string_field(value: str) -> str:
    """A string field value as written on the wire, quotes included."""
    return '"' + sanitize_string_field(value).translate(_ESCAPE_STRING) + '"'


def format_field_value(value: FieldValue) -> str | None:
    """The wire form of one field value, or None when it cannot be written (counted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return f"{int(value)}i"
        counters.add("fields_dropped_out_of_range")
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return float.__repr__(float(value))
        counters.add("fields_dropped_non_finite")
        return None
    if isinstance(value, str):
        return escape_string_field(value)
    raise TypeError(f"unsupported field value type {type(value).__name__}: {value!r}")


def ns_from_s(t_s: float) -> int:
    """Wall-clock seconds -> integer nanoseconds, rounded to whole microseconds."""
    return round(t_s * 1_000_000) * 1_000


def encode_point(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, FieldValue],
    timestamp_ns: int,
) -> str | None:
    """One line of line protocol (no trailing newline), tags sorted by key.

    Returns None, and counts it, when no field is left after dropping NaN/Inf and
    out-of-range integers.
    """
    if isinstance(timestamp_ns, bool) or not isinstance(timestamp_ns, int):
        raise TypeError(f"timestamp_ns must be an int, got {timestamp_ns!r}")
    parts = [escape_measurement(measurement)]
    tag_pairs = sorted((escape_key(k), escape_tag_value(v)) for k, v in tags.items())
    for i in range(1, len(tag_pairs)):
        if tag_pairs[i][0] == tag_pairs[i - 1][0]:
            raise ValueError(f"two tag keys are equal after escaping: {tag_pairs[i][0]!r}")
    for key, value in tag_pairs:
        parts.append(f",{key}={value}")
    field_parts: list[str] = []
    seen: set[str] = set()
    for key, value in fields.items():
        wire_key = escape_key(key)
        if wire_key in seen:
            raise ValueError(f"two field keys are equal after escaping: {wire_key!r}")
        seen.add(wire_key)
        wire_value = format_field_value(value)
        if wire_value is not None:
            field_parts.append(f"{wire_key}={wire_value}")
    if not field_parts:
        counters.add("points_skipped_no_fields")
        return None
    parts.append(" ")
    parts.append(",".join(field_parts))
    parts.append(f" {timestamp_ns}")
    return "".join(parts)
