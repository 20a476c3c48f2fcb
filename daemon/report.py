"""Turn one job object (as the HTTP API and ``LedgerReader.job`` return it) into the
plain-text report people read: kWh by component (gpu, cpu, dram and other, the node
remainder from the BMC, with a note on what it means) with the source of each figure,
CO2e with its status, intensity and zone, duration, GPU-hours, peak GPU memory,
cost, the lifecycle figures (embodied carbon, market-based CO2e, water, SCI, with
the occupancy and every factor named with its source; issue 16), everyday
equivalents (of the SCI too) and an optional carbon-aware hint.

Everyday equivalents come from the shipped table ``data/equivalents.json``; each
entry names its source (or says it is plain arithmetic). Untrusted text (label,
user, command, host) is shown on one line with control characters made visible.
This module does no I/O besides reading that table.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from typing import Any

from .carbon import J_PER_KWH
from .model import COMPONENTS
from .timefmt import human

EQUIVALENTS_FILE = "equivalents.json"
BYTES_PER_GIB = 1 << 30
# What OTHER means, under the energy table: with a share of the node's BMC reading, and without.
NODE_NOTE_WITH = ("OTHER is this job's share of the node remainder: the node's input power from its BMC "
                  "minus GPU, CPU and DRAM (fans, power supply losses, NICs, the board), so the sum is the "
                  "job's share of the wall meter.")
NODE_NOTE_WITHOUT = ("OTHER: no node power reading (BMC) was booked to this job, so fans, power supply losses "
                     "and NICs are not counted.")
TEXT_WIDTH = 200  # untrusted text is cut (with "…") beyond this many shown characters


# -- why a label differs from what was set ---------------------------------------------

def label_note(job: dict[str, Any], max_labels_per_user: int | None = None) -> str:
    """Why ``job['label']`` differs from ``job['label_raw']`` ("" when it does not):
    the per-user label cap (the job was filed under ``_overflow``) or sanitising."""
    from .procs import OVERFLOW_LABEL, sanitize_label

    label, raw = job.get("label") or "", job.get("label_raw") or ""
    if label == raw:
        return ""
    if label == OVERFLOW_LABEL and raw and sanitize_label(raw) != OVERFLOW_LABEL:
        cap = f" = {max_labels_per_user}" if max_labels_per_user is not None else ""
        return f"label cap reached for user {job.get('user', '')} (max_labels_per_user{cap})"
    return "sanitised for export"


# -- formatting helpers --------------------------------------------------------------

def printable(text: str, width: int) -> str:
    """Show untrusted text on one line: control characters made visible."""
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def fmt_sig(x: float, sig: int = 3) -> str:
    """``x`` rounded to ``sig`` significant figures, never in scientific notation;
    from 10**(sig-1) up shown as whole numbers with thousands separators
    (``1234.5`` -> ``1,230``; ``0.0006944`` -> ``0.000694``)."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    rounded = float(f"{x:.{sig}g}")
    if abs(rounded) >= 10 ** (sig - 1):
        return f"{rounded:,.0f}"
    decimals = sig - 1 - math.floor(math.log10(abs(rounded)))
    return f"{rounded:.{decimals}f}"


def fmt_mass_g(grams: float) -> str:
    """A CO2e mass in the unit that keeps it readable: g below 1 kg, kg below 1 t, then t
    (three significant figures: ``57.3 g``, ``12.3 kg``, ``4.57 t``)."""
    if abs(grams) >= 1e6:
        return f"{fmt_sig(grams / 1e6)} t"
    if abs(grams) >= 1e3:
        return f"{fmt_sig(grams / 1e3)} kg"
    return f"{fmt_sig(grams)} g"


def fmt_energy_kwh(kwh: float) -> str:
    """An energy in kWh below 1 MWh, then MWh, then GWh (three significant figures)."""
    if abs(kwh) >= 1e6:
        return f"{fmt_sig(kwh / 1e6)} GWh"
    if abs(kwh) >= 1e3:
        return f"{fmt_sig(kwh / 1e3)} MWh"
    return f"{fmt_sig(kwh)} kWh"


