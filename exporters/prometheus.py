"""Prometheus exposition of the daemon's latest Snapshot.

One custom collector renders whatever ``get_snapshot()`` returns (the immutable snapshot
of the last tick) and never touches hardware, so a scrape costs a few microseconds per
series and always agrees with the other sinks. Metric names are a public contract
(docs/api.md; changes only with a reason in CHANGELOG.md). The collector has its own registry, not prometheus_client's
global one, and emits no ``_created`` series (custom metric families have none).

A failure while building one group of metrics (devices, jobs, health, ...) drops that
group from this scrape only: the rest is still served, the failure is logged once
(until that group renders again) and counted in ``wattprint_exporter_errors_total``.
Label values come from untrusted users (job labels, user names); prometheus_client
escapes ``\\``, ``"`` and newline, and text that cannot be encoded as UTF-8 (lone
surrogates from undecodable bytes) is backslash-escaped here so it cannot fail a scrape.
GPU series carry ``uuid`` and ``model_name`` labels (snake_case: promtool's lint rejects
camelCase); the shipped Prometheus config renames them to dcgm-exporter's ``UUID`` and
``modelName`` at scrape time (metric_relabel_configs), so the two exporters join. The daemon's registry also holds ``wattprint_build_info`` and
prometheus_client's ``process_*`` collector (``add_daemon_collectors``).
"""

from __future__ import annotations

import logging
import platform
import re
import threading
from importlib import metadata
from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from wattprint.daemon.model import COMPONENTS, JobTotals, Snapshot

log = logging.getLogger("wattprint.exporters.prometheus")

# Prometheus text exposition format 0.0.4 (prometheus_client's CONTENT_TYPE_LATEST may
# name a newer version; this module renders 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PREFIX = "wattprint_"
EXPORTER_ERRORS = "wattprint_exporter_errors_total"
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")

# Sample names this module emits itself; a Snapshot.counters key may not shadow one.
RESERVED_NAMES = frozenset(
    {
        "wattprint_device_power_watts",
        "wattprint_device_energy_joules_total",
        "wattprint_device_info",
        "wattprint_job_energy_joules_total",
        "wattprint_job_co2e_grams",
        "wattprint_job_embodied_co2e_grams",
        "wattprint_job_market_co2e_grams",
        "wattprint_job_water_litres",
        "wattprint_job_running",
        "wattprint_unattributed_energy_joules_total",
        "wattprint_grid_intensity_grams_per_kwh",
        "wattprint_source_up",
        "wattprint_source_state",
        "wattprint_source_errors_total",
        "wattprint_tick_duration_seconds",
        "wattprint_ticks_total",
        "wattprint_last_tick_timestamp_seconds",
        "wattprint_counter_glitches_total",
        "wattprint_build_info",
        EXPORTER_ERRORS,
    }
)

