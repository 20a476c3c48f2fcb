"""CPU and DRAM estimates: CodeCarbon's TDP × (0.1 + 0.9·load³) curve, load from
/proc/stat deltas, W/GB × installed GiB, energy = power × interval."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from wattprint.daemon.sources.base import SourceError
from wattprint.daemon.sources.estimate import (
    CpuEstimateSource,
    DramEstimateSource,
    cpu_power_w,
    read_proc_stat,
)


class FakeProcStat:
    """Cumulative (idle, total) ticks; ``run(busy, idle)`` adds one interval's worth."""

    def __init__(self) -> None:
        self.idle = 1_000
        self.total = 5_000

    def run(self, busy: int, idle: int) -> None:
        self.idle += idle
        self.total += busy + idle

    def __call__(self) -> tuple[int, int]:
        return self.idle, self.total


@pytest.mark.parametrize("load, expected_w", [(0.0, 8.5), (0.5, 85 * (0.1 + 0.9 * 0.125)), (1.0, 85.0)])
def test_cpu_curve(load: float, expected_w: float) -> None:
    assert cpu_power_w(85.0, load) == pytest.approx(expected_w)


def test_cpu_curve_values_spelled_out() -> None:
    assert cpu_power_w(85.0, 0.5) == pytest.approx(18.0625)  # 85 × 0.2125
    assert cpu_power_w(200.0, 2.0) == 200.0  # clamped
    assert cpu_power_w(200.0, -1.0) == pytest.approx(20.0)


@pytest.mark.parametrize("busy, idle, expected_w", [(0, 400, 8.5), (200, 200, 18.0625), (400, 0, 85.0)])
def test_cpu_estimate_source_from_proc_stat_deltas(busy: int, idle: int, expected_w: float) -> None:
    stat = FakeProcStat()
    src = CpuEstimateSource(85.0, read_proc_stat=stat)
    assert src.name == "cpu-estimate"
    (first,) = src.read(10.0)
    assert (first.kind, first.device, first.source, first.energy_j) == ("cpu", "cpu", "estimate", 0.0)
    stat.run(busy, idle)
    (r,) = src.read(12.0)
    assert r.power_w == pytest.approx(expected_w)
    assert r.energy_j == pytest.approx(expected_w * 2.0)
    assert (r.interval_s, r.source) == (2.0, "estimate")
    assert src.load == pytest.approx(busy / (busy + idle))


def test_cpu_estimate_keeps_load_when_no_ticks_passed() -> None:
    stat = FakeProcStat()
    src = CpuEstimateSource(100.0, read_proc_stat=stat)
    src.read(0.0)
    stat.run(100, 0)
    assert src.read(1.0)[0].power_w == 100.0
    (r,) = src.read(1.001)  # no ticks in between: previous load stands
    assert r.power_w == 100.0 and r.energy_j == pytest.approx(0.1)


def test_cpu_estimate_unreadable_proc_stat_raises() -> None:
    def broken() -> tuple[int, int]:
        raise OSError("no /proc")

    with pytest.raises(SourceError) as err:
        CpuEstimateSource(85.0, read_proc_stat=broken).read(0.0)
    assert "/proc/stat" in err.value.detail


def test_read_proc_stat_parses_the_aggregate_line(tmp_path: Path) -> None:
    path = tmp_path / "stat"
    path.write_text("cpu  10 20 30 400 50 6 7 8 99 99\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n")
    assert read_proc_stat(str(path)) == (450, 531)  # guest columns not added twice
    real_idle, real_total = read_proc_stat()
    assert 0 <= real_idle <= real_total


def test_dram_estimate_w_per_gb() -> None:
    src = DramEstimateSource(0.375, total_bytes=64 << 30)  # 64 GiB → 24 W
    assert src.name == "dram-estimate"
    assert src.power_w == 24.0
    (first,) = src.read(5.0)
    assert (first.kind, first.device, first.source, first.energy_j) == ("dram", "dram", "estimate", 0.0)
    (r,) = src.read(7.5)
    assert (r.power_w, r.energy_j, r.interval_s) == (24.0, 60.0, 2.5)


def test_dram_estimate_defaults_to_installed_memory() -> None:
    src = DramEstimateSource(0.375)
    assert src.total_bytes == psutil.virtual_memory().total
    assert src.power_w == pytest.approx(0.375 * psutil.virtual_memory().total / 2**30)
    assert DramEstimateSource(3.0, total_bytes=8 << 30).power_w == 24.0
