"""InfluxSink and the line encoder against a real influxd (InfluxDB 1.x from the harness):
ticks arrive with the right totals; an outage leaves no gap and no duplicate; a sink
restarted (cleanly, or after SIGKILL) over the same spool replays what was not
delivered; hostile labels round-trip as exactly one series and never inject a point."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from servers import InfluxServer

from wattprint.daemon.config import InfluxConfig
from wattprint.daemon.health import HealthBoard
from wattprint.daemon.model import DeviceReading, JobRef, TickRecord
from wattprint.exporters import lineprotocol as lp
from wattprint.exporters.influx import HEALTH_PART, InfluxSink
from wattprint.exporters.influx_points import tick_to_lines

pytestmark = pytest.mark.slow

DB = "wattprint"
HOST = "node-1"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
DEVICES = (("gpu", "gpu0", 250.0), ("gpu", "gpu1", 200.0), ("cpu", "package-0", 60.0), ("dram", "dram-0", 6.0))
JOBS = {
    "100-1700000000": JobRef(job_id="100-1700000000", label="lora-7b", user="alice", uid=1000),
    "200-1700000000": JobRef(job_id="200-1700000000", label="", user="bob", uid=1001),
}


def tick(i: int, jobs: dict[str, JobRef] = JOBS) -> TickRecord:
    """Tick ``i`` at T0 + i s: every device's energy is split evenly over the jobs, a
    quarter stays unattributed. Energies vary with i so sums are not trivial."""
    readings = tuple(
        DeviceReading(kind=kind, device=dev, energy_j=watts + i % 7, power_w=watts + i % 7, source="counter", interval_s=1.0)  # type: ignore[arg-type]
        for kind, dev, watts in DEVICES
    )
    per_kind: dict[str, float] = {}
    for r in readings:
        per_kind[r.kind] = per_kind.get(r.kind, 0.0) + r.energy_j
    share = 0.75 / max(1, len(jobs))
    job_energy = {job_id: {k: v * share for k, v in per_kind.items()} for job_id in jobs}
    unattributed = {k: v * 0.25 for k, v in per_kind.items()}
    return TickRecord(
        sampled_at=T0 + i, interval_s=1.0, readings=readings, jobs=jobs,
        job_energy_j=job_energy, unattributed_j=unattributed,
    )


def make_sink(server_url: str, spool_dir: Path, health: HealthBoard | None = None, **cfg: Any) -> InfluxSink:
    values: dict[str, Any] = dict(enabled=True, url=server_url, database=DB, batch_size=50, flush_interval_s=0.05, timeout_s=2.0)
    values.update(cfg)
    return InfluxSink(InfluxConfig(**values), str(spool_dir), health, backoff_base_s=0.05, backoff_cap_s=0.3, rng=lambda: 0.5)


def part_state(health: HealthBoard) -> str:
    part = health.get(HEALTH_PART)
    return part.state if part is not None else "missing"


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def rows(server: InfluxServer, q: str, params: dict[str, Any] | None = None) -> list[list[Any]]:
    result = server.query(q, db=DB, params=params, epoch="ns")["results"][0]
    series = result.get("series", [])
    return [row for s in series for row in s["values"]]


def grouped(server: InfluxServer, q: str) -> dict[str, list[list[Any]]]:
    result = server.query(q, db=DB, epoch="ns")["results"][0]
    return {json.dumps(s.get("tags", {}), sort_keys=True): s["values"] for s in result.get("series", [])}


def device_timestamps(server: InfluxServer, device: str) -> list[int]:
    return [r[0] for r in rows(server, "SELECT watts FROM device_power WHERE device = $d", {"d": device})]


def expected_ns(ticks: range) -> list[int]:
    return [lp.ns_from_s(T0 + i) for i in ticks]


def assert_complete(server: InfluxServer, ticks: range) -> None:
    """Every device has exactly one point per tick: no gap, no duplicate, nothing extra."""
    for _, device, _ in DEVICES:
        assert device_timestamps(server, device) == expected_ns(ticks), device
    per_second = rows(server, f"SELECT count(watts) FROM device_power WHERE time >= {expected_ns(ticks)[0]} "
                              f"AND time <= {expected_ns(ticks)[-1]} GROUP BY time(1s)")
    assert [r[1] for r in per_second] == [len(DEVICES)] * len(ticks)


# ----------------------------------------------------------------------------- basics


def test_ticks_arrive_with_exact_job_totals(influxdb_server: InfluxServer, tmp_path: Path) -> None:
    ticks = range(30)

    async def main() -> None:
        sink = make_sink(influxdb_server.url, tmp_path / "spool", gzip=True)  # database made on first 404
        sink.start()
        for i in ticks:
            sink.submit(tick_to_lines(tick(i), HOST))
        n = sum(len(tick_to_lines(tick(i), HOST)) for i in ticks)
        await eventually(lambda: sink.stats()["points_written_total"] == n, what="all points written")
        await sink.stop()

    asyncio.run(main())
    assert_complete(influxdb_server, ticks)
    sums = grouped(influxdb_server, "SELECT sum(joules) FROM job_energy GROUP BY job_id")
    for job_id in JOBS:
        expected = sum(sum(tick(i).job_energy_j[job_id].values()) for i in ticks)
        (value,) = [v[0][1] for k, v in sums.items() if json.loads(k)["job_id"] == job_id]
        assert value == pytest.approx(expected, rel=1e-9)
    labels = rows(influxdb_server, 'SHOW TAG VALUES FROM job_energy WITH KEY = "label"')
    assert sorted(r[1] for r in labels) == sorted(["lora-7b", lp.EMPTY_TAG_VALUE])
    # conservation survives the trip: device energy == jobs + unattributed, per kind
    device = grouped(influxdb_server, "SELECT sum(joules) FROM device_power GROUP BY kind")
    jobs = grouped(influxdb_server, "SELECT sum(joules) FROM job_energy GROUP BY kind")
    rest = grouped(influxdb_server, "SELECT sum(joules) FROM unattributed_energy GROUP BY kind")
    for key, values in device.items():
        assert values[0][1] == pytest.approx(jobs[key][0][1] + rest[key][0][1], rel=1e-9)


# ----------------------------------------------------------------------------- outage


def test_outage_leaves_no_gap_and_no_duplicate(influxdb_server: InfluxServer, tmp_path: Path) -> None:
    async def main() -> None:
        health = HealthBoard()
        sink = make_sink(influxdb_server.url, tmp_path / "spool", health, batch_size=40)
        influxdb_server.create_database(DB)
        sink.start()
        for i in range(10):
            sink.submit(tick_to_lines(tick(i), HOST))
            await asyncio.sleep(0.02)
        await eventually(lambda: sink.stats()["spool_pending_points"] == 0, what="first ticks delivered")

        await asyncio.to_thread(influxdb_server.stop)
        sizes = []
        for i in range(10, 40):
            sink.submit(tick_to_lines(tick(i), HOST))
            sizes.append(sink.stats()["spool_pending_points"])
            await asyncio.sleep(0.02)
        await eventually(lambda: part_state(health) == "degraded", what="degraded")
        assert sizes == sorted(sizes) and sizes[-1] == 30 * len(tick_to_lines(tick(0), HOST))  # the spool grows
        assert sink.stats()["spool_bytes"] > 0 and sink.stats()["points_retried_total"] > 0

        await asyncio.to_thread(influxdb_server.start)
        for i in range(40, 50):
            sink.submit(tick_to_lines(tick(i), HOST))
            await asyncio.sleep(0.02)
        await eventually(lambda: sink.stats()["spool_pending_points"] == 0, what="backlog delivered")
        part = health.get(HEALTH_PART)
        assert part is not None and part.state == "ok"
        stats = sink.stats()
        assert stats["points_written_total"] == stats["points_submitted_total"]
        assert sum(stats["points_dropped_total"].values()) == stats["points_dropped_total"]["no_fields"]
        await sink.stop()

    asyncio.run(main())
    assert_complete(influxdb_server, range(50))


def test_new_sink_over_the_same_spool_replays_what_was_not_delivered(influxdb_server: InfluxServer, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"

    async def first_life() -> None:
        sink = make_sink(influxdb_server.url, spool_dir)
        sink.start()
        for i in range(20):
            sink.submit(tick_to_lines(tick(i), HOST))
        await eventually(lambda: sink.stats()["points_retried_total"] > 0, what="a failed attempt")
        await sink.stop()
        assert sink.stats()["spool_pending_points"] > 0

    async def second_life() -> None:
        sink = make_sink(influxdb_server.url, spool_dir)
        sink.start()
        for i in range(20, 25):
            sink.submit(tick_to_lines(tick(i), HOST))
        await eventually(lambda: sink.stats()["spool_pending_points"] == 0, what="replay")
        await sink.stop()

    influxdb_server.stop()
    asyncio.run(first_life())
    influxdb_server.start()
    asyncio.run(second_life())
    assert_complete(influxdb_server, range(25))


_KILLED_DAEMON = """
import asyncio, sys
sys.path.insert(0, sys.argv[3])
from test_influx_integration import HOST, make_sink, tick
from wattprint.exporters.influx_points import tick_to_lines