# HELP text of every Snapshot.counters key the daemon sets (docs/api.md lists them). A key
# missing here renders with PLACEHOLDER_HELP; a test of the real daemon rejects that, so a
# new self-metric must come with its text.
COUNTER_HELP: Mapping[str, str] = {
    "gpu_invisible_process_energy_joules_total":
        "GPU energy left unattributed because its process was not visible in /proc (another PID namespace, "
        "pid 0, exited between reads), in joules; part of wattprint_unattributed_energy_joules_total{kind=\"gpu\"}.",
    "gpu_feature_failures_total": "Failed GPU side queries (process list, memory, utilisation); the energy is "
                                  "booked all the same.",
    "gpu_nvml_calls_total": "NVML calls made since the daemon started.",
    "gpu_nvml_reinits_total": "NVML re-initialisations (after a lost GPU or driver reload).",
    "gpu_pids_not_visible_total": "Distinct GPU process PIDs that had no /proc entry visible to the daemon.",
    "gpu_power_samples_total": "Power samples taken for GPUs without an energy counter.",
    "gpu_processes_not_visible": "GPU processes in the last NVML read whose PID has no /proc entry here.",
    "gpu_util_samples_discarded_total": "GPU utilisation samples discarded as junk (unknown PID, above 100 %, "
                                        "stale or future timestamp).",
    "http_accept_errors_total": "accept() calls on the API listener that failed for lack of file descriptors.",
    "http_connections_open": "Open HTTP API connections.",
    "http_connections_rejected_total": "HTTP API connections refused because a connection cap was reached.",
    "http_header_timeouts_total": "HTTP API connections closed for not sending a request head in time.",
    "http_max_connections": "Effective cap on open HTTP API connections.",
    "influx_points_retried_total": "InfluxDB lines sent again after a failed write.",
    "influx_points_written_total": "InfluxDB lines the server acknowledged (HTTP 204).",
    "node_below_components_total": "Ticks whose node input energy from the BMC was below the GPU, CPU and DRAM "
                                   "measured in the same tick (the remainder, other, was booked as 0).",
    "node_carry_joules": "Measured energy a BMC counter correction left without node cover, to be taken from the "
                         "next ticks' remainder (other) before it is booked; 0 when none (docs/jobs.md).",
    "node_reads_total": "Successful reads of the node's power from its BMC ([node] source).",
    "node_read_errors_total": "Failed reads of the BMC (timeouts, refused credentials, HTTP or ipmitool errors).",
    "node_read_timeouts_total": "BMC reads that did not finish within [node] timeout_s (part of "
                                "wattprint_node_read_errors_total).",
    "node_auth_errors_total": "BMC reads refused for the credentials: HTTP 401/403 or no IPMI session (part of "
                              "wattprint_node_read_errors_total).",
    "node_stale_readings_total": "BMC readings older than [node] max_age_s (ReadingTime), not booked.",
    "node_counter_resets_total": "Times the BMC's energy counter went back (reset); re-baselined, not booked.",
    "node_implausible_steps_total": "BMC energy counter steps larger than any node draws; re-baselined, not booked.",
    "labels_overflow_total": "Jobs filed under the label _overflow because their user was at "
                             "[jobs] max_labels_per_user.",
    "processes_labels_unreadable": "Live processes whose environment the kernel refused, so their job label "
                                   "cannot be read.",
    "source_read_timeouts_total": "Source reads that missed the tick's deadline (the interval was estimated).",
    "spool_bytes": "Bytes of InfluxDB lines waiting in the on-disk spool.",
    "spool_oldest_age_seconds": "Age of the oldest undelivered line in the InfluxDB spool, in seconds (0 when empty).",
    "spool_pending_points": "InfluxDB lines waiting in the on-disk spool.",
    "spool_unreadable_bytes_total": "Spool bytes that could not be read back (corrupt records skipped).",
    "store_pending_ticks": "Ticks waiting to be written to the SQLite store (kept in memory while it fails).",
    "store_pruned_rows_total": "Store rows removed by [daemon] retention_days.",
    "store_ticks_dropped_total": "Ticks the SQLite store could not take and that were dropped after the "
                                 "in-memory backlog filled.",
    "tick_errors_total": "Ticks that failed with an unexpected error (the interval's energy is kept for the next).",
    "tick_overruns_total": "Ticks that took longer than [daemon] interval_s.",
    "unattributed_embodied_co2e_grams_total":
        "Embodied (manufacturing) CO2e of device time no job occupied (idle, non-job or invisible processes), "
        "in grams, since the daemon started; amortised over the service life as for jobs (docs/carbon.md).",
}
PLACEHOLDER_HELP = "Daemon self-metric {key} (no description)."
# wattprint_influx_points_dropped_<reason>_total: deprecated (CHANGELOG, docs/api.md); the
# same figure is wattprint_influx_points_dropped_total{reason="<reason>"}.
_DEPRECATED_DROPPED = re.compile(r"^influx_points_dropped_([a-z0-9_]+)_total$")


