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

import aiohttp
import pytest
from aiohttp import web
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
        # lifecycle (issue 16): this tick's embodied grams and water litres per job
        job_embodied_co2e_g={job_id: 0.01 * (1 + i % 5) for job_id in jobs},
        job_water_l={job_id: 0.002 * (1 + i % 3) for job_id in jobs},
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
    # job_footprint too: one point per job and tick, so SUM is what the ticks booked
    sums = grouped(server, 'SELECT sum("embodied_grams"), sum("water_litres"), count("water_litres") '
                           'FROM "job_footprint" GROUP BY "job_id"')
    assert {json.loads(k)["job_id"]: v[0][1:] for k, v in sums.items()} == {
        job_id: [pytest.approx(sum(tick(i).job_embodied_co2e_g[job_id] for i in ticks), rel=1e-9),
                 pytest.approx(sum(tick(i).job_water_l[job_id] for i in ticks), rel=1e-9), len(ticks)]
        for job_id in JOBS}


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
    assert measurements == ["device_power", "job_energy", "job_footprint", "unattributed_energy"]
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


# ------------------------------------------------- lifecycle figures (issue 16), v1 and v2


LIFECYCLE_JOBS = {
    "train-1": JobRef(job_id="train-1", label='lora "7b", run=1 a\\b\nx', user="alice", uid=1000),
    "eval-2": JobRef(job_id="eval-2", label="eval", user="bob", uid=1001),
    "idle-3": JobRef(job_id="idle-3", label="idle", user="carol", uid=1002),
}
BUCKET_TICKS = 10


