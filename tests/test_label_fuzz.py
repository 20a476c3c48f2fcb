"""Label fuzzing (hypothesis) across every output: whatever text a local user puts into
``WATTPRINT_JOB`` (and whatever user names the passwd database holds) stays data.

- ``sanitize_label``: only the documented characters (``A-Z a-z 0-9 _ . : / @ + -``,
  docs/jobs.md), one output character per input character, at most 64 characters,
  never empty, idempotent, unchanged when already clean; ``read_label`` keeps the first
  256 characters of the raw value, whatever bytes it holds;
- Prometheus: a Snapshot of jobs with such labels and user names renders an exposition
  that ``promtool check metrics`` accepts and that prometheus_client's parser reads
  back with exactly the labels and values given, with no series or label of its own;
- line protocol: a whole tick (devices, jobs, unattributed) and the CO2e points give
  exactly one line per point, which influxd's line splitter and a strict parser agree
  on, with the tag values the encoder documents (point-level escaping is covered by
  test_lineprotocol.py);
- the API: ``label_raw`` and ``user`` come back exactly through the store and JSON, and
  the ``label`` and ``user`` filters find the job by the sanitised label and the name.
"""

from __future__ import annotations

import itertools
import json
import math
import string
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from servers import promtool_check_metrics
from test_lineprotocol import go_scan_line, parse_lines
from wattprint.daemon.api import Api
from wattprint.daemon.ledger import JobTick, Ledger, LedgerReader
from wattprint.daemon.model import DeviceReading, JobRef, JobTotals, Snapshot, TickRecord
from wattprint.daemon.procs import (
    LABEL_CHARS,
    MAX_LABEL_LEN,
    MAX_RAW_LABEL_CHARS,
    JobIdentity,
    read_label,
    sanitize_label,
)
from wattprint.exporters import lineprotocol as lp
from wattprint.exporters.influx_points import job_co2e_line, tick_to_lines
from wattprint.exporters.prometheus import _text, build_registry, render

DOCUMENTED = set(string.ascii_letters + string.digits + "_.:/@+-")
_SPECIALS = list(',= "\'\\\n\r\t#{}\x00\x7f') + ["\u2028", "\u0085", "\ufeff", "é", "💡", "\u29f5", "\ud800", "\udcff"]
ANY_TEXT = st.text(alphabet=st.one_of(st.sampled_from(_SPECIALS), st.characters()), max_size=80)
# What can reach the store: environ values are decoded with errors="replace" (no lone
# surrogates) and cannot hold NUL; user names are valid text.
STORABLE = st.text(alphabet=st.one_of(st.sampled_from([c for c in _SPECIALS if c not in "\x00\ud800\udcff"]),
                                      st.characters(exclude_categories=["Cs"], exclude_characters="\x00")),
                   max_size=MAX_RAW_LABEL_CHARS)
FINITE = st.floats(min_value=0, max_value=1e15, allow_nan=False, allow_infinity=False)


# ------------------------------------------------------------------------- sanitising


def test_label_chars_are_the_documented_ones() -> None:
    assert set(LABEL_CHARS) == DOCUMENTED
    assert MAX_LABEL_LEN == 64 and MAX_RAW_LABEL_CHARS == 256
    doc = (Path(__file__).resolve().parents[1] / "docs" / "jobs.md").read_text()
    assert "`A-Z a-z 0-9 _ . : / @ + -`" in doc and "64 characters" in doc and "256 characters" in doc


@settings(max_examples=1000, deadline=None)
@given(raw=ANY_TEXT)
def test_sanitize_label(raw: str) -> None:
    clean = sanitize_label(raw)
    assert set(clean) <= DOCUMENTED
    assert 1 <= len(clean) <= MAX_LABEL_LEN
    assert sanitize_label(clean) == clean
    if raw:
        assert len(clean) == min(len(raw), MAX_LABEL_LEN)
        assert all(c == (r if r in DOCUMENTED else "_") for c, r in zip(clean, raw))
    else:
        assert clean == "_"
    if raw and len(raw) <= MAX_LABEL_LEN and set(raw) <= DOCUMENTED:
        assert clean == raw


@settings(max_examples=200, deadline=None)
@given(value=st.binary(min_size=1, max_size=400).filter(lambda b: b"\x00" not in b),
       before=st.lists(st.binary(max_size=20).filter(lambda b: b"\x00" not in b), max_size=3))