def counter_help(key: str) -> str:
    """The HELP text of the self-metric ``wattprint_<key>``."""
    if key in COUNTER_HELP:
        return COUNTER_HELP[key]
    m = _DEPRECATED_DROPPED.match(key)
    if m:
        return (f"Deprecated, removed in the next release: use wattprint_influx_points_dropped_total"
                f"{{reason=\"{m.group(1)}\"}} (same value).")
    return PLACEHOLDER_HELP.format(key=key)

ErrorReporter = Callable[[str, str], None]  # (where, what is wrong): count and log a problem


def _text(value: object) -> str:
    """A label value that always encodes as UTF-8 (escaping is prometheus_client's job)."""
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _components(energy_j: Mapping[str, float], with_other: bool = True) -> Iterator[tuple[str, float]]:
    """(component, joules) for gpu, cpu, dram, other in that order; other keys (e.g. a total)
    are left out so that summing over ``kind`` never double-counts. ``other`` (the node
    remainder) only ``with_other`` (the host has a node reading) or when it is not 0, so
    that without a BMC the series are those of before."""
    for component in COMPONENTS:
        if component in energy_j:
            joules = float(energy_j[component])
            if component == "other" and not with_other and joules == 0.0:
                continue
            yield component, joules


def _has_node(snapshot: Snapshot) -> bool:
    return any(d.kind == "node" for d in snapshot.devices)


def _devices(snapshot: Snapshot, report: ErrorReporter) -> list[Metric]:
    power = GaugeMetricFamily(
        "wattprint_device_power_watts", "Latest power of each device, in watts.", labels=["kind", "device"]
    )
    energy = CounterMetricFamily(
        "wattprint_device_energy_joules_total",
        "Energy each device used since the daemon started, in joules.",
        labels=["kind", "device"],
    )
    info = GaugeMetricFamily(
        "wattprint_device_info",
        "Always 1: a device's model name and where its energy figures come from (counter, power, estimate).",
        labels=["kind", "device", "name", "source"],
    )
    for device in snapshot.devices:
        labels = {"kind": _text(device.kind), "device": _text(device.device)}
        if device.kind == "gpu":  # dcgm-exporter's UUID / modelName after the shipped relabelling
            labels.update(uuid=_text(device.uuid), model_name=_text(device.name), vendor=_text(device.vendor))
        power.add_sample(power.name, labels, float(device.power_w))
        energy.add_sample(energy.name + "_total", labels, float(device.energy_j_total))
        info.add_sample(info.name, {**labels, "name": _text(device.name), "source": _text(device.source)}, 1.0)
    return [power, energy, info]


def _job_families() -> list[Metric]:
    """The six per-job families, empty: energy, CO2e, embodied, market, water, running."""
    energy = CounterMetricFamily(
        "wattprint_job_energy_joules_total",
        "Energy booked to each job by component (gpu, cpu, dram; other: its share of the node remainder "
        "from the BMC), in joules.",
        labels=["job_id", "label", "user", "kind"],
    )
    co2e = GaugeMetricFamily(
        "wattprint_job_co2e_grams",
        "CO2e of each job so far, in grams; settlement of provisional intensity may revise it.",
        labels=["job_id", "label", "user"],
    )
    embodied = GaugeMetricFamily(
        "wattprint_job_embodied_co2e_grams",
        "Embodied (manufacturing) CO2e of the devices each job occupied so far, amortised over their service "
        "life, in grams; restated when the footprint factors change.",
        labels=["job_id", "label", "user"],
    )
    market = GaugeMetricFamily(
        "wattprint_job_market_co2e_grams",
        "Market-based CO2e of each job so far (contractual instruments, GHG Protocol Scope 2), in grams; "
        "settlement of provisional intensity may revise it.",
        labels=["job_id", "label", "user"],
    )
    water = GaugeMetricFamily(
        "wattprint_job_water_litres",
        "Water consumed for each job so far (on-site WUE plus off-site water intensity of the electricity "
        "times PUE), in litres.",
        labels=["job_id", "label", "user"],
    )
    running = GaugeMetricFamily(
        "wattprint_job_running", "1 while the job runs, 0 once it has finished.", labels=["job_id", "label", "user"]
    )
    return [energy, co2e, embodied, market, water, running]


