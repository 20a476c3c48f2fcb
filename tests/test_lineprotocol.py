"""Line protocol encoding and the contract's points: exact escaping examples, a strict
parser that reads lines back, hypothesis properties over arbitrary text, and a model of
influxd's line splitter showing that no value can swallow the next line."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from wattprint.daemon.model import DeviceReading, JobRef, TickRecord
from wattprint.exporters import lineprotocol as lp
from wattprint.exporters.influx_points import (
    grid_intensity_line,
    job_co2e_line,
    tick_to_lines,
)

# --------------------------------------------------------------------------- strict parser


class ParseError(ValueError):
    pass


@dataclass
class Point:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, object]
    timestamp: int


_MEASUREMENT_ESCAPES = ", "
_KEY_ESCAPES = ",= "
_INT_RE = re.compile(r"-?\d+")
_FLOAT_RE = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _token(line: str, i: int, escapable: str, stops: str) -> tuple[str, int]:
    """Read one measurement / key / tag value starting at ``i`` up to an unescaped stop.

    Accepts only what both of influxd's readings (backslash-before-char for tags,
    backslash-pairs for line splitting) agree on: a literal backslash may not end the
    line or stand directly before an escape sequence.
    """
    out: list[str] = []
    while i < len(line):
        c = line[i]
        if c == "\\":
            nxt = line[i + 1] if i + 1 < len(line) else ""
            if nxt != "" and nxt in escapable:
                out.append(nxt)
                i += 2
                continue
            if nxt == "":
                raise ParseError("backslash at end of line")
            if nxt == "\\" and i + 2 < len(line) and line[i + 2] in escapable:
                raise ParseError("literal backslash before an escape sequence (ambiguous)")
            out.append("\\")
            i += 1
            continue
        if c in stops:
            break
        if c in escapable:
            raise ParseError(f"unescaped {c!r} at {i}")
        if ord(c) < 0x20 or c == "\x7f":
            raise ParseError(f"control character {c!r} at {i}")
        out.append(c)
        i += 1
    return "".join(out), i


def _expect(line: str, i: int, char: str) -> int:
    if i >= len(line) or line[i] != char:
        raise ParseError(f"expected {char!r} at {i} in {line!r}")
    return i + 1


def _field_value(line: str, i: int) -> tuple[object, int]:
    if i < len(line) and line[i] == '"':
        i += 1
        out: list[str] = []
        while True:
            if i >= len(line):
                raise ParseError("unterminated string")
            c = line[i]
            if c == "\\":
                nxt = line[i + 1] if i + 1 < len(line) else ""
                if nxt not in ('"', "\\") or nxt == "":
                    raise ParseError(f"bad escape in string at {i}")
                out.append(nxt)
                i += 2
            elif c == '"':
                return "".join(out), i + 1
            elif ord(c) < 0x20 or c == "\x7f":
                raise ParseError("control character in string")
            else:
                out.append(c)
                i += 1
    end = i
    while end < len(line) and line[end] not in ", ":
        end += 1
    raw = line[i:end]
    if raw == "true":
        return True, end
    if raw == "false":
        return False, end
    if raw.endswith("i") and _INT_RE.fullmatch(raw[:-1]):
        value = int(raw[:-1])
        if not lp.INT64_MIN <= value <= lp.INT64_MAX:
            raise ParseError("integer out of int64 range")
        return value, end
    if _FLOAT_RE.fullmatch(raw):
        number = float(raw)
        if not math.isfinite(number):
            raise ParseError("non-finite float")
        return number, end
    raise ParseError(f"bad field value {raw!r}")


def parse_line(line: str) -> Point:
    """Strictly parse one line of line protocol (timestamp required)."""
    if "\n" in line or "\r" in line:
        raise ParseError("newline or carriage return inside a line")
    if not line or line.startswith("#"):
        raise ParseError("empty line or comment")
    measurement, i = _token(line, 0, _MEASUREMENT_ESCAPES, ", ")
    if not measurement:
        raise ParseError("empty measurement")
    tags: dict[str, str] = {}
    while i < len(line) and line[i] == ",":
        key, i = _token(line, i + 1, _KEY_ESCAPES, "=")
        i = _expect(line, i, "=")
        value, i = _token(line, i, _KEY_ESCAPES, ", ")
        if not key or not value:
            raise ParseError("empty tag key or value")
        if key in tags:
            raise ParseError(f"duplicate tag {key!r}")
        tags[key] = value
    i = _expect(line, i, " ")
    fields: dict[str, object] = {}
    while True:
        key, i = _token(line, i, _KEY_ESCAPES, "=")
        if not key:
            raise ParseError("empty field key")
        i = _expect(line, i, "=")
        value, i = _field_value(line, i)
        if key in fields:
            raise ParseError(f"duplicate field {key!r}")
        fields[key] = value
        if i < len(line) and line[i] == ",":
            i += 1
            continue
        break
    i = _expect(line, i, " ")
    if not _INT_RE.fullmatch(line[i:]):
        raise ParseError(f"bad timestamp {line[i:]!r}")
    return Point(measurement, tags, fields, int(line[i:]))


def parse_lines(text: str) -> list[Point]:
    """A batch as the writer sends it: lines joined by single newlines."""
    return [parse_line(line) for line in text.split("\n")]


def go_scan_line(buf: str, i: int = 0) -> int:
    """Where influxd 1.x/2.x (models.scanLine) thinks the line starting at ``i`` ends:
    it skips backslash *pairs* and tracks quotes once it has seen a space."""
    quoted = fields = False
    equals = commas = 0
    while i < len(buf):
        if buf[i] == "\\" and i + 2 < len(buf):
            i += 2
            continue
        if buf[i] == " ":
            fields = True
        if fields:
            if not quoted and buf[i] == "=":
                i += 1
                equals += 1
                continue
            if not quoted and buf[i] == ",":
                i += 1
                commas += 1
                continue
            if buf[i] == '"' and equals > commas:
                i += 1
                quoted = not quoted
                continue
        if buf[i] == "\n" and not quoted:
            break
        i += 1
    return i


# ------------------------------------------------------------------------ the parser itself


def test_strict_parser_reads_a_plain_line() -> None:
    p = parse_line('cpu,host=a\\ b,z=1 v=1.5,n=2i,ok=true,s="x\\"y\\\\" 17')
    assert p == Point("cpu", {"host": "a b", "z": "1"}, {"v": 1.5, "n": 2, "ok": True, "s": 'x"y\\'}, 17)


@pytest.mark.parametrize(
    "line",
    [
        "cpu v=1",  # no timestamp
        "cpu,host= v=1 1",  # empty tag value
        "cpu,host=a v=nan 1",
        "cpu,host=a v=inf 1",
        "cpu,host=a\nb v=1 1",
        "cpu,host=a\rb v=1 1",
        "#cpu v=1 1",
        "cpu,host=a=b v=1 1",  # unescaped '='
        "cpu,host=a\\\\,b v=1 1",  # literal backslash before an escape: ambiguous
        'cpu v="unterminated 1',
        "cpu,a=1,a=2 v=1 1",
        "cpu v=1,v=2 1",
        "cpu v=99999999999999999999i 1",
    ],
)
def test_strict_parser_rejects(line: str) -> None:
    with pytest.raises(ParseError):
        parse_line(line)


# ----------------------------------------------------------------------- escaping examples


def test_escapes_each_position() -> None:
    line = lp.encode_point(
        "my meas,x=y",
        {"tag key,=": "v a,l=ue", "host": "h"},
        {"field key,=": 1.0, "s": 'say "hi" \\ bye'},
        1_700_000_000_000_000_000,
    )
    assert line == (
        "my\\ meas\\,x=y,host=h,tag\\ key\\,\\==v\\ a\\,l\\=ue "
        'field\\ key\\,\\==1.0,s="say \\"hi\\" \\\\ bye" 1700000000000000000'
    )


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("a\nb", "a\u240ab"),
        ("a\r\nb", "a\u240d\u240ab"),
        ("tab\there", "tab\u2409here"),
        ("nul\x00del\x7f", "nul\u2400del\u2421"),
        ("ends\\", "ends\u29f5"),
        ("ends\\\\", "ends\\\u29f5"),
        ("a\\,b", "a\u29f5,b"),
        ("a\\ b", "a\u29f5 b"),
        ("a\\=b", "a\u29f5=b"),
        ("CORP\\alice", "CORP\\alice"),  # an ordinary backslash stays
        ("", lp.EMPTY_TAG_VALUE),
        ("bad\udcffbyte", "bad\ufffdbyte"),
        ("#not a comment", "#not a comment"),
        ("⧵ ünï 💡", "⧵ ünï 💡"),
    ],
)
def test_tag_value_rewrites(raw: str, stored: str) -> None:
    assert lp.sanitize_tag_value(raw) == stored
    line = lp.encode_point("m", {"t": raw}, {"f": 1}, 5)
    assert line is not None
    assert parse_line(line).tags == {"t": stored}


def test_string_field_keeps_backslashes_and_quotes_but_not_newlines() -> None:
    line = lp.encode_point("m", {}, {"s": 'a\\"b\\\nc\\'}, 1)
    assert line == 'm s="a\\\\\\"b\\\\\u240ac\\\\" 1'
    assert parse_line(line).fields == {"s": 'a\\"b\\\u240ac\\'}


def test_field_types_and_precision() -> None:
    line = lp.encode_point(
        "m", {}, {"f": 0.1, "tiny": 1e-05, "big": 1e16, "neg0": -0.0, "i": -(2**63), "t": True, "b": False}, 1
    )
    assert line == "m f=0.1,tiny=1e-05,big=1e+16,neg0=-0.0,i=-9223372036854775808i,t=true,b=false 1"
    fields = parse_line(line).fields
    assert fields["f"] == 0.1 and fields["tiny"] == 1e-05 and fields["big"] == 1e16


def test_non_finite_and_out_of_range_fields_are_dropped_and_counted() -> None:
    before = lp.counters.snapshot()
    line = lp.encode_point("m", {"a": "b"}, {"nan": math.nan, "inf": math.inf, "huge": 2**63, "ok": 2.5}, 1)
    assert line == "m,a=b ok=2.5 1"
    assert lp.encode_point("m", {"a": "b"}, {"nan": math.nan, "ninf": -math.inf}, 1) is None
    after = lp.counters.snapshot()
    assert after["fields_dropped_non_finite"] - before["fields_dropped_non_finite"] == 4
    assert after["fields_dropped_out_of_range"] - before["fields_dropped_out_of_range"] == 1
    assert after["points_skipped_no_fields"] - before["points_skipped_no_fields"] == 1


def test_tags_are_sorted() -> None:
    assert lp.encode_point("m", {"z": "1", "a": "2", "m": "3"}, {"f": 1}, 1) == "m,a=2,m=3,z=1 f=1i 1"


@pytest.mark.parametrize(
    ("measurement", "tags", "fields", "message"),
    [
        ("", {}, {"f": 1}, "measurement name is empty"),
        ("#m", {}, {"f": 1}, "measurement name '#m' starts with '#' (a comment line)"),
        ("m", {"": "v"}, {"f": 1}, "tag or field key is empty"),
        ("m", {}, {"": 1}, "tag or field key is empty"),
        # equal after the rewrite; the message names the key as written on the wire
        ("m", {"a\n": "1", "a\u240a": "2"}, {"f": 1}, "two tag keys are equal after escaping: 'a\u240a'"),
        ("m", {"t": "x"}, {"a b": 1, "a\u240a": 2, "a\n": 3}, "two field keys are equal after escaping: 'a\u240a'"),
    ],
)
def test_programming_errors_raise(
    measurement: str, tags: dict[str, str], fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        lp.encode_point(measurement, tags, fields, 1)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_timestamp_must_be_int() -> None:
    for bad in (1.5, True, "1"):
        with pytest.raises(TypeError) as err:
            lp.encode_point("m", {}, {"f": 1}, bad)  # type: ignore[arg-type]
        assert str(err.value) == f"timestamp_ns must be an int, got {bad!r}"


def test_unsupported_field_type_names_the_type() -> None:
    with pytest.raises(TypeError) as err:
        lp.encode_point("m", {}, {"f": [1]}, 1)  # type: ignore[dict-item]
    assert str(err.value) == "unsupported field value type list: [1]"


def test_int64_limits_are_kept_one_beyond_is_dropped() -> None:
    assert lp.format_field_value(2**63 - 1) == "9223372036854775807i"
    assert lp.format_field_value(-(2**63)) == "-9223372036854775808i"
    assert lp.format_field_value(2**63) is None
    assert lp.format_field_value(-(2**63) - 1) is None


def test_ns_from_s_is_deterministic_to_the_microsecond() -> None:
    assert lp.ns_from_s(1_700_000_000.123456) == 1_700_000_000_123_456_000
    assert lp.ns_from_s(1_700_000_000.0) == 1_700_000_000_000_000_000


# -------------------------------------------------------------- the line splitter model


INJECTION_LABELS = [
    '\\ \\="',  # made influxd 1.6 merge three lines when encoded naively
    'x\\ y\\="z',
    "a\\",
    'evil" f=1 1\nevil,host=x joules=1e9 2',
    "\\,\\=\\ \\",
    '"="=","',
]


def naive_escape(value: str) -> str:
    return value.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def test_splitter_model_reproduces_the_influxd_failure_of_naive_escaping() -> None:
    # The behaviour observed on influxd 1.6.7: this label, naively escaped, hides the
    # newline that follows it from the line splitter.
    body = f"m1,a={naive_escape(INJECTION_LABELS[0])} f=1 100\nm2,b=x f=2 200"
    assert go_scan_line(body) == len(body)  # one "line": both points lost


@pytest.mark.parametrize("label", INJECTION_LABELS)
def test_splitter_finds_every_newline_for_hostile_labels(label: str) -> None:
    lines = [
        lp.encode_point("m", {"label": label, "user": label}, {"s": label, "f": 1.0}, 100),
        lp.encode_point("m", {"label": "canary"}, {"f": 2.0}, 200),
    ]
    body = "\n".join(line for line in lines if line)
    first_end = go_scan_line(body)
    assert body[first_end] == "\n" and first_end == len(lines[0] or "")
    points = parse_lines(body)
    assert [p.measurement for p in points] == ["m", "m"]
    assert points[0].tags["label"] == lp.sanitize_tag_value(label)
    assert points[1].tags == {"label": "canary"}


# ------------------------------------------------------------------------- properties

_SPECIALS = list(',= "\\\n\r\t#\x00\x7f') + ["\u29f5", "\u2028", "\u0085", "é", "💡", "\ud800", "\udcff"]
_alphabet = st.one_of(st.sampled_from(_SPECIALS), st.characters())
text = st.text(alphabet=_alphabet, max_size=24)
key_text = st.text(alphabet=_alphabet, min_size=1, max_size=24)
field_value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    text,
)


def _expected_field(value: object) -> object | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if lp.INT64_MIN <= value <= lp.INT64_MAX else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    assert isinstance(value, str)
    return lp.sanitize_string_field(value)


@settings(max_examples=600, deadline=None)
@given(
    measurement=key_text,
    tags=st.dictionaries(key_text, text, max_size=4),
    fields=st.dictionaries(key_text, field_value, min_size=1, max_size=4),
    timestamp=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_any_point_round_trips_through_the_strict_parser(
    measurement: str, tags: dict[str, str], fields: dict[str, object], timestamp: int
) -> None:
    clean_measurement = lp.sanitize_measurement(measurement)
    assume(clean_measurement and not clean_measurement.startswith("#"))
    assume(all(lp.sanitize_key(k) for k in list(tags) + list(fields)))
    assume(len({lp.sanitize_key(k) for k in tags}) == len(tags))
    assume(len({lp.sanitize_key(k) for k in fields}) == len(fields))

    line = lp.encode_point(measurement, tags, fields, timestamp)  # type: ignore[arg-type]
    expected_fields = {lp.sanitize_key(k): _expected_field(v) for k, v in fields.items()}
    expected_fields = {k: v for k, v in expected_fields.items() if v is not None}
    if not expected_fields:
        assert line is None
        return
    assert line is not None
    assert "\n" not in line and "\r" not in line
    point = parse_line(line)
    assert point.measurement == clean_measurement
    assert point.tags == {lp.sanitize_key(k): lp.sanitize_tag_value(v) for k, v in tags.items()}
    assert point.fields == expected_fields
    assert point.timestamp == timestamp
    # influxd's splitter ends this line exactly where it ends, whatever follows it
    assert go_scan_line(line + '\nm,q=" f="x" 1') == len(line)


def _is_clean(value: str) -> bool:
    return bool(value) and lp.sanitize_tag_value(value) == value


@settings(max_examples=300, deadline=None)
@given(values=st.lists(text, min_size=1, max_size=5))
def test_clean_text_is_stored_exactly_and_batches_never_gain_points(values: list[str]) -> None:
    lines = [lp.encode_point("job_energy", {"label": v, "user": v}, {"s": v, "joules": 1.0}, i) for i, v in enumerate(values)]
    body = "\n".join(line for line in lines if line)
    points = parse_lines(body)
    assert len(points) == len(values)
    assert [p.measurement for p in points] == ["job_energy"] * len(values)
    for value, point in zip(values, points):
        assert point.tags["label"] == lp.sanitize_tag_value(value)
        if _is_clean(value):
            assert point.tags["label"] == value and point.fields["s"] == value
    # the Go splitter agrees on every boundary
    pos, count = 0, 0
    while pos <= len(body):
        end = go_scan_line(body, pos)
        count += 1
        pos = end + 1
    assert count == len(values)


# ---------------------------------------------------------------------------- points

HOST = "node-1"
T0 = 1_700_000_000.25


def _record() -> TickRecord:
    return TickRecord(
        sampled_at=T0,
        interval_s=1.0,
        readings=(
            DeviceReading(kind="gpu", device="gpu0", energy_j=250.0, power_w=250.0, source="counter", interval_s=1.0),
            DeviceReading(kind="cpu", device="package-0", energy_j=60.0, power_w=60.0, source="counter", interval_s=1.0),
            DeviceReading(kind="dram", device="dram-0", energy_j=6.0, power_w=6.0, source="estimate", interval_s=1.0),
        ),
        jobs={
            "j1": JobRef(job_id="j1", label="lora 7b, run=1", user="alice", uid=1000),
            "j2": JobRef(job_id="j2", label="", user="bob", uid=1001),
        },
        job_energy_j={
            "j1": {"gpu": 200.0, "cpu": 30.0, "dram": 3.0},
            "j2": {"gpu": 25.0, "cpu": 10.0, "dram": 1.0},
        },
        unattributed_j={"gpu": 25.0, "cpu": 20.0, "dram": 2.0},
    )


def test_tick_to_lines_writes_the_contract_measurements() -> None:
    points = [parse_line(line) for line in tick_to_lines(_record(), HOST)]
    ts = lp.ns_from_s(T0)
    assert all(p.timestamp == ts for p in points)
    by_measurement: dict[str, list[Point]] = {}
    for p in points:
        by_measurement.setdefault(p.measurement, []).append(p)
    assert sorted(by_measurement) == ["device_power", "job_energy", "unattributed_energy"]
    gpu = next(p for p in by_measurement["device_power"] if p.tags["device"] == "gpu0")
    assert gpu.tags == {"host": HOST, "kind": "gpu", "device": "gpu0"}
    assert gpu.fields == {"watts": 250.0, "joules": 250.0, "source": "counter"}
    j1_gpu = next(p for p in by_measurement["job_energy"] if p.tags["job_id"] == "j1" and p.tags["kind"] == "gpu")
    assert j1_gpu.tags == {"host": HOST, "job_id": "j1", "label": "lora 7b, run=1", "user": "alice", "kind": "gpu"}
    assert j1_gpu.fields == {"joules": 200.0}
    j2 = [p for p in by_measurement["job_energy"] if p.tags["job_id"] == "j2"]
    assert {p.tags["label"] for p in j2} == {lp.EMPTY_TAG_VALUE}
    assert len(by_measurement["job_energy"]) == 6
    assert {p.tags["kind"]: p.fields["joules"] for p in by_measurement["unattributed_energy"]} == {
        "gpu": 25.0, "cpu": 20.0, "dram": 2.0,
    }


def test_tick_lines_conserve_energy_per_component() -> None:
    points = [parse_line(line) for line in tick_to_lines(_record(), HOST)]
    for kind in ("gpu", "cpu", "dram"):
        device = sum(p.fields["joules"] for p in points if p.measurement == "device_power" and p.tags["kind"] == kind)  # type: ignore[misc]
        booked = sum(
            p.fields["joules"]  # type: ignore[misc]
            for p in points
            if p.measurement in ("job_energy", "unattributed_energy") and p.tags["kind"] == kind
        )
        assert booked == pytest.approx(device)


def test_series_keys_are_stable_across_ticks() -> None:
    def series(record: TickRecord) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
        return [(p.measurement, tuple(sorted(p.tags.items()))) for p in map(parse_line, tick_to_lines(record, HOST))]

    first = _record()
    later = TickRecord(
        sampled_at=T0 + 1, interval_s=1.0, readings=first.readings, jobs=first.jobs,
        job_energy_j={"j1": {"gpu": 1.0, "cpu": 1.0, "dram": 1.0}, "j2": {"gpu": 2.0, "cpu": 2.0, "dram": 2.0}},
        unattributed_j=first.unattributed_j,
    )
    assert series(first) == series(later)
    assert tick_to_lines(first, HOST) == tick_to_lines(first, HOST)  # a replay is byte-identical


def test_tick_with_nan_reading_keeps_the_finite_fields() -> None:
    record = TickRecord(
        sampled_at=T0, interval_s=1.0,
        readings=(DeviceReading(kind="gpu", device="gpu0", energy_j=math.nan, power_w=100.0, source="power", interval_s=1.0),),
        jobs={}, job_energy_j={"ghost": {"gpu": math.nan}}, unattributed_j={},
    )
    points = [parse_line(line) for line in tick_to_lines(record, HOST)]
    assert len(points) == 1
    assert points[0].fields == {"watts": 100.0, "source": "power"}


def test_job_co2e_and_grid_intensity_lines() -> None:
    line = job_co2e_line(
        host=HOST, job_id="j1", label="a b", user="alice", grams=57.0, g_per_kwh=82.5, status="provisional", at_s=T0
    )
    assert line is not None
    p = parse_line(line)
    assert p.measurement == "job_co2e"
    assert p.tags == {"host": HOST, "job_id": "j1", "label": "a b", "user": "alice"}
    assert p.fields == {"grams": 57.0, "g_per_kwh": 82.5, "status": "provisional"}
    assert p.timestamp == lp.ns_from_s(T0)
    final = job_co2e_line(host=HOST, job_id="j1", label="a b", user="alice", grams=56.0, g_per_kwh=81.0, status="final", at_s=T0)
    assert final is not None and final.split(" ")[0] == line.split(" ")[0]  # same series: settlement overwrites
    assert job_co2e_line(host=HOST, job_id="j1", label="", user="", grams=math.nan, g_per_kwh=1.0, status="final", at_s=T0) is None

    g = grid_intensity_line(zone="DK1", provider="energidataservice", kind="actual", g_per_kwh=82.5, at_s=1_700_000_000)
    assert g == "grid_intensity,kind=actual,provider=energidataservice,zone=DK1 g_per_kwh=82.5 1700000000000000000"
    assert grid_intensity_line(zone="DK1", provider="x", kind="forecast", g_per_kwh=math.inf, at_s=0) is None


# ------------------------------------------------------- lifecycle figures (issue 16)


def test_job_co2e_line_carries_market_grams_when_given() -> None:
    line = job_co2e_line(host=HOST, job_id="j1", label="a b", user="alice", grams=57.0, g_per_kwh=82.5,
                         status="provisional", at_s=T0, market_grams=22.75)
    assert line is not None
    p = parse_line(line)
    assert p.fields == {"grams": 57.0, "g_per_kwh": 82.5, "status": "provisional", "market_grams": 22.75}
    assert p.tags == {"host": HOST, "job_id": "j1", "label": "a b", "user": "alice"}
    # not given: the field is left out (an earlier value of it stays in InfluxDB)
    bare = job_co2e_line(host=HOST, job_id="j1", label="a b", user="alice", grams=57.0, g_per_kwh=82.5,
                         status="provisional", at_s=T0)
    assert bare is not None and "market_grams" not in parse_line(bare).fields
    # a non-finite market figure is dropped, the rest of the point stays
    nan = job_co2e_line(host=HOST, job_id="j1", label="", user="", grams=1.0, g_per_kwh=2.0, status="final",
                        at_s=T0, market_grams=math.nan)
    assert nan is not None and parse_line(nan).fields == {"grams": 1.0, "g_per_kwh": 2.0, "status": "final"}


def footprint_record(embodied: dict[str, float], water: dict[str, float], jobs: dict[str, JobRef]) -> TickRecord:
    return TickRecord(sampled_at=T0, interval_s=1.0, readings=(), jobs=jobs, job_energy_j={}, unattributed_j={},
                      job_embodied_co2e_g=embodied, job_water_l=water)


def test_job_footprint_points_one_per_job_with_this_ticks_amounts() -> None:
    jobs = {
        "j1": JobRef("j1", NASTY_LABEL, 'bob"}, evil="1', 1000),
        "j2": JobRef("j2", "", "carol", 1001),
        "idle": JobRef("idle", "idle", "dave", 1002),
    }
    record = footprint_record({"j1": 0.125, "j2": 0.0, "idle": 0.0, "gone": 0.5},
                              {"j1": 0.0375, "j2": 0.002, "idle": 0.0}, jobs)
    points = [parse_line(line) for line in tick_to_lines(record, HOST)]
    fp = {p.tags["job_id"]: p for p in points if p.measurement == "job_footprint"}
    assert set(fp) == {"j1", "j2", "gone"}  # "idle": both 0 this tick, no point
    assert fp["j1"].fields == {"embodied_grams": 0.125, "water_litres": 0.0375}
    assert fp["j1"].tags == {"host": HOST, "job_id": "j1", "label": lp.sanitize_tag_value(NASTY_LABEL),
                             "user": lp.sanitize_tag_value('bob"}, evil="1')}
    assert fp["j2"].fields == {"embodied_grams": 0.0, "water_litres": 0.002}
    assert fp["j2"].tags["label"] == lp.EMPTY_TAG_VALUE
    assert fp["gone"].fields == {"embodied_grams": 0.5, "water_litres": 0.0}  # no ref: empty tags, point kept
    assert all(p.timestamp == lp.ns_from_s(T0) for p in fp.values())
    # nothing at all without lifecycle figures (the points of before)
    assert not [ln for ln in tick_to_lines(footprint_record({}, {}, jobs), HOST) if ln.startswith("job_footprint")]
    # a non-finite figure is left out of its point, not the point
    [nan] = [parse_line(ln) for ln in tick_to_lines(footprint_record({"j1": math.inf}, {"j1": 0.5}, jobs), HOST)]
    assert nan.fields == {"water_litres": 0.5}


NASTY_LABEL = 'evil" f=1 1\nevil,host=x embodied_grams=1e9 2 \\'


def test_publisher_writes_market_grams_per_bucket_and_at_settlement() -> None:
    from wattprint.daemon.model import SettledBucket
    from wattprint.exporters.influx_publish import InfluxPublisher

    class Sink:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def submit(self, lines: list[str]) -> None:
            self.lines.extend(lines)

    sink = Sink()
    pub = InfluxPublisher(sink, HOST)  # type: ignore[arg-type]
    ref = JobRef("j", "l", "u", 1)
    pub.on_tick(TickRecord(sampled_at=T0 + 5, interval_s=1.0, readings=(), jobs={"j": ref}, job_energy_j={},
                           unattributed_j={}, bucket_start=1_700_000_000, bucket_co2e_g={"j": 12.5},
                           bucket_co2e_market_g={"j": 7.25}, g_per_kwh=300.0, intensity_status="provisional",
                           job_embodied_co2e_g={"j": 0.5}, job_water_l={"j": 0.25}))
    pub.on_settled([SettledBucket(job=ref, bucket_start=1_700_000_000, co2e_g=11.0, g_per_kwh=264.0, status="final",
                                  co2e_market_g=6.5)])
    co2e = [parse_line(ln) for ln in sink.lines if ln.startswith("job_co2e")]
    assert [p.fields for p in co2e] == [
        {"grams": 12.5, "g_per_kwh": 300.0, "status": "provisional", "market_grams": 7.25},
        {"grams": 11.0, "g_per_kwh": 264.0, "status": "final", "market_grams": 6.5},
    ]
    assert co2e[0].tags == co2e[1].tags and co2e[0].timestamp == co2e[1].timestamp  # settlement overwrites
    [fp] = [parse_line(ln) for ln in sink.lines if ln.startswith("job_footprint")]
    assert fp.fields == {"embodied_grams": 0.5, "water_litres": 0.25} and fp.timestamp == lp.ns_from_s(T0 + 5)