def test_read_label_keeps_the_raw_value_cut_at_256(tmp_path_factory: pytest.TempPathFactory, value: bytes,
                                                   before: list[bytes]) -> None:
    root = tmp_path_factory.mktemp("proc")
    (root / "77").mkdir()
    environ = b"\x00".join(before + [b"WATTPRINT_JOB=" + value, b"SECRET=x"]) + b"\x00"
    (root / "77" / "environ").write_bytes(environ)
    found = read_label(77, ("WATTPRINT_JOB", "SLURM_JOB_ID"), proc_root=str(root))
    if any(b.startswith(b"WATTPRINT_JOB=") for b in before):
        return  # an earlier entry of the same name wins, as with getenv()
    assert found == ("WATTPRINT_JOB", value.decode("utf-8", "replace")[:MAX_RAW_LABEL_CHARS])
    assert "\udcff" not in found[1] and "\x00" not in found[1]


# ------------------------------------------------------------------------- Prometheus


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def hostile_jobs(draw: st.DrawFn) -> list[JobTotals]:
    n = draw(st.integers(1, 4))
    jobs = []
    for i in range(n):
        energy = {c: draw(FINITE) for c in draw(st.sets(st.sampled_from(["gpu", "cpu", "dram"]), min_size=1))}
        jobs.append(JobTotals(job_id=f"{100 + i}-{draw(st.integers(0, 10**12))}", label=draw(ANY_TEXT),
                              user=draw(ANY_TEXT), uid=draw(st.integers(0, 2**32 - 1)), energy_j=energy,
                              co2e_g=draw(FINITE), state=draw(st.sampled_from(["running", "finished"])),
                              embodied_co2e_g=draw(FINITE), co2e_market_g=draw(FINITE), water_l=draw(FINITE)))
    return jobs


@pytest.fixture(scope="module")
def promtool_bin() -> str:
    from servers import require_binary

    return require_binary("promtool")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=hostile_jobs(), device_name=ANY_TEXT)
def test_prometheus_exposition_stays_valid_and_exact(promtool_bin: str, jobs: list[JobTotals],
                                                     device_name: str) -> None:
    from wattprint.daemon.model import DeviceState

    snapshot = Snapshot(taken_at=1_700_000_000.5, tick=7, tick_duration_s=0.01,
                        devices=(DeviceState("gpu", "gpu0", device_name, 100.0, 5.0, "counter"),),
                        jobs=tuple(jobs), unattributed_j_total={"gpu": 1.0})
    body, _ctype = render(build_registry(lambda: snapshot))
    result = promtool_check_metrics(body, promtool_bin)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), body.decode()
    got: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in got, f"duplicate series {key}"
            got[key] = sample.value
    for job in jobs:
        ident = {"job_id": job.job_id, "label": _text(job.label), "user": _text(job.user)}
        if _encodable(job.label + job.user):
            assert ident["label"] == job.label and ident["user"] == job.user  # exactly as given
        assert got[("wattprint_job_co2e_grams", frozenset(ident.items()))] == job.co2e_g
        assert got[("wattprint_job_running", frozenset(ident.items()))] == (1.0 if job.state == "running" else 0.0)
        for name, value in (("wattprint_job_embodied_co2e_grams", job.embodied_co2e_g),
                            ("wattprint_job_market_co2e_grams", job.co2e_market_g),
                            ("wattprint_job_water_litres", job.water_l)):
            assert got[(name, frozenset(ident.items()))] == value
        for component, joules in job.energy_j.items():
            key = ("wattprint_job_energy_joules_total", frozenset({**ident, "kind": component}.items()))
            assert got[key] == joules
    info = [dict(labels) for name, labels in got if name == "wattprint_device_info"]
    # GPU series also carry uuid and model_name (dcgm-exporter's UUID / modelName).
    assert info == [{"kind": "gpu", "device": "gpu0", "name": _text(device_name), "source": "counter",
                     "uuid": "", "model_name": _text(device_name), "vendor": ""}]
    allowed = {"kind", "device", "name", "source", "job_id", "label", "user", "zone", "provider", "state",
               "uuid", "model_name", "vendor"}
    assert all(set(dict(labels)) <= allowed for _, labels in got)
    # nothing a user wrote made a series of its own
    # (per job: co2e, embodied, market, water, running, and energy per component)
    assert len([k for k in got if k[0].startswith("wattprint_job_")]) == sum(5 + len(j.energy_j) for j in jobs)


# ------------------------------------------------------------------------ line protocol


@settings(max_examples=200, deadline=None)
@given(jobs=st.lists(st.tuples(ANY_TEXT, ANY_TEXT, ANY_TEXT), min_size=1, max_size=4),
       host=ANY_TEXT, device=ANY_TEXT,
       energies=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3))