def _jobs(snapshot: Snapshot, report: ErrorReporter) -> list[Metric]:
    families = _job_families()
    with_other = _has_node(snapshot)
    global _finished_job_parts
    cached = _finished_job_parts
    kept: dict[int, _JobParts] = {}
    # Per job in order: a finished job's parts, or (for a running job, added to the
    # families directly) where its samples start and end in each family.
    order: list[_JobParts | tuple[list[int], list[int]]] = []
    scratch: list[Metric] | None = None
    for job in snapshot.jobs:
        if job.state == "running":
            begin = [len(f.samples) for f in families]
            _add_job(families, job, with_other)
            order.append((begin, [len(f.samples) for f in families]))
            continue
        parts = cached.get(id(job))
        if parts is None or parts[0] is not job or parts[1] != with_other:
            scratch = scratch or _job_families()
            parts = _job_parts(job, with_other, scratch)
        kept[id(job)] = parts
        for family, samples in zip(families, parts[2]):
            family.samples.extend(samples)
        order.append(parts)
    _finished_job_parts = kept
    if kept and all(parts[4] for parts in kept.values()) and all(_plain_head(f) for f in families):
        # The families' text from the finished jobs' kept lines and the running jobs' new
        # ones, in sample order (else family_text renders them itself, as before).
        texts: list[list[str]] = [[] for _ in families]
        for entry in order:
            if len(entry) == 2:
                begin, stop = entry  # type: ignore[misc]
                for i, family in enumerate(families):
                    run = family.samples[begin[i]:stop[i]]
                    if not all(_plain_sample(family, sample) for sample in run):
                        return families
                    texts[i].append(_lines(run))
            else:
                for i, text in enumerate(entry[3]):  # type: ignore[misc]
                    texts[i].append(text)
        for family, acc in zip(families, texts):
            family.__dict__[_TEXT_ATTR] = _header(family) + "".join(acc)
    return families


def _add_job(families: list[Metric], job: JobTotals, with_other: bool) -> None:
    """One job's samples, added to _jobs' six families."""
    energy, co2e, embodied, market, water, running = families
    key = [_text(job.job_id), _text(job.label), _text(job.user)]
    for component, joules in _components(job.energy_j, with_other):
        energy.add_metric(key + [component], joules)
    co2e.add_metric(key, float(job.co2e_g))
    embodied.add_metric(key, float(job.embodied_co2e_g))
    market.add_metric(key, float(job.co2e_market_g))
    water.add_metric(key, float(job.water_l))
    running.add_metric(key, 1.0 if job.state == "running" else 0.0)


# A finished job's samples and text lines, per family of _jobs, kept from one build to
# the next (issue 18): up to [jobs] max_finished_in_metrics finished jobs are in every
# snapshot, unchanged, and rendering them was most of a /metrics render (6 ms for 200).
# id(job) -> (job, with_other, samples per family, text per family, all plain); an
# entry is used only for that very object (JobBook hands over the same JobTotals of a
# finished job while it is unchanged); the map holds only the last build's finished jobs.
_JobParts = tuple[JobTotals, bool, list[list[Any]], list[str], bool]
_finished_job_parts: dict[int, _JobParts] = {}


def _job_parts(job: JobTotals, with_other: bool, own: list[Metric]) -> _JobParts:
    """One job's samples of each of _jobs' six families (in order) and their lines as
    ``family_text`` writes them (when all are plain); ``own``: _job_families() to fill."""
    for family in own:
        family.samples = []
    _add_job(own, job, with_other)
    plain = all(_plain(f) for f in own)
    return (job, with_other, [f.samples for f in own], [_lines(f.samples) if plain else "" for f in own], plain)


