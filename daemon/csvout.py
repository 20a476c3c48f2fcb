"""CSV output of job objects: ``wattprint jobs --format csv`` and ``report --format csv``.

One row per job, a header row first, RFC 4180 quoting (Python's csv module, ``\\r\\n``
line ends), UTF-8. Times are ISO 8601 in UTC (``2026-12-06T01:19:22.250000+00:00``;
empty while a job runs), energy in kWh, CO2e in kg: what pandas, spreadsheets and
CodeCarbon's ``emissions.csv`` users expect. ``COLUMNS`` is the documented list
(docs/api.md, with the CodeCarbon mapping in ``CODECARBON``).

Text cells hold untrusted input (labels, user and command names): one that begins with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'`` so that a
spreadsheet shows it as text instead of running it as a formula (OWASP's advice).
"""

from __future__ import annotations

import csv
from typing import Any, Iterable, TextIO

from .carbon import J_PER_KWH
from .timefmt import iso_offset

G_PER_KG = 1000.0

# (column, meaning); the order is the file's.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("job_id", "the job's id (`<leader pid>-<start time>`)"),
    ("label", "job label as exported (sanitised; `_overflow` at the per-user cap)"),
    ("user", "user name of the job's processes"),
    ("host", "the daemon's [daemon] host"),
    ("command", "executable name of the job's leader (never the command line)"),
    ("state", "running, finished, or unknown (read from the store while the daemon is not answering)"),
    ("started_at", "start, ISO 8601 UTC"),
    ("ended_at", "end, ISO 8601 UTC; empty while running"),
    ("duration_s", "seconds from start to end (or to now / the last tick seen)"),
    ("energy_kwh", "energy at the devices, GPU + CPU + DRAM + other (the node remainder), kWh (PUE not applied)"),
    ("gpu_energy_kwh", "GPU part, kWh"),
    ("cpu_energy_kwh", "CPU part, kWh"),
    ("dram_energy_kwh", "DRAM part, kWh"),
    ("co2e_kg", "CO2e, kg (grid intensity of each interval x energy x PUE)"),
    ("co2e_status", "provisional (some intensity not yet realised) or final"),
    ("intensity_g_per_kwh", "energy-weighted mean grid intensity, gCO2e/kWh; empty without energy"),
    ("zone", "grid zone(s) the intensity came from"),
    ("pue", "power usage effectiveness applied to CO2e and cost"),
    ("gpu_hours", "GPU time, hours"),
    ("peak_gpu_memory_bytes", "largest GPU memory the job held at once, bytes"),
    ("cost", "energy x PUE x [accounting] price_per_kwh; 0 when no price is set"),
    ("currency", "[accounting] currency"),
    ("energy_sources", "where each component's figures come from, e.g. "
                       "`cpu=counter;dram=estimate;gpu=counter;node=none` (`node`: redfish, ipmi or none)"),
    ("other_energy_kwh", "other part: the job's share of the node remainder (BMC node power minus GPU, CPU and "
                         "DRAM), kWh; 0 without a BMC (appended last, so earlier columns keep their places)"),
)
HEADER = tuple(name for name, _ in COLUMNS)

# CodeCarbon emissions.csv column -> this file's column (and the conversion, if any).
CODECARBON: tuple[tuple[str, str], ...] = (
    ("duration", "duration_s (seconds in both)"),
    ("energy_consumed", "energy_kwh (kWh in both; CodeCarbon multiplies by its PUE, wattprint does not: "
                        "energy_kwh x pue)"),
    ("emissions", "co2e_kg (kg CO2e in both)"),
    ("cpu_energy / gpu_energy / ram_energy", "cpu_energy_kwh / gpu_energy_kwh / dram_energy_kwh"),
    ("country_iso_code / region", "zone (a grid zone: DK1, GB, DE, ...)"),
    ("run_id / project_name", "job_id / label"),
    ("timestamp", "ended_at (or started_at)"),
    ("pue", "pue"),
)

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def iso_time(t: float | None) -> str:
    """Seconds since the epoch as ISO 8601 in UTC; "" for None."""
    if t is None:
        return ""
    return iso_offset(t)


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates from undecodable bytes
    return "'" + text if text.startswith(_FORMULA_START) else text


def _num(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def job_row(job: dict[str, Any]) -> list[str]:
    """The CSV cells of one job object (as the API and the store return it)."""
    energy = job.get("energy_j") or {}
    cost = job.get("cost") or {}
    avg = job.get("intensity_g_per_kwh_avg")
    sources = job.get("energy_sources") or {}
    return [
        _text(job["id"]), _text(job.get("label")), _text(job.get("user")), _text(job.get("host")),
        _text(job.get("command")), _text(job["state"]),
        iso_time(job["started_at"]), iso_time(job.get("ended_at")),
        _num(float(job["duration_s"]), 3),
        _num(float(job["energy_kwh"]), 9),
        _num(float(energy.get("gpu", 0.0)) / J_PER_KWH, 9),
        _num(float(energy.get("cpu", 0.0)) / J_PER_KWH, 9),
        _num(float(energy.get("dram", 0.0)) / J_PER_KWH, 9),
        _num(float(job["co2e_g"]) / G_PER_KG, 9),
        _text(job.get("co2e_status")),
        "" if avg is None else _num(float(avg), 3),
        _text(job.get("zone")),
        _num(float(job.get("pue", 1.0)), 3),
        _num(float(job.get("gpu_seconds", 0.0)) / 3600.0, 6),
        str(int(job.get("peak_gpu_memory_bytes", 0))),
        _num(float(cost.get("amount", 0.0)), 6),
        _text(cost.get("currency", "")),
        _text(";".join(f"{k}={v}" for k, v in sorted(sources.items()))),
        _num(float(energy.get("other", 0.0)) / J_PER_KWH, 9),
    ]


def write_jobs_csv(jobs: Iterable[dict[str, Any]], out: TextIO) -> None:
    """Write the header and one row per job to ``out``."""
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(HEADER)
    for job in jobs:
        writer.writerow(job_row(job))