def fmt_duration(seconds: float) -> str:
    """``H:MM:SS`` (whole seconds, rounded down)."""
    s = int(max(0.0, seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return human(t) + " UTC"


def fmt_money(amount: float) -> str:
    """Two decimals; amounts that would show as 0.00 keep three significant figures."""
    if 0 < abs(amount) < 0.005:
        return fmt_sig(amount)
    return f"{amount:.2f}"


# -- everyday equivalents ------------------------------------------------------------

@lru_cache(maxsize=1)
def equivalents_table() -> tuple[dict[str, Any], ...]:
    """The entries of ``data/equivalents.json``, in file order."""
    text = resources.files("wattprint.daemon").joinpath("data", EQUIVALENTS_FILE).read_text(encoding="utf-8")
    entries = json.loads(text)["equivalents"]
    for e in entries:
        if e["basis"] not in ("kWh", "gCO2e") or not e["per_unit"] > 0:
            raise ValueError(f"{EQUIVALENTS_FILE}: entry {e.get('id')!r} has a bad basis or per_unit")
    return tuple(entries)


def equivalents(energy_kwh: float, co2e_g: float) -> list[dict[str, Any]]:
    """Everyday equivalents of an energy and a CO2e amount, one dict per table entry:
    ``id, text, count, basis, per_unit, note, source`` where ``count`` is the amount
    on the entry's basis (kWh or gCO2e) divided by ``per_unit``."""
    out: list[dict[str, Any]] = []
    for e in equivalents_table():
        amount = energy_kwh if e["basis"] == "kWh" else co2e_g
        out.append({
            "id": e["id"],
            "text": e["text"],
            "count": amount / e["per_unit"],
            "basis": e["basis"],
            "per_unit": e["per_unit"],
            "note": e["note"],
            "source": e["source"],
        })
    return out


def _source_line(eq: dict[str, Any]) -> str:
    src = eq["source"]
    if src is None:
        return eq["note"]
    return f"{src['name']}, {src['year']}, {src['url']}"


# -- the report ----------------------------------------------------------------------

_STATUS_TEXT = {
    "final": "final",
    "provisional": ("provisional: some intervals used a forecast or the latest published intensity, "
                    "or had none yet; revised when realised values arrive"),
}


def _intensity_range(series: list[dict[str, Any]]) -> str | None:
    if not series:
        return None
    values = [b["g_per_kwh"] for b in series if b.get("g_per_kwh") is not None]
    provisional = sum(1 for b in series if b.get("intensity_status") == "provisional")
    missing = sum(1 for b in series if b.get("g_per_kwh") is None)
    parts = []
    if values:
        parts.append(f"range {fmt_sig(min(values))}-{fmt_sig(max(values))} gCO2e/kWh over {len(series)} bucket(s)")
    else:
        parts.append(f"{len(series)} bucket(s)")
    if provisional:
        parts.append(f"{provisional} provisional")
    if missing:
        parts.append(f"{missing} without intensity yet")
    return ", ".join(parts)


OCCUPANCY_UNITS = {"cpu": "socket-s", "dram": "GB-s", "platform": "server-s"}


def _lifecycle_lines(job: dict[str, Any]) -> list[str]:
    """The lifecycle section: embodied, operational, SCI, market-based, water, then
    (single-job view) the occupancy and each factor with its unit and source."""
    w = TEXT_WIDTH
    out = [
        "Lifecycle",
        (f"  embodied      {fmt_mass_g(job['embodied_co2e_g'])} CO2e (device manufacturing, amortised over the "
         "service life, by the device-time the job occupied)"),
        f"  operational   {fmt_mass_g(job['co2e_g'])} CO2e (location-based, as above)",
        (f"  SCI           {fmt_mass_g(job.get('sci_g', job['co2e_g'] + job['embodied_co2e_g']))} CO2e "
         "(operational + embodied)"),
        (f"  market-based  {fmt_mass_g(job.get('co2e_market_g', 0.0))} CO2e (contractual instruments; "
         "location-based where none)"),
        f"  water         {fmt_sig(job.get('water_l', 0.0))} L (on-site WUE + off-site EWIF x PUE)",
    ]
    occupancy = job.get("occupancy_s") or {}
    if occupancy:
        out.append("  occupancy")
        for item, seconds in occupancy.items():
            unit = OCCUPANCY_UNITS.get(item, "board-s")
            out.append(f"    {printable(str(item), 60):<40} {fmt_sig(float(seconds)):>10} {unit}")
    elif "occupancy_s" in job:
        out.append("  occupancy     none stored (a job booked before lifecycle accounting: embodied 0)")
    factors = job.get("factors") or []
    if factors:
        out.append("  factors")
        for f in factors:
            mark = " [class default: model not in the data file]" if f.get("default") else ""
            out.append(f"    {printable(str(f.get('name', '')), 60):<40} {fmt_sig(float(f.get('value', 0.0))):>10} "
                       f"{printable(str(f.get('unit', '')), 20)}{mark}")
            out.append(f"      {printable(str(f.get('source', '')), w)} (version "
                       f"{printable(str(f.get('version', '')), 40)})")
    return out


def format_report(job: dict[str, Any], series: list[dict[str, Any]] | None = None,
                  hint: dict[str, Any] | None = None) -> str:
    """A readable plain-text report of one job object; ends with a newline.

    ``series`` (the job's buckets, optional) adds the range of intensities used;
    ``hint`` = ``{"window_start", "co2e_g", "g_per_kwh", "saving_g"}`` adds a
    carbon-aware hint block (nothing when None)."""
    w = TEXT_WIDTH
    lines: list[str] = []
    add = lines.append

    add(f"Job {printable(str(job['id']), w)}")
    add(f"  label    {printable(job.get('label') or '', w) or '-'}")
    if job.get("label_sanitised"):
        why = job.get("label_note") or label_note(job)
        add(f"  as set   {printable(str(job.get('label_raw', '')), w)} ({printable(str(why), w)})")
    add(f"  user     {printable(str(job.get('user', '')), w)}")
    add(f"  host     {printable(str(job.get('host', '')), w)}")
    add(f"  command  {printable(str(job.get('command', '')), w)}")
    add(f"  state    {printable(str(job['state']), 20)}")
    add(f"  started  {fmt_time(job['started_at'])}")
    ended = fmt_time(job.get("ended_at")) if job.get("ended_at") is not None else "- (still running)"
    add(f"  ended    {ended}")
    add(f"  duration {fmt_duration(job['duration_s'])} ({job['duration_s']:,.1f} s)")
    add("")

    energy_j: dict[str, float] = job["energy_j"]
    sources: dict[str, str] = job.get("energy_sources") or {}
    add(f"Energy    {'kWh':>12}  {'J':>10}  source")
    for comp in COMPONENTS:
        e_j = energy_j.get(comp, 0.0)
        src = sources.get(comp) or ("-" if e_j == 0 else "unknown")
        if comp == "other" and e_j > 0 and sources.get("node") not in (None, "none"):
            src = f"{src}, node from {sources['node']}"
        add(f"  {comp.upper():<6}  {fmt_sig(e_j / J_PER_KWH):>12}  {fmt_sig(e_j):>10}  {printable(str(src), 40)}")
    add(f"  {'total':<6}  {fmt_sig(job['energy_kwh']):>12}  {fmt_sig(energy_j.get('total', 0.0)):>10}"
        + (f"  ({fmt_energy_kwh(job['energy_kwh'])})" if job["energy_kwh"] >= 1e3 else ""))
    add(f"  note: {NODE_NOTE_WITH if sources.get('node') not in (None, 'none') else NODE_NOTE_WITHOUT}")
    add("")

    status = str(job.get("co2e_status", ""))
    add(f"CO2e          {fmt_mass_g(job['co2e_g'])} ({_STATUS_TEXT.get(status, printable(status, 20))})")
    avg = job.get("intensity_g_per_kwh_avg")
    zone = printable(str(job.get("zone") or ""), 64) or "-"
    avg_text = f"{fmt_sig(avg)} gCO2e/kWh average" if avg is not None else "no average (no energy yet)"
    add(f"  intensity   {avg_text}, zone {zone}, PUE {job.get('pue', 1.0):.2f}")
    if series:
        spread = _intensity_range(series)
        if spread:
            add(f"              {spread}")
    add(f"GPU time      {fmt_sig(job['gpu_seconds'] / 3600)} GPU-hours")
    add(f"Peak GPU mem  {job['peak_gpu_memory_bytes'] / BYTES_PER_GIB:.2f} GiB")
    cost = job.get("cost") or {}
    currency = printable(str(cost.get("currency", "")), 8)
    price = float(cost.get("price_per_kwh") or 0.0)
    if price > 0:
        add(f"Cost          {fmt_money(cost['amount'])} {currency} at {price:g} {currency}/kWh"
            + (f" x PUE {job.get('pue', 1.0):.2f}" if job.get("pue", 1.0) != 1.0 else ""))
    else:
        add("Cost          not configured ([accounting] price_per_kwh)")
    add("")

    if "embodied_co2e_g" in job:
        lines.extend(_lifecycle_lines(job))
        add("")

    add("Everyday equivalents (approximate)")
    for eq in equivalents(job["energy_kwh"], job["co2e_g"]):
        add(f"  {fmt_sig(eq['count']):>10}  {eq['text']}")
        add(f"  {'':>10}  ({_source_line(eq)})")
    if job.get("sci_g") and job["sci_g"] != job["co2e_g"]:
        add(f"  with embodied carbon (SCI, {fmt_mass_g(job['sci_g'])}):")
        for eq in equivalents(job["energy_kwh"], job["sci_g"]):
            if eq["basis"] == "gCO2e":
                add(f"  {fmt_sig(eq['count']):>10}  {eq['text']}")

    if hint is not None:
        add("")
        add("Carbon-aware hint")
        saving = (f"{fmt_mass_g(hint['saving_g'])} less" if hint["saving_g"] > 0 else "no saving")
        add(f"  Started at {fmt_time(hint['window_start'])}, this job would have emitted about "
            f"{fmt_mass_g(hint['co2e_g'])} CO2e ({fmt_sig(hint['g_per_kwh'])} gCO2e/kWh): {saving}.")
    return "\n".join(lines) + "\n"