def _unattributed(snapshot: Snapshot, report: ErrorReporter) -> list[Metric]:
    family = CounterMetricFamily(
        "wattprint_unattributed_energy_joules_total",
        "Energy the devices used that no job was booked for, in joules.",
        labels=["kind"],
    )
    for component, joules in _components(snapshot.unattributed_j_total, _has_node(snapshot)):
        family.add_metric([component], joules)
    return [family]


def _grid(snapshot: Snapshot, report: ErrorReporter) -> list[Metric]:
    if snapshot.grid_g_per_kwh is None:
        return []
    family = GaugeMetricFamily(
        "wattprint_grid_intensity_grams_per_kwh",
        "Carbon intensity of the grid now, in grams CO2e per kWh.",
        labels=["zone", "provider"],
    )
    family.add_metric([_text(snapshot.grid_zone), _text(snapshot.grid_provider)], float(snapshot.grid_g_per_kwh))
    return [family]


def _health(snapshot: Snapshot, report: ErrorReporter) -> list[Metric]:
    up = GaugeMetricFamily(
        "wattprint_source_up", "1 when a source or sink is ok, 0 when degraded or disabled.", labels=["source"]
    )
    state = GaugeMetricFamily(
        "wattprint_source_state",
        "Always 1: the current state (ok, degraded, disabled) of each source or sink.",
        labels=["source", "state"],
    )
    errors = CounterMetricFamily("wattprint_source_errors_total", "Failures of each source or sink.", labels=["source"])
    for part in snapshot.health:
        name = _text(part.name)
        up.add_metric([name], 1.0 if part.state == "ok" else 0.0)
        state.add_metric([name, _text(part.state)], 1.0)
        errors.add_metric([name], float(part.errors_total))
    return [up, state, errors]


def _glitches(snapshot: Snapshot, report: ErrorReporter) -> list[Metric]:
    family = CounterMetricFamily(
        "wattprint_counter_glitches_total",
        "Energy counter readings not trusted (stepped back, out of range, beyond physics); "
        "each such interval's energy was estimated.",
        labels=["source", "device", "reason"],
    )
    for (source, device, reason), n in sorted(snapshot.counter_glitches.items()):
        family.add_metric([_text(source), _text(device), _text(reason)], float(n))
    return [family]


def _tick(snapshot: Snapshot, report: ErrorReporter) -> list[Metric]:
    return [
        GaugeMetricFamily(
            "wattprint_tick_duration_seconds",
            "How long the last tick took, in seconds.",
            value=float(snapshot.tick_duration_s),
        ),
        CounterMetricFamily("wattprint_ticks_total", "Ticks since the daemon started.", value=float(snapshot.tick)),
        GaugeMetricFamily(
            "wattprint_last_tick_timestamp_seconds",
            "Wall-clock time of the last tick, in seconds since the epoch.",
            value=float(snapshot.taken_at),
        ),
    ]


def _counters(snapshot: Snapshot, report: ErrorReporter) -> list[Metric]:
    """Snapshot.counters as wattprint_<key>: counters for keys ending in _total, else gauges.

    A key that makes an invalid or reserved metric name is left out and reported.
    """
    families: list[Metric] = []
    for key in sorted(snapshot.counters):
        name = PREFIX + key
        if not _METRIC_NAME.match(name) or name in RESERVED_NAMES:
            report(f"counter {key!r}", "not a usable metric name, or one the exporter emits itself")
            continue
        value = float(snapshot.counters[key])
        if key.endswith("_total"):
            families.append(CounterMetricFamily(name, counter_help(key), value=value))
        else:
            families.append(GaugeMetricFamily(name, counter_help(key), value=value))
    return families


Section = Callable[[Snapshot, ErrorReporter], list[Metric]]
SECTIONS: tuple[tuple[str, Section], ...] = (
    ("devices", _devices),
    ("jobs", _jobs),
    ("unattributed", _unattributed),
    ("grid", _grid),
    ("health", _health),
    ("glitches", _glitches),
    ("tick", _tick),
    ("counters", _counters),
)