def test_line_protocol_one_line_per_point(jobs: list[tuple[str, str, str]], host: str, device: str,
                                          energies: list[float]) -> None:
    refs = {f"{i}-{job_id}": JobRef(job_id=f"{i}-{job_id}", label=label, user=user, uid=i)
            for i, (job_id, label, user) in enumerate(jobs)}
    job_energy = {job_id: {"gpu": energies[0], "cpu": 1.5, "dram": energies[1]} for job_id in refs}
    record = TickRecord(
        sampled_at=1_700_000_000.0, interval_s=1.0,
        readings=(DeviceReading(kind="gpu", device=device, energy_j=energies[2], power_w=10.0, source="counter",
                                interval_s=1.0),),
        jobs=refs, job_energy_j=job_energy, unattributed_j={"gpu": energies[0], "cpu": 2.0},
    )
    lines = tick_to_lines(record, host)
    co2e = [job_co2e_line(host=host, job_id=j.job_id, label=j.label, user=j.user, grams=1.0, g_per_kwh=energies[1],
                          status="provisional", at_s=1_700_000_000.0) for j in refs.values()]
    lines += [line for line in co2e if line is not None]
    expected = (1  # device_power: watts is always finite
                + len(refs) * (1 + math.isfinite(energies[0]) + math.isfinite(energies[1]))  # job_energy (cpu finite)
                + 1 + math.isfinite(energies[0])  # unattributed: cpu always, gpu when finite
                + len(refs))  # job_co2e: grams is finite
    assert len(lines) == expected
    body = "\n".join(lines)
    points = parse_lines(body)
    assert len(points) == expected
    pos, count = 0, 0
    while pos <= len(body):  # influxd's splitter sees the same boundaries
        pos = go_scan_line(body, pos) + 1
        count += 1
    assert count == expected
    for p in points:
        assert p.tags["host"] == lp.sanitize_tag_value(host)
        if "job_id" in p.tags:
            ref = next(r for r in refs.values() if lp.sanitize_tag_value(r.job_id) == p.tags["job_id"])
            assert p.tags["label"] == lp.sanitize_tag_value(ref.label)
            assert p.tags["user"] == lp.sanitize_tag_value(ref.user)
        if p.measurement == "device_power":
            assert p.tags["device"] == lp.sanitize_tag_value(device)


# ------------------------------------------------------------------------------- API


class StoreApi:
    def __init__(self, path: str, url: str) -> None:
        self.ledger = Ledger(path, host="h", bucket_s=60)
        self.url = url
        self.ids = itertools.count(1)

    def add(self, label_raw: str, user: str) -> str:
        n = next(self.ids)
        job_id = f"{n}-{n * 1000}"
        ident = JobIdentity(job_id=job_id, label=sanitize_label(label_raw), label_source="WATTPRINT_JOB",
                            uid=n, user=user, command="python", root_pid=n, started_at=1000.0 + n,
                            label_raw=label_raw)
        self.ledger.record_tick(2000.0 + n, [JobTick(ident, {"gpu": 1.0, "cpu": 1.0, "dram": 1.0}, gpu_seconds=1.0,
                                                     gpu_memory_bytes=1, sources={"gpu": "counter"})],
                                [("gpu", "gpu0", 3.0, "counter")], {"gpu": 0.0, "cpu": 0.0, "dram": 0.0}, None)
        return job_id

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw)


@pytest.fixture(scope="module")
def store_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreApi]:
    from servers import BackgroundApp

    path = str(tmp_path_factory.mktemp("label-api") / "s.sqlite3")
    Ledger(path, host="h", bucket_s=60).close()
    reader = LedgerReader(path)
    api = Api(lambda: Snapshot(taken_at=time.time(), tick=1, tick_duration_s=0.0), reader,
              lambda: (b"", "text/plain"), host="h", bucket_s=60)
    server = BackgroundApp(api.app())
    server.start()
    store = StoreApi(path, server.url)
    try:
        yield store
    finally:
        server.stop()
        store.ledger.close()
        reader.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(label_raw=STORABLE.filter(bool), user=STORABLE.filter(bool))
def test_api_returns_label_raw_and_user_exactly(store_api: StoreApi, label_raw: str, user: str) -> None:
    job_id = store_api.add(label_raw, user)
    quoted = urllib.parse.quote(job_id, safe="")
    job = store_api.get(f"/api/v1/jobs/{quoted}")
    assert job["label_raw"] == label_raw
    assert job["label"] == sanitize_label(label_raw)
    assert job["label_sanitised"] == (job["label"] != label_raw)
    assert job["user"] == user
    found = store_api.get("/api/v1/jobs?" + urllib.parse.urlencode({"label": job["label"], "user": user,
                                                                      "limit": 10000}))
    assert job_id in {j["id"] for j in found["jobs"]}
    assert all(j["label"] == job["label"] and j["user"] == user for j in found["jobs"])
