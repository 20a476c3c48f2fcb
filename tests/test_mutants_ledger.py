"""The job book's read side field by field (daemon/ledger/, daemon/api_views.py: ``LedgerReader.job``,
``job_series``, ``host_totals``, ``Ledger.bucket_job_energy`` / ``job_co2e_g``), found
unguarded by mutation testing (issue 13, scripts/mutation.sh). The test books ticks
with the Ledger directly (known joules, known slot values) and compares whole answers
with figures computed here: CO2e = Σ slot energy x slot value / 3.6e6 x PUE, the
bucket's intensity the energy-weighted mean, the least sure basis, the status
``final`` only when every slot of the bucket has a final value."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest

from wattprint.daemon.api_views import job_json
from wattprint.daemon.ledger import Intensity, JobTick, Ledger, LedgerReader
from wattprint.daemon.procs import JobIdentity
from wattprint.daemon.slurm import SlurmJob

J_PER_KWH = 3.6e6
B0 = 1_795_003_200  # a minute boundary; buckets of 60 s
PUE, PRICE = 1.25, 0.3

A = JobIdentity(job_id="101-1", label="job_a", label_source="WATTPRINT_JOB", uid=1000, user="ann",
                command="python train.py", root_pid=101, started_at=B0 - 40.0, label_raw="job/a")
B = JobIdentity(job_id="102-1", label="job-b", label_source="SLURM", uid=1001, user="bob",
                command="ffmpeg", root_pid=102, started_at=B0 + 1.0, label_raw="job-b")
# C: a final value for some energy, none for the rest; D: no energy at all; E: half a
# joule; S: a Slurm job with three steps.
C = JobIdentity(job_id="103-1", label="job-c", label_source="WATTPRINT_JOB", uid=1002, user="cy",
                command="c", root_pid=103, started_at=B0, label_raw="job-c")
D = JobIdentity(job_id="104-1", label="job-d", label_source="WATTPRINT_JOB", uid=1002, user="cy",
                command="d", root_pid=104, started_at=B0, label_raw="job-d")
E = JobIdentity(job_id="105-1", label="job-e", label_source="WATTPRINT_JOB", uid=1002, user="cy",
                command="e", root_pid=105, started_at=B0, label_raw="job-e")
S = JobIdentity(job_id="slurm-77", label="77", label_source="SLURM_JOB_ID", uid=1003, user="sue",
                command="srun", root_pid=106, started_at=B0, label_raw="77",
                slurm=SlurmJob(job_id="77", name="77_3", array_job_id="77", array_task_id="3", partition="gpu",
                               user="sue"))


def val(g: float, status: str, provider: str, zone: str, basis: str, start: float, end: float) -> Intensity:
    return Intensity(g, status, provider, zone, basis, float(start), float(end))


def tick(led: Ledger, wall: float, jobs: dict[JobIdentity, dict[str, float]], intensity: Intensity | None,
         device_j: list[tuple[str, str, float, str]] = (), unattributed: dict[str, float] | None = None,
         ended: list[tuple[str, float]] = (), gpu_seconds: float = 1.0, mem: int = 0,
         steps: frozenset[str] = frozenset()) -> None:
    led.record_tick(wall, [JobTick(identity=j, energy_j=e, gpu_seconds=gpu_seconds, gpu_memory_bytes=mem,
                                   sources={c: "counter" for c in e}, steps=steps)
                           for j, e in jobs.items()],
                    device_j, unattributed or {}, intensity, ended)


def book(path: str) -> None:
    """Bucket B0: two slots (actual 100 in [B0, B0+30), forecast 300 in [B0+30, B0+60),
    different providers and zones); B0+60: no value; B0+120: a slot without a value
    and one with (actual 50); B0+180: bases latest and an unknown one; B0+240: 0.5 J."""
    led = Ledger(path, "host-1", 60)
    tick(led, B0 + 10, {A: {"gpu": 36000.0, "cpu": 3600.0, "dram": 0.0}, B: {"gpu": 7200.0}},
         val(100.0, "final", "p1", "Z1", "actual", B0, B0 + 30),
         device_j=[("gpu", "gpu0", 50000.0, "counter"), ("cpu", "package-0", 4000.0, "power")],
         unattributed={"dram": 0.0, "gpu": 6800.0, "cpu": 400.0}, mem=5 << 30)  # a zero first: skipped
    tick(led, B0 + 35, {A: {"gpu": 18000.0}}, val(300.0, "provisional", "p2", "Z2", "forecast", B0 + 30, B0 + 60),
         device_j=[("gpu", "gpu0", 18000.0, "counter"), ("gpu", "gpu1", 100.0, "estimate")], mem=3 << 30)
    tick(led, B0 + 65, {A: {"gpu": 3600.0}}, None, ended=[(B.job_id, B0 + 61.5)])
    tick(led, B0 + 125, {A: {"gpu": 1000.0}}, None)
    tick(led, B0 + 155, {A: {"gpu": 2000.0}}, val(50.0, "final", "p1", "Z1", "actual", B0 + 150, B0 + 180))
    tick(led, B0 + 185, {A: {"gpu": 900.0}}, val(40.0, "provisional", "p1", "Z1", "latest", B0 + 180, B0 + 210))
    tick(led, B0 + 215, {A: {"gpu": 100.0}}, val(20.0, "provisional", "p1", "Z1", "zzz", B0 + 210, B0 + 240))
    tick(led, B0 + 245, {A: {"dram": 0.5}}, val(10.0, "final", "p1", "Z1", "actual", B0 + 240, B0 + 300))
    # Jobs C, D, E, S in later buckets (no device or unattributed rows).
    tick(led, B0 + 312, {C: {"cpu": 720.0}, D: {}, E: {"cpu": 0.5}},
         val(100.0, "final", "p1", "Z1", "actual", B0 + 300, B0 + 330))
    tick(led, B0 + 370, {C: {"cpu": 0.5}}, None)  # bucket B0+360 has no value: 0.5 J without intensity
    tick(led, B0 + 313, {S: {"gpu": 10.0}}, None, steps=frozenset({"1", "batch", "0"}))
    tick(led, B0 + 314, {S: {"gpu": 10.0}}, None, steps=frozenset({"10", "1"}))
    led.close()


def grams(*slots: tuple[float, float]) -> float:
    return sum(j * g for j, g in slots) / J_PER_KWH


A_GJ = grams((39600.0, 100.0), (18000.0, 300.0), (2000.0, 50.0), (900.0, 40.0), (100.0, 20.0), (0.5, 10.0))
A_J = {"gpu": 36000.0 + 18000.0 + 3600.0 + 1000.0 + 2000.0 + 900.0 + 100.0, "cpu": 3600.0, "dram": 0.5}
A_TOTAL = sum(A_J.values())


def test_job_answer_field_by_field(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    book(path)
    reader = LedgerReader(path, pue=PUE, price_per_kwh=PRICE, currency="DKK")
    try:
        now = B0 + 400.0
        a = reader.job(A.job_id, now=now)
        fp = reader.footprint  # the shipped factors: no occupancy stored, no [market]

        def lifecycle(total_j: float, co2e_g: float) -> dict:
            return {"embodied_co2e_g": 0.0, "co2e_market_g": pytest.approx(co2e_g, rel=1e-12),
                    "water_l": pytest.approx(total_j / J_PER_KWH * (fp.wue.value + PUE * fp.ewif.value), rel=1e-12),
                    "sci_g": pytest.approx(co2e_g, rel=1e-12), "occupancy_s": {},
                    "factors": [f.as_dict() for f in (fp.service_life, fp.wue, fp.ewif)]}

        assert a == {
            "id": A.job_id, "label": "job_a", "label_raw": "job/a", "label_sanitised": True,
            "label_source": "WATTPRINT_JOB", "host": "host-1", "user": "ann", "uid": 1000,
            "command": "python train.py", "root_pid": 101, "state": "running", "started_at": B0 - 40.0,
            "ended_at": None, "last_seen": B0 + 245, "duration_s": now - (B0 - 40.0),
            "energy_j": {**A_J, "other": 0.0, "total": A_TOTAL}, "energy_kwh": A_TOTAL / J_PER_KWH,
            "energy_sources": {"gpu": "counter", "cpu": "counter", "dram": "counter", "node": "none"},
            "co2e_g": pytest.approx(A_GJ * PUE, rel=1e-12), "co2e_status": "provisional",
            "intensity_g_per_kwh_avg": pytest.approx(A_GJ / (A_TOTAL / J_PER_KWH), rel=1e-12),
            "zone": "Z1,Z2", "pue": PUE, "gpu_seconds": 8.0, "peak_gpu_memory_bytes": 5 << 30,
            "cost": {"amount": pytest.approx(A_TOTAL / J_PER_KWH * PUE * PRICE, rel=1e-12), "currency": "DKK",
                     "price_per_kwh": PRICE},
            "slurm": None, **lifecycle(A_TOTAL, A_GJ * PUE),
        }
        b = reader.job(B.job_id, now=now)
        b_gj = grams((7200.0, 100.0))
        assert b == {
            "id": B.job_id, "label": "job-b", "label_raw": "job-b", "label_sanitised": False,
            "label_source": "SLURM", "host": "host-1", "user": "bob", "uid": 1001, "command": "ffmpeg",
            "root_pid": 102, "state": "finished", "started_at": B0 + 1.0, "ended_at": B0 + 61.5,
            "last_seen": B0 + 10, "duration_s": 60.5, "energy_j": {"gpu": 7200.0, "cpu": 0.0, "dram": 0.0,
                                                                 "other": 0.0, "total": 7200.0},
            "energy_kwh": 7200.0 / J_PER_KWH, "energy_sources": {"gpu": "counter", "node": "none"},
            "co2e_g": pytest.approx(b_gj * PUE, rel=1e-12), "co2e_status": "final",
            "intensity_g_per_kwh_avg": pytest.approx(100.0, rel=1e-12), "zone": "Z1", "pue": PUE,
            "gpu_seconds": 1.0, "peak_gpu_memory_bytes": 5 << 30,
            "cost": {"amount": pytest.approx(7200.0 / J_PER_KWH * PUE * PRICE, rel=1e-12), "currency": "DKK",
                     "price_per_kwh": PRICE},
            "slurm": None, **lifecycle(7200.0, b_gj * PUE),
        }
    finally:
        reader.close()


def test_duration_of_a_finished_job_without_end_and_sources_left_empty(tmp_path):
    """A finished job with no ended_at runs until it was last seen; a running one until
    now. A NULL/empty sources column reads as {}. A job without a CO2e row is 0 g."""
    path = str(tmp_path / "s.sqlite3")
    book(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE jobs SET ended_at = NULL, sources = '' WHERE id = ?", (B.job_id,))
    conn.commit()
    conn.close()
    reader = LedgerReader(path, pue=PUE)
    try:
        b = reader.job(B.job_id, now=B0 + 999.0)
        assert (b["state"], b["ended_at"], b["duration_s"]) == ("finished", None, (B0 + 10) - (B0 + 1.0))
        assert b["energy_sources"] == {"node": "none"}  # no component source; no node share
        rec = reader.job_record(B.job_id)
        assert rec is not None
        no_co2 = job_json(dataclasses.replace(rec, carbon=None), B0 + 999.0, PUE, 0.0, "EUR")
        assert (no_co2["co2e_g"], no_co2["co2e_status"], no_co2["zone"]) == (0.0, "final", "")
        assert no_co2["intensity_g_per_kwh_avg"] == 0.0
    finally:
        reader.close()


def test_job_series_carbon_per_bucket(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    book(path)
    reader = LedgerReader(path, pue=PUE)
    try:
        series = reader.job_series(A.job_id)
    finally:
        reader.close()

    def energy(gpu=0.0, cpu=0.0, dram=0.0):
        return {"gpu": gpu, "cpu": cpu, "dram": dram, "other": 0.0, "total": gpu + cpu + dram}

    b0_gj = grams((39600.0, 100.0), (18000.0, 300.0))
    assert series == [
        {"start": B0, "energy_j": energy(gpu=54000.0, cpu=3600.0),
         "g_per_kwh": pytest.approx(b0_gj * J_PER_KWH / 57600.0, rel=1e-12), "intensity_status": "provisional",
         "intensity_provider": "p1,p2", "intensity_zone": "Z1,Z2", "intensity_basis": "forecast",
         "co2e_g": pytest.approx(b0_gj * PUE, rel=1e-12)},
        {"start": B0 + 60, "energy_j": energy(gpu=3600.0), "g_per_kwh": None, "intensity_status": "missing",
         "intensity_provider": None, "intensity_zone": None, "intensity_basis": None, "co2e_g": 0.0},
        # the slot without a value comes first: the bucket is provisional, the mean is of the valued slot
        {"start": B0 + 120, "energy_j": energy(gpu=3000.0), "g_per_kwh": 50.0, "intensity_status": "provisional",
         "intensity_provider": "p1", "intensity_zone": "Z1", "intensity_basis": "actual",
         "co2e_g": pytest.approx(grams((2000.0, 50.0)) * PUE, rel=1e-12)},
        # an unknown basis is the least sure of all, below "latest"
        {"start": B0 + 180, "energy_j": energy(gpu=1000.0), "g_per_kwh": pytest.approx(38.0, rel=1e-12),
         "intensity_status": "provisional", "intensity_provider": "p1", "intensity_zone": "Z1",
         "intensity_basis": "zzz", "co2e_g": pytest.approx(grams((900.0, 40.0), (100.0, 20.0)) * PUE, rel=1e-12)},
        # half a joule still has an intensity
        {"start": B0 + 240, "energy_j": energy(dram=0.5), "g_per_kwh": 10.0, "intensity_status": "final",
         "intensity_provider": "p1", "intensity_zone": "Z1", "intensity_basis": "actual",
         "co2e_g": pytest.approx(grams((0.5, 10.0)) * PUE, rel=1e-12)},
    ]


def test_host_totals_per_device_and_component(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    book(path)
    reader = LedgerReader(path)
    try:
        assert reader.host_totals() == {
            "devices": [{"kind": "cpu", "device": "package-0", "energy_j": 4000.0, "source": "power"},
                        {"kind": "gpu", "device": "gpu0", "energy_j": 68000.0, "source": "counter"},
                        {"kind": "gpu", "device": "gpu1", "energy_j": 100.0, "source": "estimate"}],
            "device_energy_j": {"gpu": 68100.0, "cpu": 4000.0, "dram": 0.0, "other": 0.0},
            "attributed_energy_j": {"gpu": A_J["gpu"] + 7200.0 + 20.0, "cpu": 3600.0 + 721.0, "dram": 0.5,
                                    "other": 0.0},
            "unattributed_energy_j": {"gpu": 6800.0, "cpu": 400.0, "dram": 0.0, "other": 0.0},
            "node_energy_j": 0.0,
        }
    finally:
        reader.close()


def test_bucket_job_energy_and_job_co2e_over_more_than_one_chunk(tmp_path):
    """Settlement's queries take their lists in chunks of 500: the 501st entry counts
    once, like the first."""
    path = str(tmp_path / "s.sqlite3")
    book(path)
    led = Ledger(path, "host-1", 60)
    try:
        empty = [B0 - 60 * (k + 1) for k in range(500)]  # buckets with nothing booked
        rows = led.bucket_job_energy(empty + [B0, B0 + 120])
        b0_a = grams((39600.0, 100.0), (18000.0, 300.0))
        assert sorted(rows, key=lambda r: (r["bucket_start"], r["job_id"])) == [
            {"job_id": A.job_id, "label": "job_a", "user": "ann", "uid": 1000, "bucket_start": B0,
             "energy_j": 57600.0, "gj": pytest.approx(b0_a, rel=1e-12),
             "g_per_kwh": pytest.approx(b0_a * J_PER_KWH / 57600.0, rel=1e-12), "status": "provisional"},
            {"job_id": B.job_id, "label": "job-b", "user": "bob", "uid": 1001, "bucket_start": B0,
             "energy_j": 7200.0, "gj": pytest.approx(grams((7200.0, 100.0)), rel=1e-12), "g_per_kwh": 100.0,
             "status": "final"},
            {"job_id": A.job_id, "label": "job_a", "user": "ann", "uid": 1000, "bucket_start": B0 + 120,
             "energy_j": 3000.0, "gj": pytest.approx(grams((2000.0, 50.0)), rel=1e-12), "g_per_kwh": 50.0,
             "status": "provisional"},
        ]
        assert led.bucket_job_energy([B0 + 60]) == [
            {"job_id": A.job_id, "label": "job_a", "user": "ann", "uid": 1000, "bucket_start": B0 + 60,
             "energy_j": 3600.0, "gj": 0.0, "g_per_kwh": None, "status": "provisional"}]
        # half a joule with a value has an intensity
        [tiny] = led.bucket_job_energy([B0 + 240])
        assert tiny["g_per_kwh"] == pytest.approx(10.0, rel=1e-12)
        ids = [f"none-{k}" for k in range(1001)]
        ids[500], ids[1000] = A.job_id, B.job_id  # the first entry of the 2nd and of the 3rd chunk
        assert led.job_co2e_g(ids, 2.0) == {A.job_id: pytest.approx(A_GJ * 2.0, rel=1e-12),
                                            B.job_id: pytest.approx(grams((7200.0, 100.0)) * 2.0, rel=1e-12)}
    finally:
        led.close()


def test_reader_of_a_store_without_the_pruned_column_then_with_it(tmp_path):
    """A schema-1 store (no jobs.pruned_co2e_g): the reader sums the slots alone; once
    a daemon has added the column and retention folded buckets into it, the same
    reader counts the folded grams (it looks for the column again)."""
    path = str(tmp_path / "s.sqlite3")
    book(path)
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE jobs DROP COLUMN pruned_co2e_g")
    conn.commit()
    conn.close()
    reader = LedgerReader(path, pue=1.0)
    try:
        assert reader.job(B.job_id, now=B0 + 999.0)["co2e_g"] == pytest.approx(grams((7200.0, 100.0)), rel=1e-12)
        led = Ledger(path, "host-1", 60)  # schema 1 -> 2 adds the column
        led.prune(B0 + 60)  # folds bucket B0 into pruned_co2e_g and deletes it
        led.close()
        assert reader.job(B.job_id, now=B0 + 999.0)["co2e_g"] == pytest.approx(grams((7200.0, 100.0)), rel=1e-12)
        assert reader.job(A.job_id, now=B0 + 999.0)["co2e_g"] == pytest.approx(A_GJ, rel=1e-12)
    finally:
        reader.close()


def test_slot_of_edges():
    led_cls = Ledger.__new__(Ledger)
    led_cls.bucket_s = 60
    # A value whose end is missing holds for the whole bucket.
    assert led_cls.slot_of(B0 + 10, Intensity(1.0, "final", "p", "z", "actual", float(B0), None)) == (B0, B0 + 60)
    assert led_cls.slot_of(B0 + 10, Intensity(1.0, "final", "p", "z", "actual", None, float(B0 + 30))) == (B0, B0 + 60)
    # A tick exactly at the value's end is not in it: the whole bucket.
    assert led_cls.slot_of(B0 + 30, Intensity(1.0, "final", "p", "z", "actual", float(B0), float(B0 + 30))) == (B0, B0 + 60)
    assert led_cls.slot_of(B0 + 29.5, Intensity(1.0, "final", "p", "z", "actual", float(B0), float(B0 + 30))) == (B0, B0 + 30)


def test_no_intensity_energy_zero_and_tiny_jobs_and_slurm(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    book(path)
    reader = LedgerReader(path, pue=1.0)
    try:
        now = B0 + 400.0
        c = reader.job(C.job_id, now=now)
        # 720 J at a final 100 g/kWh, 0.5 J with no value: the CO2e counts what has a value
        # and stays provisional while some energy has none.
        assert c["co2e_g"] == pytest.approx(grams((720.0, 100.0)), rel=1e-12)
        assert c["co2e_status"] == "provisional"
        assert c["intensity_g_per_kwh_avg"] == pytest.approx(grams((720.0, 100.0)) / (720.5 / J_PER_KWH))
        d = reader.job(D.job_id, now=now)
        assert (d["energy_j"]["total"], d["co2e_g"], d["intensity_g_per_kwh_avg"], d["co2e_status"]) == (
            0.0, 0.0, None, "final")
        assert d["zone"] == ""  # no slot, no zone
        e = reader.job(E.job_id, now=now)
        assert e["intensity_g_per_kwh_avg"] == pytest.approx(100.0, rel=1e-12)
        s = reader.job(S.job_id, now=now)
        assert s["slurm"] == {"job_id": "77", "name": "77_3", "array_job_id": "77", "array_task_id": "3",
                              "partition": "gpu", "user": "sue", "steps": ["batch", "0", "1", "10"]}
    finally:
        reader.close()


def test_duration_is_never_negative_and_may_be_under_a_second(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    book(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE jobs SET ended_at = started_at + 0.25 WHERE id = ?", (B.job_id,))
    conn.execute("UPDATE jobs SET ended_at = started_at - 5.0 WHERE id = ?", (C.job_id,))
    conn.commit()
    conn.close()
    reader = LedgerReader(path)
    try:
        assert reader.job(B.job_id, now=B0 + 999.0)["duration_s"] == 0.25
        assert reader.job(C.job_id, now=B0 + 999.0)["duration_s"] == 0.0
    finally:
        reader.close()


def test_host_totals_of_a_store_with_gpu_energy_only(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, "h", 60)
    tick(led, B0 + 1, {A: {"gpu": 40.0}}, None, device_j=[("gpu", "gpu0", 50.0, "counter")],
         unattributed={"gpu": 10.0})
    led.close()
    reader = LedgerReader(path)
    try:
        assert reader.host_totals() == {
            "devices": [{"kind": "gpu", "device": "gpu0", "energy_j": 50.0, "source": "counter"}],
            "device_energy_j": {"gpu": 50.0, "cpu": 0.0, "dram": 0.0, "other": 0.0},
            "attributed_energy_j": {"gpu": 40.0, "cpu": 0.0, "dram": 0.0, "other": 0.0},
            "unattributed_energy_j": {"gpu": 10.0, "cpu": 0.0, "dram": 0.0, "other": 0.0},
            "node_energy_j": 0.0,
        }
    finally:
        reader.close()