class SnapshotCollector:
    """prometheus_client collector over the latest Snapshot (None before the first tick)."""

    def __init__(self, get_snapshot: Callable[[], Snapshot | None]) -> None:
        self._get_snapshot = get_snapshot
        self._lock = threading.Lock()
        self._errors_total = 0
        self._failing: set[str] = set()  # places that failed and have not rendered since
        # (the snapshot, its families) of the last complete build: the snapshot is held, so
        # its identity cannot be reused by a later one.
        self._cache: tuple[Snapshot, list[Metric]] | None = None

    @property
    def errors_total(self) -> int:
        """Failures while collecting, since this collector was made."""
        return self._errors_total

    def _failed(self, where: str, detail: str = "") -> None:
        """Count a failure; log it only when ``where`` starts failing. Without ``detail``
        it must be called from an ``except`` block, and logs the traceback."""
        with self._lock:
            self._errors_total += 1
            first = where not in self._failing
            self._failing.add(where)
        level = logging.WARNING if first else logging.DEBUG
        if detail:
            log.log(level, "prometheus exporter: %s left out of the scrape: %s", where, detail)
        else:
            log.log(level, "prometheus exporter: %s left out of the scrape", where, exc_info=True)

    def _recovered(self, where: str) -> None:
        with self._lock:
            if where not in self._failing:
                return
            self._failing.discard(where)
        log.info("prometheus exporter: %s renders again", where)

    def _sections(self, snapshot: Snapshot) -> Iterable[Metric]:
        for where, build in SECTIONS:
            try:
                families = build(snapshot, self._failed)
            except Exception:
                self._failed(where)
                continue
            self._recovered(where)
            yield from (family for family in families if family.samples)

    def collect(self) -> Iterator[Metric]:
        try:
            snapshot = self._get_snapshot()
        except Exception:
            self._failed("snapshot")
            snapshot = None
        else:
            self._recovered("snapshot")
        if snapshot is not None:
            yield from self._snapshot_families(snapshot)
        yield CounterMetricFamily(
            EXPORTER_ERRORS,
            "Failures while rendering metrics; each left part of one scrape out.",
            value=float(self._errors_total),
        )

    def _snapshot_families(self, snapshot: Snapshot) -> list[Metric]:
        """The families of ``snapshot``, built once per snapshot (once per tick: a
        Snapshot is never mutated, and each tick publishes a new one) and kept with
        their text (``family_text``) for the scrapes that follow. A build in which
        any part failed is not kept, so each scrape tries (and counts) again."""
        with self._lock:
            cached = self._cache
        if cached is not None and cached[0] is snapshot:
            return cached[1]
        errors_before = self._errors_total
        families = list(self._sections(snapshot))
        if self._errors_total == errors_before:
            for family in families:
                family_text(family)  # rendered now, kept on the family
            with self._lock:
                self._cache = (snapshot, families)
        return families


