"""The vendor-neutral GPU collector (daemon/sources/gpu/policy.py) against a scripted
vendor written here (not NVML, not amdsmi): what each typed ``GpuError`` kind makes
the policy do, counters of any width, partitions read per partition, and the
registry's choice of vendors (daemon/sources/gpu/registry.py). Expected energies are
worked out here from the counter values and powers the test sets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest
from wattprint.daemon.config import GpuConfig
from wattprint.daemon.sources.base import SourceDisabled, SourceError
from wattprint.daemon.sources.gpu import (
    GpuError,
    GpuErrorKind,
    GpuSource,
    open_gpu_sources,
)
from wattprint.daemon.sources.gpu.registry import sim_vendors
from wattprint.daemon.sources.gpu.vendor import (
    EnergyCount,
    MemoryInfo,
    Partition,
    PartitionLayout,
    ProcEntry,
    UtilResult,
    UtilWindow,
)

U32 = 2**32 - 1


@dataclass
class FakeBoard:
    uuid: str
    counter: int | None = 0  # None: no energy counter
    max_value: int | None = None
    power_w: float = 100.0
    procs: list[ProcEntry] = field(default_factory=list)
    parts: dict[int, list[ProcEntry]] | None = None  # partition id -> its processes
    errors: dict[str, GpuError] = field(default_factory=dict)  # method -> raised while set


class FakeVendor:
    """A ``GpuVendor`` scripted by the test: one handle per board (its index)."""

    vendor = "acme"
    health_name = "gpu_acme"
    device_prefix = "acmegpu"
    partition_infix = "-p"
    partition_word = "partition"
    partition_key = "p"
    library = "acmelib"
    driver_name = "ACME"
    counter_prefix = "gpu_acme"
    library_key = "acmelib"
    process_kinds = (("compute", "process list"),)

    def __init__(self, boards: list[FakeBoard]) -> None:
        self.boards = boards
        self.calls = 0
        self.init_error: GpuError | None = None
        self.inits = 0

    def _check(self, what: str, index: int) -> FakeBoard:
        self.calls += 1
        b = self.boards[index]
        if what in b.errors:
            raise b.errors[what]
        return b

    def init(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def shutdown(self) -> None:
        pass

    def count(self) -> int:
        return len(self.boards)

    def board(self, index: int) -> tuple[Any, str]:
        return index, self.boards[index].uuid

    def name(self, handle: Any) -> str:
        return f"ACME X{handle}"

    def partitions(self, handle: Any, device: str, name: str) -> PartitionLayout | None:
        b = self.boards[handle]
        if b.parts is None:
            return None
        parts = {k: Partition(part_id=k, handles=[(handle, k)], slices=1, name=f"{name} p{k}",
                              memory_total_bytes=1 << 30) for k in b.parts}
        return PartitionLayout(parts=parts, total_slices=len(parts), parent_lists=False,
                               note=f"{device}: {len(parts)} partitions")

    def energy(self, handle: Any) -> EnergyCount:
        b = self._check("energy", handle)
        if b.counter is None:
            raise GpuError(GpuErrorKind.NOT_SUPPORTED, "AcmeError: no counter", "AcmeNotSupported")
        return EnergyCount(b.counter, 1000.0, b.max_value)

    def power_w(self, handle: Any) -> float:
        return self._check("power", handle).power_w

    def memory(self, handle: Any) -> MemoryInfo:
        self._check("memory", handle)
        return MemoryInfo(used_bytes=1 << 20, total_bytes=1 << 30)

    def processes(self, kind: str, handle: Any) -> list[ProcEntry]:
        if isinstance(handle, tuple):  # a partition's handle
            board, part = handle
            b = self._check("processes", board)
            assert b.parts is not None
            return list(b.parts[part])
        return list(self._check("processes", handle).procs)

    def util_wanted(self, window: UtilWindow, procs: Mapping[int, ProcEntry], wall_us: int) -> bool:
        return False

    def utilisation(self, handle: Any, procs: Mapping[int, ProcEntry], window: UtilWindow,
                    wall_us: int) -> UtilResult:
        raise AssertionError("not wanted")

    def alive(self, index: int) -> tuple[Any, str]:
        self._check("alive", index)
        return index, self.boards[index].uuid

    def processes_unusable(self) -> str:
        return ""

    def reports_host_pids(self) -> bool:
        return True

    def driver_gpu_count(self) -> int | None:
        return None

    def wall_clock(self) -> Callable[[], float]:
        return lambda: 1_700_000_000.0


def source(vendor: FakeVendor, **options: Any) -> GpuSource:
    options.setdefault("init_retry_s", 0.0)
    options.setdefault("retry_s", 30.0)  # side queries: first retry 30 s after a failure
    return GpuSource(vendor, pid_exists=lambda pid: True, pid_namespace_initial=True, reinit_interval_s=0.0,
                     run_probe=lambda probe: probe(), clock=lambda: 0.0, **options)


def read(src: GpuSource, t: float) -> dict[str, Any]:
    return {r.device: r for r in src.read(t)}


def test_a_counter_that_wraps_at_its_width_is_booked_exactly() -> None:
    b = FakeBoard("acme-0", counter=U32 - 5_000, max_value=U32)
    src = source(FakeVendor([b]))
    first = read(src, 0.0)["acmegpu0"]
    assert (first.energy_j, first.source, first.vendor) == (0.0, "counter", "acme")
    b.counter = 3_000  # wrapped: (U32 - (U32 - 5000)) + 3000 = 8000 mJ
    r = read(src, 1.0)["acmegpu0"]
    assert (r.energy_j, r.source, r.power_w) == (8.0, "counter", 8.0)
    assert src.problems() == []
    assert src.name == "gpu_acme"


def test_a_counter_value_above_its_width_is_not_trusted() -> None:
    b = FakeBoard("acme-0", counter=0, max_value=U32)
    src = source(FakeVendor([b]))
    read(src, 0.0)
    b.counter = 100_000  # 100 J in 1 s: 100 W
    assert read(src, 1.0)["acmegpu0"].energy_j == 100.0
    b.counter = U32 + 10  # a value no 32-bit counter holds
    r = read(src, 3.0)["acmegpu0"]
    assert (r.energy_j, r.source) == (100.0 * 2.0, "power")  # the last average power x dt
    assert any("not trusted (above_range)" in p for p in src.problems())


def test_a_reset_counter_uses_the_previous_power_not_the_baseline_rule() -> None:
    b = FakeBoard("acme-0", counter=50_000)  # never wraps
    src = source(FakeVendor([b]))
    read(src, 0.0)
    b.counter = 80_000  # 30 J in 1 s
    assert read(src, 1.0)["acmegpu0"].energy_j == 30.0
    b.counter = 1_000  # went back: a reset, not a first reading (which would book 0 J)
    r = read(src, 2.0)["acmegpu0"]
    assert (r.energy_j, r.source) == (30.0, "power")
    assert any("went backwards" in p for p in src.problems())


def test_error_kinds_drive_features_problems_and_attribution() -> None:
    b = FakeBoard("acme-0", counter=0, procs=[ProcEntry(pid=4242, used_bytes=1 << 20)])
    b.errors["memory"] = GpuError(GpuErrorKind.NOT_SUPPORTED, "AcmeError: no memory info", "AcmeNotSupported")
    b.errors["processes"] = GpuError(GpuErrorKind.NO_PERMISSION, "AcmeError: permission denied", "AcmeNoPerm")
    vendor = FakeVendor([b])
    src = source(vendor)
    read(src, 0.0)
    b.counter = 42_000
    r = read(src, 1.0)["acmegpu0"]
    assert r.energy_j == 42.0  # booked whatever the side queries did
    assert r.attributable is False and r.processes == ()
    assert r.memory_total_bytes is None
    assert any("acmegpu0: process list failed: AcmeError: permission denied" in p for p in src.problems())
    assert any("memory info not supported (AcmeNotSupported)" in n for n in src.notes())
    assert not any("memory" in p for p in src.problems())  # not supported is a fact, not a problem
    assert src.counters()["gpu_acme_feature_failures_total"] == 1.0
    del b.errors["processes"]
    r = read(src, 40.0)["acmegpu0"]  # after the 30 s backoff: retried, works
    assert r.attributable is True and [p.pid for p in r.processes] == [4242]
    assert src.problems() == []


def test_a_lost_board_is_isolated_and_the_other_still_read() -> None:
    a, b = FakeBoard("acme-0", counter=0), FakeBoard("acme-1", counter=0)
    src = source(FakeVendor([a, b]), lost_retry_s=1.0)
    read(src, 0.0)
    a.errors["energy"] = GpuError(GpuErrorKind.LOST, "AcmeError: gone")
    a.errors["alive"] = GpuError(GpuErrorKind.LOST, "AcmeError: gone")
    b.counter = 7_000
    got = read(src, 1.0)
    assert list(got) == ["acmegpu1"] and got["acmegpu1"].energy_j == 7.0
    assert any("acmegpu0: skipped: AcmeError: gone" in p for p in src.problems())
    del a.errors["energy"], a.errors["alive"]
    a.counter = 9_000  # the counter survived: the gap is booked when it is back
    read(src, 3.0)  # the probe finds it back
    got = read(src, 4.0)
    assert got["acmegpu0"].energy_j == 9.0


def test_uninitialized_library_is_initialised_again_and_the_baseline_kept() -> None:
    b = FakeBoard("acme-0", counter=0)
    vendor = FakeVendor([b])
    src = source(vendor)
    read(src, 0.0)
    assert vendor.inits == 1
    b.errors["energy"] = GpuError(GpuErrorKind.UNINITIALIZED, "AcmeError: not initialised")
    with pytest.raises(SourceError):
        src.read(1.0)  # nothing could be read this tick
    assert vendor.inits == 2  # re-initialised at the end of that read
    del b.errors["energy"]
    b.counter = 5_000  # the baseline (kept by UUID) spans the failed tick
    assert read(src, 2.0)["acmegpu0"].energy_j == 5.0


def test_no_driver_makes_a_quiet_source_disabled() -> None:
    vendor = FakeVendor([])
    vendor.init_error = GpuError(GpuErrorKind.NO_DRIVER, "AcmeError: driver not loaded")
    src = source(vendor, quiet_without_driver=True)
    with pytest.raises(SourceDisabled) as err:
        src.read(0.0)
    assert "no ACME driver (AcmeError: driver not loaded)" in err.value.detail


def test_partitions_read_their_own_lists_and_split_the_board_by_size() -> None:
    b = FakeBoard("acme-0", counter=0, parts={0: [ProcEntry(pid=11, used_bytes=5)], 1: []})
    src = source(FakeVendor([b]))
    read(src, 0.0)
    b.counter = 60_000  # 60 J over 2 equal partitions
    got = read(src, 1.0)
    assert set(got) == {"acmegpu0", "acmegpu0-p0", "acmegpu0-p1"}
    p0, p1, board = got["acmegpu0-p0"], got["acmegpu0-p1"], got["acmegpu0"]
    assert (p0.energy_j, p1.energy_j, board.energy_j) == (30.0, 30.0, 0.0)
    assert (p0.parent, p0.vendor, [p.pid for p in p0.processes]) == ("acmegpu0", "acme", [11])
    assert p0.attributable and p1.attributable and not board.attributable
    assert "acmegpu0: 2 partitions" in src.notes()
    b.errors["processes"] = GpuError(GpuErrorKind.OTHER, "AcmeError: busy")
    b.counter = 120_000
    got = read(src, 2.0)
    assert not got["acmegpu0-p0"].attributable and got["acmegpu0-p0"].energy_j == 30.0
    assert any("process lists failed for partition(s) 0, 1" in p for p in src.problems())


# -- registry -------------------------------------------------------------------------


def write(path: Path, data: dict[str, Any]) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_sim_vendors_follow_each_gpu_then_the_file_default(tmp_path: Path) -> None:
    f = tmp_path / "sim.json"
    assert sim_vendors(write(f, {"gpus": [{"power_w": 1}, {"vendor": "amd", "power_w": 1}]})) == {"nvidia", "amd"}
    assert sim_vendors(write(f, {"vendor": "amd", "gpus": [{"power_w": 1}]})) == {"amd"}
    assert sim_vendors(write(f, {"gpus": []})) == set()
    assert sim_vendors(str(tmp_path / "missing.json")) == set()


def test_sim_backend_opens_one_source_per_vendor_in_the_file(tmp_path: Path) -> None:
    f = tmp_path / "sim.json"
    cases = [
        ({"gpus": [{"power_w": 100.0}]}, ["gpu"]),
        ({"gpus": []}, ["gpu"]),  # no GPUs yet: NVIDIA as always (they may appear later)
        ({"gpus": [{"power_w": 100.0}, {"vendor": "amd", "power_w": 100.0}]}, ["gpu", "gpu_amd"]),
        ({"vendor": "amd", "gpus": [{"power_w": 100.0}]}, ["gpu_amd"]),
    ]
    for data, names in cases:
        opened = open_gpu_sources(GpuConfig(backend="sim", sim_file=write(f, data)))
        try:
            assert [o.name for o in opened] == names, data
            assert all(o.source is not None and o.source.name == o.name for o in opened), opened
        finally:
            for o in opened:
                if o.source is not None:
                    o.source.close()


def test_none_backend_disables_gpu_under_its_old_health_name() -> None:
    assert [tuple(o) for o in open_gpu_sources(GpuConfig(backend="none"))] == [
        ("gpu", None, "GPU disabled by config")]
