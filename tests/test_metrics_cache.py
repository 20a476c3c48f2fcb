"""/metrics rendered once per snapshot (issue 18): the body is byte for byte what
prometheus_client's ``generate_latest`` writes for the same registry and snapshot
(hostile labels included), a new snapshot (a new tick) is rendered anew, and a
render in which a part failed is not kept (each scrape tries and counts again)."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from test_prometheus_exporter import NASTY, NASTY_USER, full_snapshot
from wattprint.daemon.model import JobTotals, Snapshot
from wattprint.exporters import prometheus as prom
from wattprint.exporters.prometheus import (
    BuildInfoCollector,
    SnapshotCollector,
    build_registry,
    render,
)


class Static:
    """A collector of fixed families (built afresh on each collect)."""

    def __init__(self, build) -> None:  # type: ignore[no-untyped-def]
        self.build = build

    def collect(self) -> list[Metric]:
        return self.build()


def odd_families() -> list[Metric]:
    """Families the direct path must hand to generate_latest, or render exactly itself."""
    c = CounterMetricFamily("odd_counter", "help with \\ backslash\nand newline", labels=["a", "b"], created=12.5)
    c.add_metric(["x\\y", 'q"uote'], 1e-7)
    c.add_metric(["\n", ""], float("inf"))
    g = GaugeMetricFamily("odd_gauge", "values", labels=["z"])
    for i, v in enumerate([0.0, -0.0, 1.0, 123456789.0, 1e22, -1e-300, float("nan"), float("-inf"), 2.5e6]):
        g.add_metric([str(i)], v)
    t = GaugeMetricFamily("odd_stamped", "with a timestamp", labels=["k"])
    t.add_metric(["v"], 3.0, timestamp=1_700_000_000.123)
    h = HistogramMetricFamily("odd_hist", "a histogram", buckets=[("1.0", 2), ("+Inf", 3)], sum_value=4.5)
    i = InfoMetricFamily("odd_build", "an info", value={"version": "1"})
    return [c, g, t, h, i]


def test_body_is_byte_identical_to_generate_latest_for_the_daemons_families() -> None:
    for snap in (full_snapshot(), full_snapshot(label=NASTY, user=NASTY_USER), None,
                 Snapshot(taken_at=1.0, tick=1, tick_duration_s=0.001)):
        registry = build_registry(lambda snap=snap: snap)
        registry.register(BuildInfoCollector())  # type: ignore[arg-type]
        registry.register(Static(odd_families))  # type: ignore[arg-type]
        assert render(registry)[0] == generate_latest(registry)
        assert render(registry)[0] == generate_latest(registry)  # from the cache


def test_process_collector_is_rendered_each_scrape_and_identical() -> None:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    # process_* figures move between two calls; the same families give the same text.
    families = list(registry.collect())
    frozen = Static(lambda: families)
    r2 = CollectorRegistry(auto_describe=False)
    r2.register(frozen)  # type: ignore[arg-type]
    assert render(r2)[0] == generate_latest(r2)


label_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from('\\"\n{}=,'),
                     max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.lists(st.tuples(label_text, label_text), min_size=0, max_size=6),
       values=st.lists(st.floats(allow_nan=False) | st.sampled_from([0.0, 1e21, 123456.75]), min_size=6, max_size=6))
def test_hostile_labels_and_values_are_byte_identical(labels: list[tuple[str, str]], values: list[float]) -> None:
    jobs = tuple(JobTotals(job_id=f"{i}-1", label=lab, user=user, uid=i, state="running" if i % 2 else "finished",
                           energy_j={"gpu": values[i % 6], "cpu": values[(i + 1) % 6],
                                                                    "dram": abs(values[(i + 2) % 6])},
                           co2e_g=values[(i + 3) % 6])
                 for i, (lab, user) in enumerate(labels))
    snap = Snapshot(taken_at=2.0, tick=2, tick_duration_s=0.002, jobs=jobs,
                    counters={"labels_overflow_total": values[0], "spool_bytes": values[1]})
    registry = build_registry(lambda: snap)
    assert render(registry)[0] == generate_latest(registry)


def test_families_are_built_once_per_snapshot_and_anew_for_the_next() -> None:
    current = {"snap": full_snapshot()}
    builds: list[int] = []
    original = prom.SECTIONS

    def counting_devices(snapshot, report):  # type: ignore[no-untyped-def]
        builds.append(snapshot.tick)
        return prom._devices(snapshot, report)

    prom.SECTIONS = (("devices", counting_devices),) + tuple(s for s in original if s[0] != "devices")
    try:
        registry = build_registry(lambda: current["snap"])
        first = render(registry)[0]
        assert render(registry)[0] == first
        assert builds == [3600]  # the second scrape of the same tick built nothing
        # The next tick: a new Snapshot object, rendered anew and correctly.
        nxt = full_snapshot()
        object.__setattr__(nxt, "tick", 3601)
        current["snap"] = nxt
        second = render(registry)[0]
        assert builds == [3600, 3601]
        assert b"wattprint_ticks_total 3601.0\n" in second and b"wattprint_ticks_total 3600.0\n" in first
        assert second == generate_latest(registry)
    finally:
        prom.SECTIONS = original


def test_a_render_with_a_failing_part_is_not_kept_and_each_scrape_counts_it() -> None:
    snap = full_snapshot()
    registry = build_registry(lambda: snap)
    collector = next(c for c in registry._collector_to_names if isinstance(c, SnapshotCollector))
    original = prom.SECTIONS

    def broken(snapshot, report):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    prom.SECTIONS = (("jobs", broken),) + tuple(s for s in original if s[0] != "jobs")
    try:
        render(registry)
        render(registry)
        assert collector.errors_total == 2  # as without the cache: once per scrape
        body = render(registry)[0]
        assert b"wattprint_exporter_errors_total 3.0\n" in body
        assert b"wattprint_job_energy_joules_total" not in body
    finally:
        prom.SECTIONS = original
    # Recovered: the same snapshot renders whole again (the failed build was not kept).
    body = render(registry)[0]
    assert b"wattprint_job_energy_joules_total" in body and body == generate_latest(registry)


def test_help_and_names_of_every_character_class() -> None:
    doc = "".join(string.printable) + "ü✓"
    g = GaugeMetricFamily("x_gauge", doc, labels=["l"])
    g.add_metric([doc], 1.0)
    r = CollectorRegistry(auto_describe=False)
    r.register(Static(lambda: [g]))  # type: ignore[arg-type]
    assert render(r)[0] == generate_latest(r)