async def main():
    sink = make_sink(sys.argv[1], sys.argv[2])
    sink.start()
    i = 0
    while True:
        sink.submit(tick_to_lines(tick(i), HOST))
        i += 1
        print(i, flush=True)
        await asyncio.sleep(0.005)

asyncio.run(main())
"""


def test_sigkill_during_an_outage_loses_no_acknowledged_tick(influxdb_server: InfluxServer, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    influxdb_server.create_database(DB)
    influxdb_server.stop()
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_DAEMON, influxdb_server.url, str(spool_dir), tests_dir],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    acked = 0
    deadline = time.monotonic() + 30
    while acked < 60 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert acked >= 60

    influxdb_server.start()

    async def replay() -> None:
        sink = make_sink(influxdb_server.url, spool_dir)
        sink.start()
        await eventually(lambda: sink.stats()["spool_pending_points"] == 0, what="replay after SIGKILL")
        await sink.stop()

    asyncio.run(replay())
    got = device_timestamps(influxdb_server, "gpu0")
    assert len(got) >= acked
    assert got == expected_ns(range(len(got)))  # gap-free and no duplicates


# ----------------------------------------------------------------------- hostile labels


HOSTILE_LABELS = [
    'every ,=" \'\\ #$*{}/:;|`~!?^%&()[]<>@+ char',
    "trailing backslash\\",
    "two trailing\\\\",
    "\\ \\=\"",  # hid the next lines from influxd when naively escaped
    'evil" f=1 1\nevil,host=x joules=1e9 2',  # newline injection attempt
    "cr\rlf\r\n tab\t nul\x00 del\x7f",
    "#comment-like",
    "",
    "a\\,b\\=c\\ d",
    "⧵ ünïcödé 💡 \u2028 \u0085",
    "DOMAIN\\alice",
    "x" * 200,
]


def test_hostile_labels_round_trip_as_exactly_one_series_each(influxdb_server: InfluxServer, tmp_path: Path) -> None:
    # the user tag is plain except for one job: a second hostile value after the label
    # could close a quote the label opened and hide a splitting bug
    jobs = {
        f"job-{n}": JobRef(job_id=f"job-{n}", label=label, user=f"user-{n}" if n != 4 else label, uid=n)
        for n, label in enumerate(HOSTILE_LABELS)
    }

    async def main() -> None:
        sink = make_sink(influxdb_server.url, tmp_path / "spool", batch_size=1000)
        sink.start()
        for i in range(3):
            sink.submit(tick_to_lines(tick(i, jobs), HOST))
        n = sum(len(tick_to_lines(tick(i, jobs), HOST)) for i in range(3))
        await eventually(lambda: sink.stats()["points_written_total"] == n, what="delivery")
        stats = sink.stats()
        assert stats["points_dropped_total"]["rejected"] == 0
        assert stats["batches_split_total"] == 0  # influxd took every batch as sent, nothing to bisect
        await sink.stop()

    asyncio.run(main())
    measurements = sorted(r[0] for r in rows(influxdb_server, "SHOW MEASUREMENTS"))
    assert measurements == ["device_power", "job_energy", "unattributed_energy"]
    stored = sorted(r[1] for r in rows(influxdb_server, 'SHOW TAG VALUES FROM job_energy WITH KEY = "label"'))
    assert stored == sorted(lp.sanitize_tag_value(label) for label in HOSTILE_LABELS)
    series = rows(influxdb_server, "SHOW SERIES FROM job_energy")
    assert len(series) == len(jobs) * 3  # one series per job and component, nothing else
    for job_id, ref in jobs.items():
        found = rows(
            influxdb_server,
            "SELECT joules, label, \"user\" FROM job_energy WHERE label = $label AND job_id = $job",
            {"label": lp.sanitize_tag_value(ref.label), "job": job_id},
        )
        assert len(found) == 3 * 3, ref.label  # 3 ticks x 3 components
        assert {(r[2], r[3]) for r in found} == {(lp.sanitize_tag_value(ref.label), lp.sanitize_tag_value(ref.user))}
    assert rows(influxdb_server, "SELECT * FROM job_energy WHERE host = 'x'") == []
    assert len(rows(influxdb_server, "SELECT joules FROM job_energy")) == len(jobs) * 3 * 3


_SPECIALS = list(',= "\'\\\n\r\t#\x00\x7f') + ["\u29f5", "é", "💡"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(label='\\ \\="', text_value="x")  # swallowed the next line when naively escaped
@example(label="a\\", text_value="b\\")
@example(label="", text_value="")
@given(label=st.text(alphabet=st.one_of(st.sampled_from(_SPECIALS), st.characters()), max_size=20),
       text_value=st.text(max_size=20))
def test_any_text_round_trips_through_real_influxd(influxdb_server: InfluxServer, label: str, text_value: str) -> None:
    if not getattr(influxdb_server, "_wp_db_made", False):
        influxdb_server.create_database(DB)
        influxdb_server._wp_db_made = True  # type: ignore[attr-defined]
    case = str(time.monotonic_ns())
    line = lp.encode_point("roundtrip", {"case": case, "label": label}, {"s": text_value, "n": 1.0}, 1_000)
    canary = lp.encode_point("roundtrip", {"case": case, "label": "canary"}, {"s": "c", "n": 2.0}, 2_000)
    assert line is not None and canary is not None
    influxdb_server.write(line + "\n" + canary, db=DB)
    found = rows(influxdb_server, 'SELECT label, n, s FROM roundtrip WHERE "case" = $case', {"case": case})
    assert [(r[0], r[1], r[2], r[3]) for r in found] == [
        (1_000, lp.sanitize_tag_value(label), 1.0, lp.sanitize_string_field(text_value)),
        (2_000, "canary", 2.0, "c"),
    ]
