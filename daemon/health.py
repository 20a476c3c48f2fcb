"""Health of each source and sink: degrade, count, log once on failure and once on recovery.

Modelled on Home Assistant's update coordinator: a part that keeps failing logs one
warning when it goes down and one info line when it comes back, while its error counter
keeps counting every failure.

A part may be degraded by more than one cause at once (the node source's own reads,
and the accounting that finds its reading below the measured components): each
``fail``/``ok`` names its ``cause`` (default ``""``), and the part is ok again only when
every cause has recovered. A cause's ``ok`` never revives a part that cause did not
degrade (a disabled part stays disabled).
"""

from __future__ import annotations

import logging
import threading
import time

from .model import SourceHealth

log = logging.getLogger("wattprint.health")


class HealthBoard:
    """Thread-safe register of part states; ``snapshot()`` returns immutable values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[str, SourceHealth] = {}
        self._causes: dict[str, dict[str, str]] = {}  # part -> failing cause -> its detail

    def register(self, name: str, state: str = "ok", detail: str = "") -> None:
        with self._lock:
            if name not in self._parts:
                self._parts[name] = SourceHealth(name=name, state=state, detail=detail, since=time.time())  # type: ignore[arg-type]

    def ok(self, name: str, detail: str = "", cause: str = "") -> None:
        with self._lock:
            causes = self._causes.get(name, {})
            if cause and cause not in causes:
                return
            causes.pop(cause, None)
            prev = self._parts.get(name)
            if causes:  # another cause still degrades it
                if prev is not None:
                    self._parts[name] = SourceHealth(name=name, state="degraded", detail="; ".join(causes.values()),
                                                     errors_total=prev.errors_total, since=prev.since)
                return
            if prev is not None and prev.state == "ok" and prev.detail == detail:
                return
            if prev is not None and prev.state == "degraded":
                log.info("%s recovered%s", name, f": {detail}" if detail else "")
            self._parts[name] = SourceHealth(
                name=name, state="ok", detail=detail,
                errors_total=prev.errors_total if prev else 0, since=time.time(),
            )

    def fail(self, name: str, detail: str, cause: str = "") -> None:
        """Count one failure; log only when the part goes from healthy to degraded
        or the reason changes."""
        with self._lock:
            causes = self._causes.setdefault(name, {})
            causes[cause] = detail
            detail = "; ".join(causes.values())
            prev = self._parts.get(name)
            errors = (prev.errors_total if prev else 0) + 1
            if prev is None or prev.state != "degraded" or prev.detail != detail:
                log.warning("%s degraded: %s", name, detail)
                since = time.time()
            else:
                since = prev.since
            self._parts[name] = SourceHealth(name=name, state="degraded", detail=detail, errors_total=errors, since=since)

    def disable(self, name: str, detail: str) -> None:
        with self._lock:
            self._causes.pop(name, None)
            prev = self._parts.get(name)
            if prev is None or prev.state != "disabled" or prev.detail != detail:
                log.info("%s disabled: %s", name, detail)
            self._parts[name] = SourceHealth(
                name=name, state="disabled", detail=detail,
                errors_total=prev.errors_total if prev else 0, since=time.time(),
            )

    def get(self, name: str) -> SourceHealth | None:
        with self._lock:
            return self._parts.get(name)

    def snapshot(self) -> tuple[SourceHealth, ...]:
        with self._lock:
            return tuple(sorted(self._parts.values(), key=lambda h: h.name))