def build_registry(get_snapshot: Callable[[], Snapshot | None]) -> CollectorRegistry:
    """A new registry (not prometheus_client's global one) holding one SnapshotCollector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(get_snapshot))
    return registry


def build_info() -> dict[str, str]:
    """Labels of ``wattprint_build_info``: this package's version, Python's, and those of
    the libraries whose behaviour shows in the figures ("" when one is not installed)."""
    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return ""

    from wattprint.daemon import __version__

    return {"version": __version__, "python": platform.python_version(), "nvml_py": dist("nvidia-ml-py"),
            "prometheus_client": dist("prometheus-client"), "aiohttp": dist("aiohttp")}


class BuildInfoCollector:
    """``wattprint_build_info{version,python,nvml_py,...} 1`` (node_exporter's habit)."""

    def __init__(self) -> None:
        self._labels = build_info()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("wattprint_build_info",
                                   "Always 1: the wattprint version and the versions of Python and the libraries "
                                   "it runs with.", labels=list(self._labels))
        family.add_metric(list(self._labels.values()), 1.0)
        yield family


def add_daemon_collectors(registry: CollectorRegistry) -> None:
    """What the running daemon adds to its registry besides the snapshot:
    ``wattprint_build_info`` and prometheus_client's ``process_*`` metrics of its own
    process (CPU seconds, resident memory, open file descriptors, start time)."""
    registry.register(BuildInfoCollector())  # type: ignore[arg-type]
    ProcessCollector(registry=registry)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition body (text format 0.0.4) and its Content-Type header value.
    Byte for byte what ``generate_latest(registry)`` gives (tests/test_metrics_cache.py);
    the snapshot's part is rendered once per tick (``SnapshotCollector``)."""
    return "".join(family_text(metric) for metric in registry.collect()).encode("utf-8"), CONTENT_TYPE


# -- the text format, without prometheus_client's per-sample generality -----------------
#
# ``generate_latest`` spends most of a scrape formatting samples through general code
# (name escaping schemes, OpenMetrics suffixes, timestamps, exemplars). The families
# here are plain counters and gauges with valid names, so ``family_text`` writes the
# same bytes directly, and keeps the text on the family object (a family built once
# per snapshot is rendered once). Anything else goes through generate_latest itself.

_LEGACY_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LEGACY_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TEXT_ATTR = "_wattprint_text"
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


class _One:
    """A collector of one family (for generate_latest)."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> list[Metric]:
        return [self.metric]


def _label_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
    return value


def _plain(metric: Metric) -> bool:
    """True when ``family_text``'s direct path renders ``metric`` exactly."""
    if not _plain_head(metric):
        return False
    for sample in metric.samples:  # (_plain_sample, inlined: this runs for every sample of a scrape)
        if (sample.timestamp is not None or sample.exemplar is not None
                or getattr(sample, "native_histogram", None) is not None
                or not _LEGACY_NAME.match(sample.name)
                or any(sample.name == metric.name + suffix for suffix in _OM_SUFFIXES)
                or not all(isinstance(v, str) and _LEGACY_LABEL.match(k) for k, v in sample.labels.items())):
            return False
    return True


def _plain_head(metric: Metric) -> bool:
    return metric.type in ("counter", "gauge") and bool(_LEGACY_NAME.match(metric.name))


def _plain_sample(metric: Metric, sample: Any) -> bool:
    return not (sample.timestamp is not None or sample.exemplar is not None
                or getattr(sample, "native_histogram", None) is not None
                or not _LEGACY_NAME.match(sample.name)
                or any(sample.name == metric.name + suffix for suffix in _OM_SUFFIXES)
                or not all(isinstance(v, str) and _LEGACY_LABEL.match(k) for k, v in sample.labels.items()))


def family_text(metric: Metric) -> str:
    """The text-format lines of one family, as ``generate_latest`` writes them."""
    text = metric.__dict__.get(_TEXT_ATTR)
    if text is not None:
        return text
    if not _plain(metric):
        text = generate_latest(_One(metric)).decode("utf-8")  # type: ignore[arg-type]
    else:
        text = _header(metric) + _lines(metric.samples)
    metric.__dict__[_TEXT_ATTR] = text
    return text


def _header(metric: Metric) -> str:
    """The ``# HELP`` and ``# TYPE`` lines of a plain family."""
    name = metric.name + "_total" if metric.type == "counter" else metric.name
    doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {metric.type}\n"


def _lines(samples: Iterable[Any]) -> str:
    """The text lines of a plain family's samples."""
    out = []
    for sample in samples:
        if sample.labels:
            labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(sample.labels.items()))
            out.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}\n")
        else:
            out.append(f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(out)


__all__ = ["CONTENT_TYPE", "BuildInfoCollector", "SnapshotCollector", "add_daemon_collectors", "build_registry",
           "render"]
