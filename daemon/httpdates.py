"""``Retry-After`` (RFC 9110, section 10.2.3): how long a server asked us to wait.

The one parser for the header, used by the grid clients (daemon/grid/base.py) and the
InfluxDB writer (exporters/influx.py). The header is either ``delay-seconds``
(``1*DIGIT``) or an ``HTTP-date``:

- delay-seconds: a non-negative decimal number of seconds. A fractional part
  (``1.5``) is tolerated because some servers send one; anything else that a float
  parser would take (``inf``, ``nan``, ``-1``, ``+5``, ``1e3``, ``0x10``) is not
  delay-seconds and is ignored: the header counts as absent, so the caller's own
  backoff applies (rather than waiting forever, not at all, or retrying at once).
- HTTP-date: seconds from ``now`` until then; a date in the past means "now" (0).
  A date without a zone is read as GMT, as RFC 9110 defines HTTP dates.

Returns None when the header is absent or not valid; never a negative or
non-finite number.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from datetime import timezone

_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (see the module docstring);
    ``now_s`` (seconds since the epoch, default: the wall clock) is what an HTTP-date
    is measured from. None when absent or not valid."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _DELAY_SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None  # 400 digits overflow to inf
    if value[0] in "+-0123456789.":  # a number, but not delay-seconds: -1, +5, 1e3, 1.
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # older Pythons return None for some unreadable dates
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # RFC 9110: HTTP dates are GMT
    now = time.time() if now_s is None else now_s
    seconds = when.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None
