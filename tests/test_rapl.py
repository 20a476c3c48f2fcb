"""RaplSource over fake powercap trees: discovery, exact joules, wraparound, failing
zones, the root-only energy_uj error (for real, as an unprivileged child), and the
CPU/DRAM source factory."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattprint.daemon.config import CpuConfig, MemoryConfig
from wattprint.daemon.health import HealthBoard
from wattprint.daemon.sources.base import SourceError
from wattprint.daemon.sources.cpu import open_cpu_sources
from wattprint.daemon.sources.estimate import CpuEstimateSource, DramEstimateSource
from wattprint.daemon.sources.rapl import RaplSource, discover_zones, probe_rapl

try:
    from powercap import PowercapTree
except ImportError:  # tests/ became a package
    from tests.powercap import PowercapTree


def by_device(readings) -> dict[str, Any]:
    return {r.device: r for r in readings}


@pytest.fixture
def tree(tmp_path: Path) -> PowercapTree:
    return PowercapTree(tmp_path / "powercap")


# -- discovery ------------------------------------------------------------------


def test_discovers_package_and_dram_ignores_core_and_uncore(tree: PowercapTree) -> None:
    tree.add_package(0)
    tree.add_zone("intel-rapl:0:2", "uncore")
    (tree.root / "intel-rapl").mkdir()  # the control-type directory, not a zone
    tree.add_zone("intel-rapl-mmio:0", "package-0")  # duplicates the MSR zone: skipped
    zones = discover_zones(str(tree.root))
    assert [(z.zone_id, z.kind, z.device) for z in zones] == [
        ("intel-rapl:0", "cpu", "package-0"),
        ("intel-rapl:0:1", "dram", "dram-0"),
    ]
    assert zones[0].max_energy_range_uj == 262_143_328_850
    src = RaplSource(str(tree.root))
    assert src.name == "rapl"
    assert sorted(r.device for r in src.read(0.0)) == ["dram-0", "package-0"]


def test_nested_subzones_are_found(tmp_path: Path) -> None:
    # /sys/devices/virtual/powercap/intel-rapl shape: subzones inside the package dir.
    tree = PowercapTree(tmp_path / "flat")
    tree.add_package(0, core=True, dram=True)
    nested = tmp_path / "nested"
    nested.mkdir()
    os.rename(tree.root / "intel-rapl:0", nested / "intel-rapl:0")
    for sub in ("intel-rapl:0:0", "intel-rapl:0:1"):
        os.rename(tree.root / sub, nested / "intel-rapl:0" / sub)
    assert [z.device for z in discover_zones(str(nested))] == ["package-0", "dram-0"]


def test_psys_ignored_when_packages_exist(tree: PowercapTree) -> None:
    tree.add_package(0)
    tree.add_psys(1)
    assert [z.device for z in discover_zones(str(tree.root))] == ["package-0", "dram-0"]


def test_psys_alone_is_read_as_cpu(tree: PowercapTree) -> None:
    tree.add_psys(0, start_uj=10)
    src = RaplSource(str(tree.root))
    assert [(z.kind, z.device) for z in src.zones] == [("cpu", "psys")]
    src.read(0.0)
    tree.advance("intel-rapl:0", 2_000_000)
    (r,) = src.read(1.0)
    assert (r.kind, r.device, r.energy_j) == ("cpu", "psys", 2.0)


def test_dram_under_a_non_package_zone_is_ignored(tree: PowercapTree) -> None:
    tree.add_psys(0)
    tree.add_zone("intel-rapl:0:0", "dram")
    assert [z.device for z in discover_zones(str(tree.root))] == ["psys"]


# -- energy ---------------------------------------------------------------------


def test_known_deltas_give_exact_joules(tree: PowercapTree) -> None:
    z = tree.add_package(0, start_uj=1_000_000)
    src = RaplSource(str(tree.root))
    first = by_device(src.read(100.0))
    assert first["package-0"].energy_j == 0.0 and first["dram-0"].energy_j == 0.0  # baseline
    tree.advance(z["package"], 5_000_000)
    tree.advance(z["dram"], 250_000)
    tree.advance(z["core"], 4_000_000)  # inside the package: never read
    second = by_device(src.read(101.0))
    pkg, dram = second["package-0"], second["dram-0"]
    assert (pkg.kind, pkg.energy_j, pkg.power_w, pkg.interval_s, pkg.source) == ("cpu", 5.0, 5.0, 1.0, "counter")
    assert (dram.kind, dram.energy_j, dram.power_w, dram.source) == ("dram", 0.25, 0.25, "counter")
    assert pkg.name == "intel-rapl:0"
    tree.advance(z["package"], 30_000_000)
    third = by_device(src.read(101.5))
    assert third["package-0"].energy_j == 30.0
    assert third["package-0"].power_w == 60.0
    assert third["package-0"].interval_s == 0.5
    assert third["dram-0"].energy_j == 0.0
    assert src.problems() == []


def test_wrap_loses_nothing(tree: PowercapTree) -> None:
    max_uj = 1_000_000
    z = tree.add_package(0, max_energy_range_uj=max_uj, dram=False, core=False, start_uj=900_000)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    assert tree.advance(z["package"], 300_000) == 200_000  # wrapped
    (r,) = src.read(1.0)
    assert r.energy_j == 0.3


def test_near_max_start_and_many_wraps_sum_exactly(tree: PowercapTree) -> None:
    max_uj = 65_532_610_987  # AMD EPYC 7543 range
    z = tree.add_package(0, max_energy_range_uj=max_uj, dram=False, start_uj=max_uj - 1)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    fed_uj = 0
    total_j = 0.0
    t = 0.0
    for step in [1, 2, max_uj - 5, 40_000_000_000, 30_000_000_000, 65_000_000_000, 7]:
        tree.advance(z["package"], step)
        fed_uj += step
        t += max(1.0, step / 1e6 / 250.0)  # reads spaced as at 250 W: physics allows each step
        (r,) = src.read(t)
        assert r.energy_j == step / 1e6 and r.source == "counter"
        total_j += r.energy_j
    assert fed_uj > 2 * max_uj  # it wrapped more than twice
    assert total_j == pytest.approx(fed_uj / 1e6, abs=1e-6)


def test_two_packages(tree: PowercapTree) -> None:
    z0 = tree.add_package(0)
    z1 = tree.add_package(1, start_uj=123)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.advance(z0["package"], 10_000_000)
    tree.advance(z1["package"], 20_000_000)
    tree.advance(z0["dram"], 1_000_000)
    tree.advance(z1["dram"], 2_000_000)
    got = {d: (r.kind, r.energy_j) for d, r in by_device(src.read(2.0)).items()}
    assert got == {
        "package-0": ("cpu", 10.0), "package-1": ("cpu", 20.0),
        "dram-0": ("dram", 1.0), "dram-1": ("dram", 2.0),
    }


def test_in_place_writes_are_seen_too(tree: PowercapTree) -> None:
    tree.add_package(0, dram=False, core=False)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    path = tree.root / "intel-rapl:0" / "energy_uj"
    inode = os.stat(path).st_ino
    with open(path, "r+") as fh:  # same inode, like sysfs
        fh.write("7000000\n")
    assert os.stat(path).st_ino == inode
    (r,) = src.read(1.0)
    assert r.energy_j == 7.0


def test_include_flags_select_zone_kinds(tree: PowercapTree) -> None:
    tree.add_package(0)
    assert [r.kind for r in RaplSource(str(tree.root), include_dram=False).read(0.0)] == ["cpu"]
    assert [r.kind for r in RaplSource(str(tree.root), include_cpu=False).read(0.0)] == ["dram"]


# -- failures -------------------------------------------------------------------


def test_vanishing_zone_is_reported_and_the_others_still_read(tree: PowercapTree) -> None:
    z0 = tree.add_package(0)
    z1 = tree.add_package(1)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.remove_zone(z1["package"])
    tree.advance(z0["package"], 3_000_000)
    tree.advance(z1["dram"], 1_000_000)
    got = by_device(src.read(1.0))
    assert sorted(got) == ["dram-0", "dram-1", "package-0"]
    assert got["package-0"].energy_j == 3.0
    assert got["dram-1"].energy_j == 1.0
    (problem,) = src.problems()
    assert "intel-rapl:1" in problem and "package-1" in problem and "vanished" in problem


def test_all_zones_vanish_then_come_back(tree: PowercapTree) -> None:
    z = tree.add_package(0, dram=False, core=False)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.remove_zone(z["package"])
    with pytest.raises(SourceError) as err:
        src.read(1.0)
    assert "intel-rapl:0" in err.value.detail
    with pytest.raises(SourceError):
        src.read(2.0)  # still nothing: rediscovery finds no zones
    tree.add_package(0, dram=False, core=False, start_uj=500)
    (r,) = src.read(3.0)  # rediscovered: a fresh baseline
    assert (r.device, r.energy_j) == ("package-0", 0.0)
    tree.advance(z["package"], 1_500_000)
    (r,) = src.read(4.0)
    assert r.energy_j == 1.5
    assert src.problems() == []


def test_garbage_content_is_a_problem_naming_the_file(tree: PowercapTree) -> None:
    z = tree.add_package(0)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    (tree.root / "intel-rapl:0:1" / "energy_uj").write_text("lots\n")
    tree.advance(z["package"], 2_000_000)
    got = by_device(src.read(1.0))
    assert list(got) == ["package-0"] and got["package-0"].energy_j == 2.0
    (problem,) = src.problems()
    assert str(tree.root / "intel-rapl:0:1" / "energy_uj") in problem and "not an integer" in problem
    # The zone comes back: its baseline was kept, so nothing is lost across the gap.
    tree.set_energy(z["dram"], 4_000_000)
    got = by_device(src.read(2.0))
    assert got["dram-0"].energy_j == 4.0 and got["dram-0"].interval_s == 2.0
    assert src.problems() == []


def test_only_zone_garbage_raises(tree: PowercapTree) -> None:
    tree.add_package(0, dram=False, core=False)
    (tree.root / "intel-rapl:0" / "energy_uj").write_text("")
    with pytest.raises(SourceError) as err:
        RaplSource(str(tree.root)).read(0.0)
    assert "intel-rapl:0/energy_uj" in err.value.detail


def test_bad_max_range_is_reported(tree: PowercapTree) -> None:
    tree.add_package(0, dram=False, core=False)
    (tree.root / "intel-rapl:0" / "max_energy_range_uj").write_text("n/a\n")
    src = RaplSource(str(tree.root))
    assert [r.device for r in src.read(0.0)] == ["package-0"]
    assert any("max_energy_range_uj" in p for p in src.problems())


def test_missing_root_fails_every_read_but_constructs(tmp_path: Path) -> None:
    root = str(tmp_path / "nothing")
    src = RaplSource(root)
    for t in (0.0, 1.0):
        with pytest.raises(SourceError) as err:
            src.read(t)
        assert root in err.value.detail
    assert probe_rapl(root) == ("absent", f"no powercap zones under {root}")


def test_probe_ok(tree: PowercapTree) -> None:
    tree.add_package(0)
    status, detail = probe_rapl(str(tree.root))
    assert status == "ok" and "package-0" in detail and "dram-0" in detail


# -- permission denied, for real ------------------------------------------------


def _as_nobody(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child that dropped to uid/gid 65534; return its result
    (JSON) or raise with the child's error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                out = {"ok": fn()}
            except BaseException as exc:  # report everything to the parent
                out = {"error": repr(exc)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks))
    if "error" in out:
        raise AssertionError(f"child failed: {out['error']}")
    return out["ok"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to drop privileges")
def test_permission_denied_is_a_loud_error() -> None:
    # tmp_path sits under a 0700 directory, so the tree goes in a world-traversable one.
    with tempfile.TemporaryDirectory(prefix="wattprint-powercap-") as d:
        os.chmod(d, 0o755)
        tree = PowercapTree(Path(d) / "powercap")
        tree.add_package(0)
        tree.make_energy_root_only()
        energy_path = str(tree.root / "intel-rapl:0" / "energy_uj")
        assert os.stat(energy_path).st_mode & 0o777 == 0o400
        tree.advance("intel-rapl:0", 1_000)  # atomic rewrite keeps the mode
        assert os.stat(energy_path).st_mode & 0o777 == 0o400

        def attempt() -> dict[str, Any]:
            src = RaplSource(str(tree.root))  # discovery works: names are world-readable
            devices = [z.device for z in src.zones]
            try:
                src.read(0.0)
            except SourceError as exc:
                return {"devices": devices, "detail": exc.detail,
                        "probe": list(probe_rapl(str(tree.root))), "uid": os.getuid()}
            return {"devices": devices, "detail": None}

        got = _as_nobody(attempt)
    assert got["uid"] == 65534
    assert got["devices"] == ["package-0", "dram-0"]
    assert got["detail"] == (
        f"{energy_path}: permission denied — energy_uj is root-only since Linux 5.10 "
        "(CVE-2020-8694); run wattprint as root or with CAP_DAC_READ_SEARCH"
    )
    assert got["probe"] == ["denied", got["detail"]]


# -- the factory ----------------------------------------------------------------


def open_sources(root: str, cpu: str, mem: str, **kw: Any) -> tuple[list[Any], HealthBoard]:
    health = HealthBoard()
    sources = open_cpu_sources(
        CpuConfig(source=cpu, powercap_root=root, tdp_w=100.0), MemoryConfig(source=mem, w_per_gb=0.5),
        health, **kw,
    )
    return sources, health


def kinds_read(sources: list[Any]) -> list[tuple[str, str, str]]:
    """(source name, kind, energy source) of every reading, sources read once."""
    return sorted((s.name, r.kind, r.source) for s in sources for r in s.read(0.0))


def test_factory_auto_with_rapl_and_dram(tree: PowercapTree) -> None:
    tree.add_package(0)
    sources, health = open_sources(str(tree.root), "auto", "auto")
    assert kinds_read(sources) == [("rapl", "cpu", "counter"), ("rapl", "dram", "counter")]
    assert health.get("rapl") is None


def test_factory_auto_without_rapl_dram_estimates_dram(tree: PowercapTree) -> None:
    tree.add_package(0, dram=False)  # AMD Zen: package and core only
    sources, _ = open_sources(str(tree.root), "auto", "auto")
    assert kinds_read(sources) == [("dram-estimate", "dram", "estimate"), ("rapl", "cpu", "counter")]


def test_factory_psys_covers_dram(tree: PowercapTree) -> None:
    tree.add_psys(0)
    sources, _ = open_sources(str(tree.root), "auto", "auto")
    assert kinds_read(sources) == [("rapl", "cpu", "counter")]


@pytest.mark.parametrize("mem", ["estimate", "none"])
def test_factory_never_counts_dram_twice(tree: PowercapTree, mem: str) -> None:
    tree.add_package(0)
    sources, _ = open_sources(str(tree.root), "auto", mem)
    expected = [("rapl", "cpu", "counter")]
    if mem == "estimate":
        expected.insert(0, ("dram-estimate", "dram", "estimate"))
    assert kinds_read(sources) == expected


def test_factory_auto_absent_estimates(tmp_path: Path) -> None:
    root = str(tmp_path / "no-powercap")
    sources, health = open_sources(root, "auto", "auto")
    assert [type(s) for s in sources] == [CpuEstimateSource, DramEstimateSource]
    assert sources[0].tdp_w == 100.0 and sources[1].w_per_gb == 0.5
    h = health.get("rapl")
    assert h is not None and h.state == "disabled"
    assert h.detail == f"no powercap zones under {root}: CPU energy estimated"


def test_factory_auto_denied_is_loud_and_estimates(tree: PowercapTree, caplog: pytest.LogCaptureFixture) -> None:
    tree.add_package(0)
    message = "/x/intel-rapl:0/energy_uj: permission denied — energy_uj is root-only since Linux 5.10"
    with caplog.at_level(logging.WARNING):
        sources, health = open_sources(str(tree.root), "auto", "auto", probe=lambda root: ("denied", message))
    assert [type(s) for s in sources] == [CpuEstimateSource, DramEstimateSource]
    assert kinds_read(sources) == [("cpu-estimate", "cpu", "estimate"), ("dram-estimate", "dram", "estimate")]
    h = health.get("rapl")
    assert h is not None and h.state == "degraded" and h.detail == message and h.errors_total == 1
    assert any(rec.levelno == logging.ERROR and message in rec.getMessage() for rec in caplog.records)


def test_factory_rapl_absent_still_returns_rapl(tmp_path: Path) -> None:
    root = str(tmp_path / "no-powercap")
    sources, _ = open_sources(root, "rapl", "auto")
    assert [type(s) for s in sources] == [RaplSource, DramEstimateSource]
    with pytest.raises(SourceError):
        sources[0].read(0.0)
    with pytest.raises(SourceError):
        sources[0].read(1.0)  # every tick


def test_factory_rapl_present(tree: PowercapTree) -> None:
    tree.add_package(0)
    sources, _ = open_sources(str(tree.root), "rapl", "rapl")
    assert kinds_read(sources) == [("rapl", "cpu", "counter"), ("rapl", "dram", "counter")]


def test_factory_estimate_cpu_with_rapl_dram(tree: PowercapTree) -> None:
    tree.add_package(0)
    sources, _ = open_sources(str(tree.root), "estimate", "rapl")
    assert kinds_read(sources) == [("cpu-estimate", "cpu", "estimate"), ("rapl", "dram", "counter")]


def test_factory_estimate_and_auto_memory(tree: PowercapTree) -> None:
    tree.add_package(0)
    sources, _ = open_sources(str(tree.root), "estimate", "auto")  # RAPL not used for CPU
    assert kinds_read(sources) == [("cpu-estimate", "cpu", "estimate"), ("dram-estimate", "dram", "estimate")]


def test_factory_memory_rapl_without_dram_zone(tree: PowercapTree) -> None:
    tree.add_package(0, dram=False)
    sources, health = open_sources(str(tree.root), "auto", "rapl")
    assert kinds_read(sources) == [("rapl", "cpu", "counter")]
    h = health.get("rapl-dram")
    assert h is not None and h.state == "degraded" and "no RAPL dram zone" in h.detail


def test_factory_none(tree: PowercapTree) -> None:
    tree.add_package(0)
    assert open_sources(str(tree.root), "none", "none")[0] == []
    sources, _ = open_sources(str(tree.root), "none", "estimate")
    assert [type(s) for s in sources] == [DramEstimateSource]


# -- the test helper's feeder ---------------------------------------------------


def test_start_feeding_advances_at_the_given_rate(tree: PowercapTree) -> None:
    z = tree.add_package(0, max_energy_range_uj=50_000_000, start_uj=49_000_000)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    t0 = time.monotonic()
    feed = tree.start_feeding({z["package"]: 100.0, z["dram"]: 5.0}, period_s=0.02)
    time.sleep(0.3)
    feed.stop()
    elapsed_s = time.monotonic() - t0
    fed_pkg_j = feed.fed_j(z["package"])
    assert 100.0 * 0.3 <= fed_pkg_j <= 100.0 * elapsed_s + 1e-6
    assert fed_pkg_j > 1.0  # so the package counter wrapped (range 50 J, started 1 J below)
    got = by_device(src.read(1.0))
    assert got["package-0"].energy_j == pytest.approx(fed_pkg_j, abs=1e-9)
    assert got["dram-0"].energy_j == pytest.approx(feed.fed_j(z["dram"]), abs=1e-9)
    assert feed.fed_j(z["dram"]) == pytest.approx(fed_pkg_j / 20, abs=1e-5)


# -- counter trust: every step bounded by physics ------------------------------
#
# Default bound of a package zone without constraint files: 1000 W x (2 x elapsed + 1 s),
# i.e. 3000 J for a 1 s interval.

from wattprint.daemon.sources.base import CounterDiff, CounterStep, CounterStepKind  # noqa: E402

FIRST, DIFFERENCE, WRAPPED, RESET, IMPLAUSIBLE = (
    CounterStepKind.FIRST, CounterStepKind.DIFFERENCE, CounterStepKind.WRAPPED, CounterStepKind.RESET,
    CounterStepKind.IMPLAUSIBLE)


def test_counter_diff_step_typed_results() -> None:
    d = CounterDiff(max_value=1000)
    assert d.step(990, max_delta=50) == CounterStep(FIRST)
    assert d.step(995, max_delta=50) == CounterStep(DIFFERENCE, 5)
    assert d.step(10, max_delta=50) == CounterStep(WRAPPED, 15)  # (1000 - 995) + 10
    assert d.step(9, max_delta=50) == CounterStep(IMPLAUSIBLE, reason="backwards")  # would be 999
    assert d.step(70, max_delta=50) == CounterStep(IMPLAUSIBLE, reason="jump")  # +61
    assert d.step(1500, max_delta=None) == CounterStep(IMPLAUSIBLE, reason="above_range")
    assert d.step(1600, max_delta=None) == CounterStep(IMPLAUSIBLE, reason="above_range")
    assert d.step(20, max_delta=None) == CounterStep(IMPLAUSIBLE, reason="above_range")  # wrap from outside
    assert d.step(30, max_delta=50) == CounterStep(DIFFERENCE, 10)  # the re-baseline holds
    assert (d.wraps, d.resets, d.implausible, d.last) == (1, 0, 5, 30)
    # Without a bound a real wrap of any size is accepted, as before.
    assert CounterDiff(max_value=1000, last=999).step(998) == CounterStep(WRAPPED, 999)
    # A counter that never wraps: going down is a reset.
    never = CounterDiff(max_value=None, last=500)
    assert never.step(100) == CounterStep(RESET) and never.resets == 1 and never.last == 100


def test_counter_diff_tells_first_reading_from_reset() -> None:
    # The GPU sources rely on it: the first reading is the baseline, a reset is not.
    d = CounterDiff(max_value=None)
    assert d.step(100) == CounterStep(CounterStepKind.FIRST)
    assert d.step(150) == CounterStep(CounterStepKind.DIFFERENCE, 50)
    assert d.step(20) == CounterStep(CounterStepKind.RESET) and d.resets == 1
    assert d.step(25) == CounterStep(CounterStepKind.DIFFERENCE, 5)
    w = CounterDiff(max_value=100, last=90)
    assert w.step(5) == CounterStep(CounterStepKind.WRAPPED, 15) and w.wraps == 1


def test_step_back_by_one_joule_is_not_a_wrap(tree: PowercapTree) -> None:
    z = tree.add_package(0, dram=False, core=False, start_uj=1_000_000_000)
    pkg = z["package"]
    src = RaplSource(str(tree.root))
    assert src.read(0.0)[0].energy_j == 0.0  # the first read is the baseline
    tree.advance(pkg, 50_000_000)
    (r,) = src.read(1.0)
    assert (r.energy_j, r.source) == (50.0, "counter")
    tree.set_energy(pkg, tree.energy(pkg) - 1_000_000)  # back by 1 J (old code: +262,143 J)
    (r,) = src.read(2.0)
    assert (r.energy_j, r.power_w, r.interval_s, r.source) == (50.0, 50.0, 1.0, "estimate")
    (problem,) = src.problems()
    assert "package-0" in problem and "went back by less than a plausible wrap" in problem
    assert src.counter_glitches() == {("package-0", "backwards"): 1}
    tree.advance(pkg, 30_000_000)  # from the new baseline
    (r,) = src.read(3.0)
    assert (r.energy_j, r.source) == (30.0, "counter")
    assert src.problems() == []


def test_above_range_then_wrap_never_gives_negative_energy(tree: PowercapTree) -> None:
    max_uj = 10_000_000_000  # 10 kJ range
    z = tree.add_package(0, max_energy_range_uj=max_uj, dram=False, core=False, start_uj=5_000_000_000)
    pkg = z["package"]
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.advance(pkg, 40_000_000)
    assert src.read(1.0)[0].energy_j == 40.0
    tree.set_energy(pkg, 2 * max_uj)  # above the range (old code: counted +14,960 J)
    (r,) = src.read(2.0)
    assert (r.energy_j, r.source) == (40.0, "estimate")
    tree.set_energy(pkg, 2 * max_uj + 40_000_000)  # still above: still not trusted
    (r,) = src.read(3.0)
    assert (r.energy_j, r.source) == (40.0, "estimate")
    tree.set_energy(pkg, 30_000_000)  # wraps from above the range (old code: -9,970 J)
    (r,) = src.read(4.0)
    assert (r.energy_j, r.source) == (40.0, "estimate")
    assert "counter above max_energy_range_uj" in src.problems()[0]
    assert src.counter_glitches() == {("package-0", "above_range"): 3}
    tree.advance(pkg, 40_000_000)
    (r,) = src.read(5.0)
    assert (r.energy_j, r.source) == (40.0, "counter")
    assert src.problems() == []


def test_jump_beyond_the_default_bound(tree: PowercapTree) -> None:
    z = tree.add_package(0, dram=False, core=False)
    pkg = z["package"]
    src = RaplSource(str(tree.root))
    assert (src.zones[0].max_power_w, src.zones[0].max_power_basis) == (1000.0, "default for package zones")
    src.read(0.0)
    tree.advance(pkg, 2_999_000_000)  # 2999 J in 1 s: within 1000 W x (2 x 1 s + 1 s)
    (r,) = src.read(1.0)
    assert (r.energy_j, r.source) == (2999.0, "counter")
    tree.advance(pkg, 3_000_000_001)  # one microjoule over the bound
    (r,) = src.read(2.0)
    assert (r.energy_j, r.source) == (2999.0, "estimate")
    assert "rose faster than the zone's max power allows" in src.problems()[0]
    assert src.counter_glitches() == {("package-0", "jump"): 1}
    tree.advance(pkg, 9_000_000_000)  # after 4 s: 9000 J is within 1000 W x (2 x 4 s + 1 s)
    (r,) = src.read(6.0)
    assert (r.energy_j, r.source) == (9000.0, "counter")


def test_constraint_files_set_the_bound(tree: PowercapTree) -> None:
    z = tree.add_package(0, core=False)
    pkg, dram = z["package"], z["dram"]
    tree.set_constraint(pkg, 0, power_limit_uw=65_000_000, max_power_uw=0, name="long_term")
    tree.set_constraint(pkg, 1, power_limit_uw=100_000_000, name="short_term")
    tree.set_constraint(dram, 0, max_power_uw=20_000_000)
    zones = {zz.device: zz for zz in discover_zones(str(tree.root))}
    assert (zones["package-0"].max_power_w, zones["package-0"].max_power_basis) == (100.0, "constraint_1_power_limit_uw")
    assert (zones["dram-0"].max_power_w, zones["dram-0"].max_power_basis) == (20.0, "constraint_0_max_power_uw")
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.advance(pkg, 300_000_000)  # 300 J = 100 W x (2 x 1 s + 1 s): allowed
    tree.advance(dram, 61_000_000)  # 61 J > 20 W x 3 s: not
    got = by_device(src.read(1.0))
    assert (got["package-0"].energy_j, got["package-0"].source) == (300.0, "counter")
    assert (got["dram-0"].energy_j, got["dram-0"].source) == (0.0, "estimate")  # no trusted power yet
    assert src.counter_glitches() == {("dram-0", "jump"): 1}
    # A real wrap near the top of the range is still a wrap.
    tree.set_energy(pkg, tree.max_energy_range_uj(pkg) - 10_000_000)
    r = by_device(src.read(2.0))["package-0"]  # (getting there is a jump: estimated)
    assert (r.energy_j, r.source) == (300.0, "estimate")
    tree.advance(pkg, 40_000_000)  # wraps: 40 J
    assert by_device(src.read(3.0))["package-0"].energy_j == 40.0
    assert src.counter_glitches() == {("dram-0", "jump"): 1, ("package-0", "jump"): 1}


def test_reset_with_unknown_range_is_estimated(tree: PowercapTree) -> None:
    z = tree.add_package(0, dram=False, core=False, start_uj=5_000_000)
    (tree.root / "intel-rapl:0" / "max_energy_range_uj").write_text("n/a\n")
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.advance(z["package"], 20_000_000)
    assert src.read(1.0)[0].energy_j == 20.0
    tree.set_energy(z["package"], 1_000_000)
    (r,) = src.read(1.5)
    assert (r.energy_j, r.source) == (10.0, "estimate")  # 20 W x 0.5 s
    assert any("range is unknown" in p for p in src.problems())
    assert src.counter_glitches() == {("package-0", "reset"): 1}


def test_glitch_episode_is_logged_once(tree: PowercapTree, caplog: pytest.LogCaptureFixture) -> None:
    z = tree.add_package(0, dram=False, core=False, start_uj=10_000_000_000)
    pkg = z["package"]
    src = RaplSource(str(tree.root))
    src.read(0.0)
    caplog.set_level(logging.INFO, logger="wattprint.sources.rapl")
    for t in (1.0, 2.0, 3.0):  # three backwards steps in a row: one episode
        tree.set_energy(pkg, tree.energy(pkg) - 1_000_000)
        src.read(t)
    tree.advance(pkg, 1_000_000)
    src.read(4.0)
    tree.advance(pkg, 1_000_000)
    src.read(5.0)
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "wattprint.sources.rapl"]
    assert [lvl for lvl, _ in msgs] == ["WARNING", "INFO"], msgs
    assert "energy_uj 10000000000 -> 9999000000" in msgs[0][1] and "bound" in msgs[0][1]
    assert "trusted again" in msgs[1][1]
    assert src.counter_glitches() == {("package-0", "backwards"): 3}


def test_vanished_zone_comes_back_as_a_baseline_not_a_glitch(tree: PowercapTree) -> None:
    z = tree.add_package(0, dram=False, core=False, start_uj=9_000_000_000)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.remove_zone(z["package"])
    with pytest.raises(SourceError):
        src.read(1.0)
    tree.add_package(0, dram=False, core=False, start_uj=5)
    (r,) = src.read(2.0)
    assert (r.energy_j, r.source) == (0.0, "counter")
    assert src.counter_glitches() == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3 * 10**9), st.floats(0.0, 5.0)), min_size=1, max_size=30))
def test_no_reading_is_ever_negative(steps: list[tuple[int, float]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tree = PowercapTree(Path(d) / "powercap")
        z = tree.add_package(0, max_energy_range_uj=2 * 10**9, dram=False, core=False)
        src = RaplSource(str(tree.root))
        t = 0.0
        src.read(t)
        for value, dt in steps:
            tree.set_energy(z["package"], value)  # anything, in range or not
            t += dt
            (r,) = src.read(t)
            assert r.energy_j >= 0.0 and r.power_w >= 0.0
            assert r.energy_j <= 1000.0 * (2 * dt + 1) + 1e-6  # never more than physics allows


# -- exact texts, figures and discovery details (kill mutants; docs/testing.md) ---------

from wattprint.daemon.sources import rapl as rapl_mod  # noqa: E402
from wattprint.daemon.sources.rapl import GLITCH_TEXT, RaplZone, denied_detail  # noqa: E402

INTEL = 262_143_328_850
DEFAULT_BASIS = "default for package zones"


def glitch_problem(label: str, reason: str) -> str:
    return (f"{label}: {GLITCH_TEXT[reason]}; re-baselined, the interval's energy estimated "
            "from the last trusted power (source=estimate)")


def test_discovered_zones_carry_every_field(tree: PowercapTree) -> None:
    tree.add_package(0, core=False)
    tree.set_constraint("intel-rapl:0:1", 0, max_power_uw=25_000_000)
    root = tree.root
    assert discover_zones(str(root)) == [
        RaplZone("intel-rapl:0", str(root / "intel-rapl:0"), "package-0", "cpu", "package-0", INTEL, "",
                 1000.0, DEFAULT_BASIS),
        RaplZone("intel-rapl:0:1", str(root / "intel-rapl:0:1"), "dram", "dram", "dram-0", INTEL, "",
                 25.0, "constraint_0_max_power_uw"),
    ]
    psys_tree = PowercapTree(root.parent / "psys")
    psys_tree.add_psys(0, max_energy_range_uj=5_000_000)
    psys_tree.set_constraint("intel-rapl:0", 0, power_limit_uw=120_000_000)
    assert discover_zones(str(psys_tree.root)) == [
        RaplZone("intel-rapl:0", str(psys_tree.root / "intel-rapl:0"), "psys", "cpu", "psys", 5_000_000, "",
                 120.0, "constraint_0_power_limit_uw"),
    ]


def test_of_several_psys_zones_the_lowest_numbered_is_read(tree: PowercapTree) -> None:
    tree.add_psys(10)
    tree.add_psys(2)
    assert [z.zone_id for z in discover_zones(str(tree.root))] == ["intel-rapl:2"]


def test_dram_without_a_parent_zone_is_ignored(tree: PowercapTree) -> None:
    tree.add_package(0, dram=False, core=False)
    tree.add_zone("intel-rapl:3:0", "dram")  # no intel-rapl:3
    assert [z.device for z in discover_zones(str(tree.root))] == ["package-0"]


@pytest.mark.parametrize("reverse", [False, True])
def test_discovery_does_not_depend_on_directory_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     reverse: bool) -> None:
    real_listdir = os.listdir
    monkeypatch.setattr(rapl_mod.os, "listdir", lambda p: sorted(real_listdir(p), reverse=reverse))
    tree = PowercapTree(tmp_path / "powercap")
    tree.add_package(0, core=False)  # flat subzone
    tree.add_package(1, core=False)
    tree.add_package(2, core=False)
    os.rename(tree.root / "intel-rapl:2:1", tree.root / "intel-rapl:2" / "intel-rapl:2:1")  # nested
    tree.add_zone("intel-rapl:5", "package-5")
    os.remove(tree.root / "intel-rapl:5" / "name")  # cannot be identified: skipped
    (tree.root / "intel-rapl:7").write_text("not a directory\n")
    assert [z.device for z in discover_zones(str(tree.root))] == [
        "package-0", "dram-0", "package-1", "dram-1", "package-2", "dram-2"]


def test_max_power_constraints(tree: PowercapTree) -> None:
    tree.add_package(0, dram=False, core=False)
    (tree.root / "intel-rapl:0" / "constraint_0_max_power_uw").write_text("n/a\n")  # skipped, not the end
    tree.set_constraint("intel-rapl:0", 1, power_limit_uw=100_000_000)
    tree.set_constraint("intel-rapl:0", 2, power_limit_uw=100_000_000)  # equal: the first one names it
    (zone,) = discover_zones(str(tree.root))
    assert (zone.max_power_w, zone.max_power_basis) == (100.0, "constraint_1_power_limit_uw")
    tiny = PowercapTree(tree.root.parent / "tiny")
    tiny.add_package(0, dram=False, core=False)
    tiny.set_constraint("intel-rapl:0", 0, power_limit_uw=1)  # 1 uW is still a limit
    (zone,) = discover_zones(str(tiny.root))
    assert (zone.max_power_w, zone.max_power_basis) == (1e-6, "constraint_0_power_limit_uw")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, (None, "{p}: No such file or directory; counter wraps cannot be corrected")),
        ("x" * 50, (None, "{p}: not an integer: " + repr("x" * 40) + "; counter wraps cannot be corrected")),
        ("0", (None, "{p}: 0 is not a positive range; counter wraps cannot be corrected")),
        ("1", (1, "")),
    ],
)
def test_max_energy_range_problems(tree: PowercapTree, content: str | None, expected: tuple[int | None, str]) -> None:
    tree.add_package(0, dram=False, core=False)
    path = tree.root / "intel-rapl:0" / "max_energy_range_uj"
    if content is None:
        path.unlink()
    else:
        path.write_text(content + "\n")
    (zone,) = discover_zones(str(tree.root))
    assert (zone.max_energy_range_uj, zone.max_problem) == (expected[0], expected[1].format(p=path))


def test_energy_file_problems_are_named_exactly(tree: PowercapTree) -> None:
    tree.add_package(0, core=False)
    tree.add_package(1, dram=False, core=False)
    src = RaplSource(str(tree.root))
    pkg0, dram0, pkg1 = (tree.root / z / "energy_uj" for z in ("intel-rapl:0", "intel-rapl:0:1", "intel-rapl:1"))
    pkg0.write_bytes(b"\xc3\xa9" + b"7" * 60)  # not ASCII, and long: quoted, cut at 40 characters
    dram0.unlink()
    dram0.mkdir()  # reading it is an OSError that is neither "not found" nor "denied"
    pkg1.write_text("-5\n")
    with pytest.raises(SourceError) as err:
        src.read(0.0)
    problems = [
        f"intel-rapl:0 (package-0): {pkg0}: not an integer: " + repr(("\ufffd\ufffd" + "7" * 60)[:40]),
        f"intel-rapl:0:1 (dram-0): {dram0}: Is a directory",
        f"intel-rapl:1 (package-1): {pkg1}: negative energy -5",
    ]
    assert src.problems() == problems
    assert err.value.detail == "; ".join(problems)
    assert probe_rapl(str(tree.root)) == ("absent", f"no readable RAPL zone under {tree.root}: " + "; ".join([
        f"{pkg0}: not an integer: " + repr(("\ufffd\ufffd" + "7" * 60)[:40]),
        f"{dram0}: Is a directory",
        f"{pkg1}: negative energy -5",
    ]))
    dram0.rmdir()
    assert probe_rapl(str(tree.root))[1].split("; ")[1] == f"{dram0}: not found"
    pkg1.write_text("9\n")
    assert probe_rapl(str(tree.root)) == ("ok", f"package-1 under {tree.root}")


def test_a_failing_zone_does_not_stop_the_ones_after_it(tree: PowercapTree) -> None:
    z = tree.add_package(0, core=False)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    (tree.root / "intel-rapl:0" / "energy_uj").write_text("garbage\n")  # the first zone read
    tree.advance(z["dram"], 2_000_000)
    assert [(r.device, r.energy_j) for r in src.read(1.0)] == [("dram-0", 2.0)]
    (tree.root / "intel-rapl:0" / "energy_uj").unlink()
    (tree.root / "intel-rapl:0" / "energy_uj").mkdir()
    tree.advance(z["dram"], 1_000_000)
    assert [(r.device, r.energy_j) for r in src.read(2.0)] == [("dram-0", 1.0)]


def test_permission_denied_maps_to_a_loud_error(tree: PowercapTree, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process twin of test_permission_denied_is_a_loud_error (which drops
    # privileges in a forked child): the PermissionError is raised where open() would.
    tree.add_package(0, dram=False, core=False)
    real_read_text = rapl_mod._read_text

    def read_text(path: str) -> str:
        if path.endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", path)
        return real_read_text(path)

    monkeypatch.setattr(rapl_mod, "_read_text", read_text)
    energy = str(tree.root / "intel-rapl:0" / "energy_uj")
    detail = (f"{energy}: permission denied — energy_uj is root-only since Linux 5.10 "
              "(CVE-2020-8694); run wattprint as root or with CAP_DAC_READ_SEARCH")
    assert denied_detail(energy) == detail
    assert probe_rapl(str(tree.root)) == ("denied", detail)
    with pytest.raises(SourceError) as err:
        RaplSource(str(tree.root)).read(0.0)
    assert err.value.detail == detail


def test_nothing_to_read_is_named_by_the_kinds_asked_for(tmp_path: Path) -> None:
    root = str(tmp_path / "none")
    for kw, wanted in (({}, "package+dram"), ({"include_dram": False}, "package"), ({"include_cpu": False}, "dram")):
        src = RaplSource(root, **kw)
        assert src.problems() == [] and src.zones == ()
        with pytest.raises(SourceError) as err:
            src.read(0.0)
        assert err.value.detail == f"no RAPL {wanted} zones under {root}"
        assert src.problems() == [err.value.detail]


def test_close_forgets_the_zones(tree: PowercapTree) -> None:
    tree.add_package(0)
    src = RaplSource(str(tree.root))
    assert len(src.zones) == 2
    src.close()
    assert src.zones == ()


def test_first_reading_is_all_zero_and_same_time_reads_have_no_power(tree: PowercapTree) -> None:
    z = tree.add_package(0, dram=False, core=False, start_uj=7_000_000)
    src = RaplSource(str(tree.root))
    (r,) = src.read(10.0)
    assert (r.energy_j, r.power_w, r.interval_s, r.source) == (0.0, 0.0, 0.0, "counter")
    tree.advance(z["package"], 20_000_000)
    (r,) = src.read(11.0)
    assert (r.energy_j, r.power_w, r.interval_s) == (20.0, 20.0, 1.0)
    tree.advance(z["package"], 5_000_000)
    (r,) = src.read(11.0)  # no time passed: energy, but no power (and the 20 W stands)
    assert (r.energy_j, r.power_w, r.interval_s, r.source) == (5.0, 0.0, 0.0, "counter")
    tree.set_energy(z["package"], tree.energy(z["package"]) - 1_000_000)
    (r,) = src.read(12.0)
    assert (r.energy_j, r.power_w, r.source) == (20.0, 20.0, "estimate")  # 20 W x 1 s


def test_a_zone_that_vanishes_while_others_stay_starts_afresh(tree: PowercapTree,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    max_uj = 10_000_000_000
    tree.add_package(0, dram=False, core=False)
    z1 = tree.add_package(1, max_energy_range_uj=max_uj, dram=False, core=False, start_uj=8_000_000_000)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.set_energy(z1["package"], tree.energy(z1["package"]) - 1_000_000)  # a glitch episode starts
    src.read(1.0)
    tree.remove_zone(z1["package"])
    assert [r.device for r in src.read(2.0)] == ["package-0"]
    tree.add_package(1, max_energy_range_uj=max_uj, dram=False, core=False, start_uj=max_uj - 1_000_000)
    got = by_device(src.read(3.0))  # back, counter restarted: a baseline
    assert (got["package-1"].energy_j, got["package-1"].source) == (0.0, "counter")
    tree.advance(z1["package"], 3_000_000)  # wraps: still a wrap (the range was kept)
    got = by_device(src.read(4.0))["package-1"]
    assert (got.energy_j, got.power_w, got.interval_s, got.source) == (3.0, 3.0, 1.0, "counter")
    caplog.clear()
    caplog.set_level(logging.INFO, logger="wattprint.sources.rapl")
    tree.set_energy(z1["package"], tree.energy(z1["package"]) - 1_000_000)
    src.read(5.0)  # a new episode: logged as one
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "the last trusted power (3.0 W) x 1 s" in caplog.records[0].getMessage()
    assert src.counter_glitches() == {("package-1", "backwards"): 2}


def test_glitch_messages_are_exact(tree: PowercapTree, caplog: pytest.LogCaptureFixture) -> None:
    z = tree.add_package(0, dram=False, core=False, start_uj=10_000_000_000)
    pkg = z["package"]
    src = RaplSource(str(tree.root))
    caplog.set_level(logging.DEBUG, logger="wattprint.sources.rapl")
    src.read(0.0)
    label = "intel-rapl:0 (package-0)"
    bound = f"bound 3000000000 uJ = 1000 W ({DEFAULT_BASIS}) x (2 x 1 s + 1 s)"
    tree.set_energy(pkg, 9_999_000_000)
    src.read(1.0)
    assert src.problems() == [glitch_problem(label, "backwards")]
    tree.set_energy(pkg, 9_998_000_000)
    src.read(2.0)
    tree.advance(pkg, 1_000_000)
    src.read(3.0)
    tree.advance(pkg, 60_000_000)
    src.read(4.0)
    tree.set_energy(pkg, 20 * INTEL)
    src.read(5.0)
    assert src.problems() == [glitch_problem(label, "above_range")]
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "wattprint.sources.rapl"]
    assert msgs == [
        ("WARNING", f"{label}: {GLITCH_TEXT['backwards']}: energy_uj 10000000000 -> 9999000000 (range {INTEL}, "
                    f"{bound}); interval booked as 0 J (no trusted power yet) (counted in "
                    "wattprint_counter_glitches_total; logged again when trusted again)"),
        ("DEBUG", f"{label}: {GLITCH_TEXT['backwards']}: energy_uj 9999000000 -> 9998000000; {bound}"),
        ("INFO", f"{label}: counter trusted again"),
        ("WARNING", f"{label}: {GLITCH_TEXT['above_range']}: energy_uj 10059000000 -> {20 * INTEL} (range {INTEL}, "
                    f"{bound}); interval booked as the last trusted power (60.0 W) x 1 s (counted in "
                    "wattprint_counter_glitches_total; logged again when trusted again)"),
    ]


def test_all_zones_renamed_at_once_are_found_in_the_same_read(tree: PowercapTree) -> None:
    tree.add_package(0, core=False)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    gone = [tree.root / z / "energy_uj" for z in ("intel-rapl:0", "intel-rapl:0:1")]
    tree.remove_zone("intel-rapl:0:1")
    tree.remove_zone("intel-rapl:0")
    tree.add_package(1, core=False, start_uj=42)  # the same hardware, numbered anew
    got = src.read(1.0)
    assert [(r.device, r.energy_j, r.source) for r in got] == [("package-1", 0.0, "counter"), ("dram-1", 0.0, "counter")]
    assert src.problems() == [
        f"intel-rapl:0 (package-0): vanished ({gone[0]} not found)",
        f"intel-rapl:0:1 (dram-0): vanished ({gone[1]} not found)",
    ]
    tree.advance("intel-rapl:1", 4_000_000)
    got = by_device(src.read(2.0))["package-1"]
    assert (got.energy_j, got.power_w, got.interval_s) == (4.0, 4.0, 1.0)  # timed from the read at 1.0


def test_one_of_two_zones_vanishing_keeps_the_other_baseline(tree: PowercapTree) -> None:
    z = tree.add_package(0, core=False)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.remove_zone(z["dram"])
    tree.advance(z["package"], 6_000_000)
    assert [(r.device, r.energy_j) for r in src.read(1.0)] == [("package-0", 6.0)]


def test_probe_names_every_readable_zone(tree: PowercapTree) -> None:
    tree.add_package(0)
    assert probe_rapl(str(tree.root)) == ("ok", f"package-0, dram-0 under {tree.root}")


def test_unlistable_zone_directory_gets_the_default_bound(tree: PowercapTree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.add_package(0, dram=False, core=False)
    tree.set_constraint("intel-rapl:0", 0, power_limit_uw=50_000_000)
    real_listdir = os.listdir

    def listdir(path: str) -> list[str]:
        if str(path).endswith("intel-rapl:0"):
            raise PermissionError(13, "Permission denied", path)
        return real_listdir(path)

    monkeypatch.setattr(rapl_mod.os, "listdir", listdir)
    (zone,) = discover_zones(str(tree.root))
    assert (zone.max_power_w, zone.max_power_basis) == (1000.0, DEFAULT_BASIS)


def test_a_glitch_right_after_a_zone_comes_back_is_a_new_episode(tree: PowercapTree,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    tree.add_package(0, dram=False, core=False)
    z1 = tree.add_package(1, dram=False, core=False, start_uj=5_000_000_000)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    tree.advance(z1["package"], 30_000_000)
    src.read(1.0)  # 30 W trusted
    tree.set_energy(z1["package"], tree.energy(z1["package"]) - 1_000_000)
    src.read(2.0)  # an episode, still open when the zone vanishes
    tree.remove_zone(z1["package"])
    src.read(3.0)
    tree.add_package(1, dram=False, core=False, start_uj=7_000_000_000)
    src.read(4.0)  # back: a baseline
    caplog.clear()
    caplog.set_level(logging.INFO, logger="wattprint.sources.rapl")
    tree.set_energy(z1["package"], 6_999_000_000)
    (r,) = [r for r in src.read(5.0) if r.device == "package-1"]
    assert (r.energy_j, r.source) == (0.0, "estimate")  # the 30 W from before are forgotten
    assert [rec.levelname for rec in caplog.records] == ["WARNING"]
    assert "interval booked as 0 J (no trusted power yet)" in caplog.records[0].getMessage()


def test_glitch_hold_keeps_one_episode_across_glitches(tmp_path: Path) -> None:
    """With glitch_hold_s = 10, glitches 3 s apart stay one episode: the same problem
    text on every read in between (health does not flap, nothing is logged again), and
    the episode ends only after 10 s of trusted reads."""
    tree = PowercapTree(tmp_path)
    zone = tree.add_zone("intel-rapl:0", "package-0", start_uj=1_000_000_000)
    src = RaplSource(str(tree.root), include_dram=False, glitch_hold_s=10.0)
    src.read(0.0)
    value = 1_000_000_000
    problems_per_read = []
    for t in range(1, 20):
        value += 50_000_000  # 50 J/s: trusted
        if t in (2, 5):
            value += 10_000_000_000  # +10 kJ in a second: no package can
        tree.set_energy(zone, value)
        src.read(float(t))
        problems_per_read.append(src.problems())
    text = problems_per_read[1]
    assert len(text) == 1 and "faster than the zone's max power" in text[0]
    # t = 2 .. 14 (10 s after the last glitch at t = 5): the same single problem.
    assert all(p == text for p in problems_per_read[1:14]), problems_per_read
    assert all(p == [] for p in problems_per_read[14:]), problems_per_read
    assert src.counter_glitches() == {("package-0", "jump"): 2}


def test_without_a_hold_the_next_trusted_read_ends_the_episode(tree: PowercapTree) -> None:
    z = tree.add_package(0, dram=False, core=False, start_uj=1_000_000_000)
    src = RaplSource(str(tree.root))  # glitch_hold_s defaults to 0: no hold
    src.read(0.0)
    tree.set_energy(z["package"], 999_000_000)
    src.read(1.0)
    assert src.problems() == [glitch_problem("intel-rapl:0 (package-0)", "backwards")]
    tree.advance(z["package"], 1_000_000)
    src.read(1.5)  # half a second later: trusted, and the episode is over
    assert src.problems() == []
