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
    for i, step in enumerate([1, 2, max_uj - 5, 40_000_000_000, 30_000_000_000, 65_000_000_000, 7]):
        tree.advance(z["package"], step)
        fed_uj += step
        (r,) = src.read(float(i + 1))
        assert r.energy_j == step / 1e6
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
    assert "intel-rapl:0" in err.value.detail and not err.value.permanent
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
def test_permission_denied_is_a_loud_permanent_error() -> None:
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
                return {"devices": devices, "detail": exc.detail, "permanent": exc.permanent,
                        "probe": list(probe_rapl(str(tree.root))), "uid": os.getuid()}
            return {"devices": devices, "detail": None}

        got = _as_nobody(attempt)
    assert got["uid"] == 65534
    assert got["devices"] == ["package-0", "dram-0"]
    assert got["permanent"] is True
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