def lifecycle_tick(i: int) -> TickRecord:
    """Tick ``i``: per job this tick's embodied grams and water litres (the idle job: 0
    and 0), and per job the bucket's location and market CO2e so far (10 ticks a bucket)."""
    base = tick(i, LIFECYCLE_JOBS)
    k = i % BUCKET_TICKS
    factor = {"train-1": 1.0, "eval-2": 0.25, "idle-3": 0.0}
    return TickRecord(
        sampled_at=base.sampled_at, interval_s=1.0, readings=base.readings, jobs=LIFECYCLE_JOBS,
        job_energy_j=base.job_energy_j, unattributed_j=base.unattributed_j,
        bucket_start=int(T0) + (i // BUCKET_TICKS) * BUCKET_TICKS,
        bucket_co2e_g={j: 0.5 * (k + 1) * f for j, f in factor.items()},
        bucket_co2e_market_g={j: 0.3 * (k + 1) * f for j, f in factor.items()},
        g_per_kwh=250.0, intensity_status="provisional",
        job_embodied_co2e_g={j: 0.0125 * (1 + i % 5) * f for j, f in factor.items()},
        job_water_l={j: 0.004 * (1 + i % 3) * f for j, f in factor.items()},
    )


class V2ToV1:
    """What an InfluxDB 2.x server does with a v2 write, in front of the 1.x influxd of
    the tests (1.6 has no /api/v2/write): ``POST /api/v2/write?org=&bucket=&precision=``
    is stored in the database named like the bucket. Records the requests it saw."""

    def __init__(self, influx_url: str) -> None:
        self.influx_url = influx_url
        self.seen: list[tuple[str, dict[str, str], str]] = []  # (path, query, Authorization)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/v2/write", self.write)
        return app

    async def write(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes Content-Encoding: gzip
        self.seen.append((request.path, dict(request.query), request.headers.get("Authorization", "")))
        params = {"db": request.query["bucket"], "precision": request.query.get("precision", "ns")}
        async with aiohttp.ClientSession() as session, \
                session.post(self.influx_url + "/write", params=params, data=body) as r:
            return web.Response(status=r.status, body=await r.read())


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_lifecycle_fields_and_job_footprint_sum_to_what_was_booked(
        influxdb_server: InfluxServer, background_app: Any, tmp_path: Path, api: str) -> None:
    from wattprint.daemon.model import SettledBucket
    from wattprint.exporters.influx_publish import InfluxPublisher

    ticks = range(2 * BUCKET_TICKS)
    influxdb_server.create_database(DB)
    extra: dict[str, Any] = {}
    proxy = None
    if api == "v2":
        proxy = V2ToV1(influxdb_server.url)
        extra = {"url": background_app(proxy.app()).url, "api": "v2", "org": "acme", "bucket": DB, "token": "tok-v2"}

    async def main() -> None:
        sink = make_sink(influxdb_server.url if api == "v1" else extra.pop("url"), tmp_path / "spool", **extra)
        publisher = InfluxPublisher(sink, HOST)
        sink.start()
        for i in ticks:
            publisher.on_tick(lifecycle_tick(i))
        # New grid data revise the first bucket of the two working jobs (final figures).
        publisher.on_settled([
            SettledBucket(job=LIFECYCLE_JOBS["train-1"], bucket_start=int(T0), co2e_g=4.6, g_per_kwh=230.0,
                          status="final", co2e_market_g=2.9),
            SettledBucket(job=LIFECYCLE_JOBS["eval-2"], bucket_start=int(T0), co2e_g=1.15, g_per_kwh=230.0,
                          status="final", co2e_market_g=0.725),
        ])
        await eventually(lambda: sink.stats()["spool_pending_points"] == 0, what="all points written")
        stats = sink.stats()
        assert stats["points_written_total"] == stats["points_submitted_total"]
        assert not any(n for reason, n in stats["points_dropped_total"].items() if reason != "no_fields")
        await sink.stop()

    asyncio.run(main())
    if proxy is not None:  # the writes really went through influxdb-client's v2 API
        assert proxy.seen and all(p == "/api/v2/write" and q["org"] == "acme" and a == "Token tok-v2"
                                  for p, q, a in proxy.seen)

    def by_job(q: str) -> dict[str, list[Any]]:
        return {json.loads(k)["job_id"]: v[0][1:] for k, v in grouped(influxdb_server, q).items()}

    # job_footprint: SUM over time is what the ticks booked; the idle job has no point.
    sums = by_job('SELECT sum("embodied_grams"), sum("water_litres"), count("embodied_grams") '
                  'FROM "job_footprint" GROUP BY "job_id"')
    assert set(sums) == {"train-1", "eval-2"}
    for job_id in sums:
        embodied = sum(lifecycle_tick(i).job_embodied_co2e_g[job_id] for i in ticks)
        water = sum(lifecycle_tick(i).job_water_l[job_id] for i in ticks)
        assert sums[job_id][0] == pytest.approx(embodied, rel=1e-9)
        assert sums[job_id][1] == pytest.approx(water, rel=1e-9)
        assert sums[job_id][2] == len(ticks)  # one point per job per tick
    # job_co2e: one point per bucket; the settled bucket holds the final figures, the
    # other the last tick's; market_grams beside grams.
    co2e = by_job('SELECT sum("grams"), sum("market_grams"), count("grams") FROM "job_co2e" GROUP BY "job_id"')
    assert co2e["train-1"] == [pytest.approx(4.6 + 5.0, rel=1e-9), pytest.approx(2.9 + 3.0, rel=1e-9), 2]
    assert co2e["eval-2"] == [pytest.approx(1.15 + 1.25, rel=1e-9), pytest.approx(0.725 + 0.75, rel=1e-9), 2]
    assert co2e["idle-3"] == [0.0, 0.0, 2]
    status = rows(influxdb_server, 'SELECT "status" FROM "job_co2e" WHERE "job_id" = $j', {"j": "train-1"})
    assert [r[1] for r in status] == ["final", "provisional"]
    # tags as job_co2e: the hostile label arrives as one series, escaped like everything else
    labels = rows(influxdb_server, 'SHOW TAG VALUES FROM "job_footprint" WITH KEY = "label"')
    assert sorted(r[1] for r in labels) == sorted([lp.sanitize_tag_value(LIFECYCLE_JOBS["train-1"].label), "eval"])
    assert len(rows(influxdb_server, 'SHOW SERIES FROM "job_footprint"')) == 2


def test_fleet_totals_sum_the_lifecycle_figures_per_label_across_hosts(influxdb_server: InfluxServer,
                                                                       tmp_path: Path) -> None:
    """``wattprint jobs --fleet``: per label, market CO2e, embodied CO2e and water summed
    over hosts from the points the sink writes; a hostile label is a bound parameter."""
    from wattprint.daemon.fleet import fleet_totals
    from wattprint.exporters.influx_points import job_co2e_line

    influxdb_server.create_database(DB)
    lines: list[str] = []
    for host in ("node-a", "node-b"):
        for i in range(2 * BUCKET_TICKS):
            record = lifecycle_tick(i)
            lines += tick_to_lines(record, host)
            if i % BUCKET_TICKS == BUCKET_TICKS - 1:  # the bucket's last figures
                for job_id, ref in LIFECYCLE_JOBS.items():
                    line = job_co2e_line(host=host, job_id=job_id, label=ref.label, user=ref.user,
                                         grams=record.bucket_co2e_g[job_id], g_per_kwh=250.0, status="final",
                                         at_s=record.bucket_start, market_grams=record.bucket_co2e_market_g[job_id])
                    assert line is not None
                    lines.append(line)
    influxdb_server.write("\n".join(lines), db=DB)
    cfg = InfluxConfig(enabled=True, url=influxdb_server.url, database=DB, timeout_s=5.0)

    rows = {r["label"]: r for r in fleet_totals(cfg, T0 - 60, T0 + 3600)}
    for job_id, ref in LIFECYCLE_JOBS.items():
        row = rows[lp.sanitize_tag_value(ref.label)]
        assert row["hosts"] == ["node-a", "node-b"]
        ticks = [lifecycle_tick(i) for i in range(2 * BUCKET_TICKS)]
        assert row["embodied_co2e_g"] == pytest.approx(2 * sum(t.job_embodied_co2e_g[job_id] for t in ticks), rel=1e-9)
        assert row["water_l"] == pytest.approx(2 * sum(t.job_water_l[job_id] for t in ticks), rel=1e-9)
        last = ticks[BUCKET_TICKS - 1]
        assert row["co2e_g"] == pytest.approx(2 * 2 * last.bucket_co2e_g[job_id], rel=1e-9)
        assert row["co2e_market_g"] == pytest.approx(2 * 2 * last.bucket_co2e_market_g[job_id], rel=1e-9)
    assert rows["eval"]["embodied_co2e_g"] > 0 and rows["idle"]["embodied_co2e_g"] == 0.0
    [only] = fleet_totals(cfg, T0 - 60, T0 + 3600, label="eval")
    assert only["label"] == "eval" and only["water_l"] == rows["eval"]["water_l"]
    assert fleet_totals(cfg, T0 - 60, T0 + 3600, label="eval\" OR 1=1 --") == []
    # The CLI's table shows them (the JSON has the same figures).
    toml = tmp_path / "fleet.toml"
    toml.write_text(f'[influxdb]\nenabled = true\nurl = "{influxdb_server.url}"\ndatabase = "{DB}"\n')
    r = subprocess.run([sys.executable, "-m", "wattprint.daemon", "jobs", "--fleet", "--config", str(toml),
                        "--since", str(T0 - 60), "--until", str(T0 + 3600), "--label", "eval"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    header, row_text = r.stdout.splitlines()
    assert header.split() == ["LABEL", "kWh", "CO2e", "g", "EMBODIED", "g", "WATER", "L", "HOSTS"]
    cells = row_text.split()
    assert cells[0] == "eval" and cells[-1] == "node-a,node-b"
    assert float(cells[3]) == pytest.approx(rows["eval"]["embodied_co2e_g"], abs=0.005)
    assert float(cells[4]) == pytest.approx(rows["eval"]["water_l"], abs=0.0005)
