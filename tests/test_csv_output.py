"""``wattprint jobs --format csv`` and ``report --format csv`` (issue 17 item 4): one row
per job, parsed with Python's csv module, matching the HTTP API within rounding (ISO
8601 times, kWh, kg CO2e); every column documented in docs/api.md with a CodeCarbon
mapping; untrusted text cannot become a spreadsheet formula; large figures in reports
in kg / t and MWh."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from daemon_harness import DaemonProcess, wait_ticks
from gpusim import gpu, proc, write_sim
from processes import Processes
from wattprint.daemon.csvout import CODECARBON, HEADER, job_row
from wattprint.daemon.report import format_report

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI; stdout and stderr decoded as UTF-8 with line ends kept as written."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_")}
    result = subprocess.run([sys.executable, "-m", "wattprint.daemon", *args], capture_output=True,
                            timeout=60, env={**base, **(env or {})})
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode("utf-8"),
                                       result.stderr.decode("utf-8"))


def parse(text: str) -> list[dict[str, str]]:
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert tuple(rows[0]) == HEADER
    return [dict(zip(HEADER, r)) for r in rows[1:]]


def assert_row_matches(row: dict[str, str], job: dict[str, Any]) -> None:
    assert row["job_id"] == job["id"] and row["user"] == job["user"]
    # docs/api.md: text starting with = + - @ gets a leading ' for spreadsheets
    assert row["label"] == ("'" + job["label"] if job["label"][:1] in "=+-@" and job["label"] else job["label"])
    assert datetime.fromisoformat(row["started_at"]).timestamp() == pytest.approx(job["started_at"], abs=1e-5)
    if job["ended_at"] is None:
        assert row["ended_at"] == ""
    else:
        assert datetime.fromisoformat(row["ended_at"]).timestamp() == pytest.approx(job["ended_at"], abs=1e-5)
    assert float(row["duration_s"]) == pytest.approx(job["duration_s"], abs=1e-3)
    assert float(row["energy_kwh"]) == pytest.approx(job["energy_kwh"], abs=1e-9)
    for comp in ("gpu", "cpu", "dram"):
        assert float(row[f"{comp}_energy_kwh"]) == pytest.approx(job["energy_j"][comp] / 3.6e6, abs=1e-9)
    assert float(row["co2e_kg"]) == pytest.approx(job["co2e_g"] / 1000, abs=1e-9)
    assert row["co2e_status"] == job["co2e_status"] and row["zone"] == job["zone"]
    assert float(row["gpu_hours"]) == pytest.approx(job["gpu_seconds"] / 3600, abs=1e-6)


@pytest.mark.slow
def test_jobs_and_report_csv_match_the_api(tmp_path: Path, labelled_process: Processes) -> None:
    # "@..." is a legal label that a spreadsheet would take for a formula.
    procs = {label: labelled_process(label) for label in ("csv-train", "@csv-eval")}
    sim = write_sim(tmp_path / "sim.json", [gpu(0, 300.0, processes=[proc(procs["csv-train"].pid, sm_util=80),
                                                                      proc(procs["@csv-eval"].pid, sm_util=20)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None)
    try:
        daemon.start()
        for label in procs:
            daemon.wait_for_job(label)
        wait_ticks(daemon, 3)
        labelled_process.end(procs["csv-train"])  # one finished, one still running
        wait_ticks(daemon, 2)

        cfg = ("--url", daemon.url)
        out = run_cli("jobs", "--format", "csv", *cfg)
        assert out.returncode == 0, out.stderr
        assert out.stdout.endswith("\r\n") and "\r\r\n" not in out.stdout
        rows = {r["job_id"]: r for r in parse(out.stdout)}
        api = {j["id"]: j for j in daemon.get("/api/v1/jobs")["jobs"]}
        ours = {jid: j for jid, j in api.items() if j["label"] in ("csv-train", "@csv-eval")}
        assert len(ours) == 2 and set(ours) <= set(rows)
        for jid, job in ours.items():
            # a running job's duration grows between the two reads: compare those loosely
            assert_row_matches(rows[jid], job if job["state"] == "finished" else
                               {**job, "duration_s": float(rows[jid]["duration_s"])})
        by_label = {j["label"]: j for j in ours.values()}
        assert by_label["csv-train"]["state"] == "finished" and by_label["csv-train"]["energy_kwh"] > 0
        # Text that would start a formula is quoted for spreadsheets: "'@csv-eval" shown,
        # the label itself unchanged in the API.
        assert rows[by_label["@csv-eval"]["id"]]["label"] == "'@csv-eval"

        rep = run_cli("report", "csv-train", "--format", "csv", *cfg)
        assert rep.returncode == 0, rep.stderr
        [row] = parse(rep.stdout)
        assert_row_matches(row, daemon.get(f"/api/v1/jobs/{by_label['csv-train']['id']}"))
    finally:
        for p in procs.values():
            labelled_process.end(p)
        daemon.stop()

    # No daemon answering: the same rows from the store.
    finished = by_label["csv-train"]
    out = run_cli("jobs", "--format", "csv", "--config", str(daemon.config_path))
    assert out.returncode == 0, out.stderr
    rows = {r["job_id"]: r for r in parse(out.stdout)}
    assert_row_matches(rows[finished["id"]], finished)


def test_every_csv_column_and_the_codecarbon_mapping_are_documented() -> None:
    api_md = (ROOT / "docs" / "api.md").read_text()
    for column in HEADER:
        assert f"| `{column}` |" in api_md, column
    for cc_column, _ in CODECARBON:
        assert cc_column in api_md, cc_column


def test_untrusted_text_cannot_start_a_formula() -> None:
    job = {"id": "1-2", "label": "-x", "user": "=cmd|' /C calc'!A0", "host": "+h", "command": "\tt",
           "state": "finished", "started_at": 0.0, "ended_at": 1.0, "duration_s": 1.0, "energy_kwh": 0.0,
           "energy_j": {}, "co2e_g": 0.0, "co2e_status": "final", "zone": "DK1"}
    row = dict(zip(HEADER, job_row(job)))
    assert (row["label"], row["user"], row["host"], row["command"]) == ("'-x", "'=cmd|' /C calc'!A0", "'+h", "'\tt")
    assert row["started_at"] == "1970-01-01T00:00:00+00:00"


def _job(energy_kwh: float, co2e_g: float) -> dict[str, Any]:
    return {"id": "1-2", "label": "big", "user": "u", "host": "h", "command": "c", "state": "finished",
            "started_at": 0.0, "ended_at": 3600.0, "duration_s": 3600.0, "energy_kwh": energy_kwh,
            "energy_j": {"gpu": energy_kwh * 3.6e6, "total": energy_kwh * 3.6e6}, "co2e_g": co2e_g,
            "co2e_status": "final", "zone": "DK1", "gpu_seconds": 0.0, "peak_gpu_memory_bytes": 0}


@pytest.mark.parametrize("kwh, grams, energy_text, co2e_text", [
    (0.694, 57.26, None, "57.3 g"),
    (150.0, 12_345.0, None, "12.3 kg"),
    (12_340.0, 4_567_000.0, "(12.3 MWh)", "4.57 t"),
])
def test_large_figures_in_reports_use_kg_t_and_mwh(kwh: float, grams: float, energy_text: str | None,
                                                  co2e_text: str) -> None:
    text = format_report(_job(kwh, grams))
    assert f"CO2e          {co2e_text} (final)" in text
    total = next(line for line in text.splitlines() if line.startswith("  total"))
    assert (energy_text in total) if energy_text else ("Wh)" not in total)
