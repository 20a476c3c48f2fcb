"""Test helper: a local Energi Data Service stand-in whose intensity changes over time.

Serves ``/dataset/CO2Emis`` (realised) and ``/dataset/CO2EmisProg`` (forecast) in the
real API's shape (records with Minutes5UTC, Minutes5DK, PriceArea, CO2Emission), for
the 5-minute intervals the client asks for. Values are functions of the interval
start, so tests can compute the truth: ``actual(t)`` and ``forecast(t)``.
``publish_until`` is the moment up to which realised values exist (None: only those
before ``realised_before`` at start).
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

from aiohttp import web

STEP_S = 300


def default_actual(start_s: float) -> float:
    """Realised intensity of the 5-minute interval starting at ``start_s``."""
    return 100.0 + 20.0 * ((int(start_s) // STEP_S) % 7)


def default_forecast(start_s: float) -> float:
    return default_actual(start_s) + 55.0


class EdsSim:
    def __init__(self, *, actual: Callable[[float], float] = default_actual,
                 forecast: Callable[[float], float] = default_forecast,
                 now: Callable[[], float] | None = None):
        self.actual = actual
        self.forecast = forecast
        self.now = now or (lambda: datetime.now(timezone.utc).timestamp())
        self.publish_until: float | None = None  # realised values exist for intervals ending by then
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/dataset/{name}", self._dataset)
        return app

    async def _dataset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        q = dict(request.query)
        with self._lock:
            self.requests.append((name, q))
        start = datetime.fromisoformat(q["start"]).replace(tzinfo=timezone.utc).timestamp()
        end = datetime.fromisoformat(q["end"]).replace(tzinfo=timezone.utc).timestamp()
        area = json.loads(q["filter"])["PriceArea"][0]
        records = []
        t = start - start % STEP_S
        limit_end = end
        if name == "CO2Emis":
            limit_end = min(end, self.publish_until if self.publish_until is not None else 0.0)
        while t + STEP_S <= limit_end if name == "CO2Emis" else t < end:
            value = self.actual(t) if name == "CO2Emis" else self.forecast(t)
            utc = datetime.fromtimestamp(t, timezone.utc)
            records.append({
                "Minutes5UTC": utc.strftime("%Y-%m-%dT%H:%M:%S"),
                "Minutes5DK": (utc + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S"),  # winter time
                "PriceArea": area,
                "CO2Emission": value,
            })
            t += STEP_S
        records.reverse()  # newest first, as the API sorts
        return web.json_response({"total": len(records), "dataset": name, "records": records})
