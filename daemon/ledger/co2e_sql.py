"""The CO2e of jobs as SQL over the store, shared by the writer (settlement, retention)
and the reader.

CO2e is never stored as a number that could go stale: it is Σ slot energy x slot
intensity / J_PER_KWH (grams before PUE, ``gj``; ``carbon.co2e_g`` summed in SQL, with
the same constant) over the provider intervals ("slots") each bucket's energy fell
in, plus ``jobs.pruned_co2e_g`` for buckets retention deleted. PUE is applied by the
caller.
"""

from __future__ import annotations

import sqlite3

from ..carbon import J_PER_KWH

# J_PER_KWH as an SQL literal ("3600000.0"): a float written by repr reads back exactly.
PER_KWH_SQL = repr(float(J_PER_KWH))

# Where a job's energy per slot and the slot values come from. A store of schema 2
# (read as it is, before a daemon migrated it) has one value per bucket: each bucket
# is then its own single slot, exactly how the migration turns it into schema 3.
SLOTS = {True: "job_slots", False: "(SELECT job_id, bucket_start, bucket_start AS slot_start, "
                                   "SUM(energy_j) AS energy_j FROM job_buckets GROUP BY job_id, bucket_start)"}
SLOT_VALUES = {True: "bucket_intensity", False: "(SELECT bucket_start, bucket_start AS slot_start, g_per_kwh, "
                                                "status, provider, zone, basis FROM bucket_intensity)"}

_JOB_CO2E_SQL = """
SELECT j.id AS job_id,
       {pruned} + COALESCE(SUM(s.energy_j * COALESCE(i.g_per_kwh, 0)), 0) / {per_kwh} AS gj,
       COALESCE(SUM(CASE WHEN i.g_per_kwh IS NULL THEN s.energy_j ELSE 0 END), 0) AS no_intensity_j,
       COALESCE(SUM(CASE WHEN i.status = 'provisional' THEN 1 ELSE 0 END), 0) AS provisional,
       GROUP_CONCAT(DISTINCT i.zone) AS zones
FROM jobs j
LEFT JOIN {slots} s ON s.job_id = j.id
LEFT JOIN {values} i ON i.bucket_start = s.bucket_start AND i.slot_start = s.slot_start
WHERE j.id IN ({marks})
GROUP BY j.id
""".replace("{per_kwh}", PER_KWH_SQL)


def co2e_rows(conn: sqlite3.Connection, job_ids: list[str], pruned: bool = True,
              slots: bool = True) -> dict[str, sqlite3.Row]:
    """CO2e figures per job (``gj``: grams before PUE; ``no_intensity_j``: energy
    without an intensity; ``provisional``: provisional slots; ``zones``), one row for
    every known job."""
    out: dict[str, sqlite3.Row] = {}
    template = (_JOB_CO2E_SQL.replace("{pruned}", "j.pruned_co2e_g" if pruned else "0.0")
                .replace("{slots}", SLOTS[slots]).replace("{values}", SLOT_VALUES[slots]))
    for i in range(0, len(job_ids), 500):
        chunk = job_ids[i : i + 500]
        sql = template.format(marks=",".join("?" * len(chunk)))
        for row in conn.execute(sql, chunk):
            out[row["job_id"]] = row
    return out
