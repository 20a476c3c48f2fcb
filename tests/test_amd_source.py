"""The AMD GPU adapter (daemon/sources/gpu/amd.py) under the vendor-neutral collector,
over the simulated amdsmi (daemon/sources/amdsmi_sim.py).

Truth comes from what each test writes in the sim file (power x simulated time, engine
shares) and the fake clock it moves; never from the code under test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from wattprint.daemon.config import GpuConfig
from wattprint.daemon.sources.amdsmi_sim import SimulatedAmdSmi
from wattprint.daemon.sources.base import SourceDisabled, SourceError
from wattprint.daemon.sources.gpu.amd import AmdSmiGpuSource, AmdVendor, open_amd
from wattprint.daemon.sources.gpu.policy import GpuSource

try:
    from gpusim import FakeClock, amd_proc, gpu, write_sim
except ImportError:  # pragma: no cover - tests/ not on sys.path
    sys.path.insert(0, str(Path(__file__).parent))
    from gpusim import FakeClock, amd_proc, gpu, write_sim

UNIT_J = 15.300000190734863e-6  # one accumulator unit (counter_resolution µJ, a C float)
GIB = 1 << 30


def source(sim_path: Path, clock: FakeClock, *, euid: int = 0, quiet: bool = False) -> GpuSource:
    smi = SimulatedAmdSmi(str(sim_path), clock=clock)
    return GpuSource(AmdVendor(smi, euid=lambda: euid), pid_exists=lambda pid: True, clock=clock,
                     wall_clock=clock, pid_namespace_initial=True, power_sample_hz=0.0,
                     quiet_without_driver=quiet)


def read_at(src: GpuSource, clock: FakeClock, t: float) -> dict:
    clock.t = t
    return {r.device: r for r in src.read(t)}


def test_counter_energy_names_and_vendor(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=550.0),
                         gpu(1, vendor="amd", power_w=250.0)])
    src = source(sim_path, clock)
    assert src.name == "gpu_amd"
    first = read_at(src, clock, 1000.0)
    assert set(first) == {"amdgpu0", "amdgpu1"}
    assert all(r.energy_j == 0.0 for r in first.values())  # the baseline
    r = read_at(src, clock, 1002.0)
    assert r["amdgpu0"].energy_j == pytest.approx(550.0 * 2, abs=UNIT_J)
    assert r["amdgpu1"].energy_j == pytest.approx(250.0 * 2, abs=UNIT_J)
    for dev in r.values():
        assert (dev.source, dev.vendor, dev.kind, dev.parent) == ("counter", "amd", "gpu", "")
    assert r["amdgpu0"].name == "AMD Instinct MI300X"
    assert src.problems() == []


def test_counter_reset_at_driver_reload_uses_the_previous_average_power(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=400.0)])
    src = source(sim_path, clock)
    read_at(src, clock, 1000.0)
    read_at(src, clock, 1001.0)
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=400.0, counter_epoch=1)])  # amdgpu reloaded
    r = read_at(src, clock, 1002.0)["amdgpu0"]
    # The accumulator restarted at 0: never a negative or a 2^64 - x step.
    assert r.source == "power" and r.energy_j == pytest.approx(400.0, rel=1e-6)
    assert any("went backwards" in p for p in src.problems())
    r = read_at(src, clock, 1003.0)["amdgpu0"]
    assert r.source == "counter" and r.energy_j == pytest.approx(400.0, abs=UNIT_J)
    assert src.problems() == []


def test_no_counter_integrates_socket_power(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", energy_counter=False, power_w=300.0),
                         gpu(1, vendor="amd", energy_counter=False, name="AMD Instinct MI250X", power_w=200.0)])
    src = source(sim_path, clock)
    read_at(src, clock, 1000.0)
    read_at(src, clock, 1001.0)
    r = read_at(src, clock, 1002.0)
    assert r["amdgpu0"].source == "power" and r["amdgpu0"].energy_j == pytest.approx(300.0, rel=1e-6)
    # The MI250X has only the average socket power (current is "N/A").
    assert r["amdgpu1"].source == "power" and r["amdgpu1"].energy_j == pytest.approx(200.0, rel=1e-6)
    assert any("energy counter not supported" in n for n in src.notes())
    assert src.problems() == []


def test_power_before_rocm_6_2_skips_65535(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", energy_counter=False, power_w=120.0)], amdsmi_api="6.1")
    src = source(sim_path, clock)
    read_at(src, clock, 1000.0)
    r = read_at(src, clock, 1001.0)["amdgpu0"]
    assert r.energy_j == pytest.approx(120.0, rel=1e-6)  # not 65535 W


def test_no_power_at_all_is_a_note_not_a_crash(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", energy_counter=False, power_sensor="none")])
    src = source(sim_path, clock)
    with pytest.raises(SourceError, match="neither an energy counter nor power"):
        read_at(src, clock, 1000.0)  # nothing measurable on the only GPU: the source cannot read
    assert any("not supported" in n for n in src.notes())


def test_engine_time_becomes_the_activity_share(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=500.0, processes=[
        amd_proc(101, gfx_util=30), amd_proc(102, gfx_util=60), amd_proc(103, enc_util=45)])])
    src = source(sim_path, clock)
    read_at(src, clock, 1000.0)
    read_at(src, clock, 1002.0)
    r = read_at(src, clock, 1004.0)["amdgpu0"]
    util = {p.pid: (p.sm_util_pct, p.enc_util_pct) for p in r.processes}
    assert util[101] == pytest.approx((30.0, 0.0))
    assert util[102] == pytest.approx((60.0, 0.0))
    assert util[103] == pytest.approx((0.0, 45.0))
    assert {p.used_memory_bytes for p in r.processes} == {GIB}


def test_a_new_process_under_an_old_pid_is_discarded_once(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(101, gfx_util=80), amd_proc(102, gfx_util=20)])])
    src = source(sim_path, clock)
    read_at(src, clock, 1000.0)
    read_at(src, clock, 1001.0)
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(102, gfx_util=20)])])
    read_at(src, clock, 1002.0)
    # 101 comes back (a new fd: its engine time starts at 0, below what was seen before).
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(101, gfx_util=80), amd_proc(102, gfx_util=20)])])
    r = read_at(src, clock, 1003.0)["amdgpu0"]
    util = {p.pid: p.sm_util_pct for p in r.processes}
    assert util[102] == pytest.approx(20.0)
    assert util[101] == 0.0
    r = read_at(src, clock, 1004.0)["amdgpu0"]
    assert {p.pid: p.sm_util_pct for p in r.processes}[101] == pytest.approx(80.0)


def test_unreadable_engine_time_is_a_problem_and_shares_by_memory(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[
        amd_proc(101, gfx_util=10), amd_proc(102, gfx_util=90, fdinfo_readable=False, used_memory_bytes=3 * GIB)])])
    src = source(sim_path, clock)
    read_at(src, clock, 1000.0)
    r = read_at(src, clock, 1001.0)["amdgpu0"]
    assert [p.sm_util_pct for p in r.processes] == [None, None]  # no activity: memory share
    assert [p.used_memory_bytes for p in r.processes] == [GIB, 3 * GIB]  # KFD's VRAM still there
    assert r.attributable
    [problem] = src.problems()
    assert "102" in problem and "root" in problem


def test_process_list_not_supported_is_a_note_no_permission_a_problem(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=100.0, processes=[amd_proc(5)],
                             errors={"amdsmi_get_gpu_process_list": "NOT_SUPPORTED"}),
                         gpu(1, vendor="amd", power_w=100.0, processes=[amd_proc(6)],
                             errors={"amdsmi_get_gpu_process_list": "NO_PERM"})])
    src = source(sim_path, clock)
    read_at(src, clock, 1000.0)
    r = read_at(src, clock, 1001.0)
    assert r["amdgpu0"].energy_j == pytest.approx(100.0, abs=UNIT_J)  # energy booked regardless
    assert r["amdgpu1"].energy_j == pytest.approx(100.0, abs=UNIT_J)
    assert r["amdgpu0"].processes == ()
    assert r["amdgpu1"].attributable is False  # its share cannot be known: unattributed
    assert any("amdgpu0" in n and "process list not supported" in n for n in src.notes())
    assert [p for p in src.problems() if "amdgpu1" in p and "AMDSMI_STATUS_NO_PERM" in p]
    assert not [p for p in src.problems() if "amdgpu0" in p]


def test_rocm_6_1_needs_root_for_process_lists(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(5, gfx_util=50), amd_proc(6, gfx_util=50)])],
              amdsmi_api="6.1")
    as_root = source(sim_path, clock, euid=0)
    read_at(as_root, clock, 1000.0)
    r = read_at(as_root, clock, 1001.0)["amdgpu0"]
    assert r.attributable and [p.pid for p in r.processes] == [5, 6]
    user = source(sim_path, clock, euid=1000)
    read_at(user, clock, 1001.0)
    r = read_at(user, clock, 1002.0)["amdgpu0"]
    assert r.attributable is False and r.energy_j > 0
    assert any("run wattprint as root" in p for p in user.problems())


def test_mi300x_cpx_partitions_split_the_board_equally(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=800.0, compute_partition="CPX",
                             processes=[amd_proc(31, partition=2), amd_proc(32, partition=7)]),
                         gpu(1, vendor="amd", power_w=300.0)])
    src = source(sim_path, clock)
    read_at(src, clock, 1000.0)
    r = read_at(src, clock, 1002.0)
    parts = {d: x for d, x in r.items() if x.parent == "amdgpu0"}
    assert sorted(parts) == [f"amdgpu0-p{k}" for k in range(8)]
    for x in parts.values():
        assert x.energy_j == pytest.approx(800.0 * 2 / 8, rel=1e-6)  # read once, not 8 times
        assert x.vendor == "amd"
    assert [p.pid for p in parts["amdgpu0-p2"].processes] == [31]
    assert [p.pid for p in parts["amdgpu0-p7"].processes] == [32]
    board = r["amdgpu0"]
    assert board.energy_j == pytest.approx(0.0, abs=1e-6) and board.attributable is False
    assert sum(x.energy_j for x in parts.values()) + board.energy_j == pytest.approx(1600.0, abs=UNIT_J)
    assert r["amdgpu1"].energy_j == pytest.approx(600.0, abs=UNIT_J)  # device numbers count boards
    assert any("compute partition CPX" in n for n in src.notes())


def test_driver_not_loaded_quiet_is_disabled_then_found(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd")], amdgpu_loaded=False)
    src = source(sim_path, clock, quiet=True)
    with pytest.raises(SourceDisabled):
        read_at(src, clock, 1000.0)
    write_sim(sim_path, [gpu(0, vendor="amd")])
    r = read_at(src, clock, 1100.0)  # after the init backoff
    assert set(r) == {"amdgpu0"}


def test_a_vanished_board_is_lost_and_the_other_still_read(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=100.0), gpu(1, vendor="amd", power_w=200.0)])
    src = GpuSource(AmdVendor(SimulatedAmdSmi(str(sim_path), clock=clock)), pid_exists=lambda pid: True,
                    clock=clock, wall_clock=clock, pid_namespace_initial=True, power_sample_hz=0.0,
                    run_probe=lambda fn: None, reinit_interval_s=0)
    read_at(src, clock, 1000.0)
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=100.0), gpu(5, vendor="amd", power_w=200.0)])  # uuid changed
    r = read_at(src, clock, 1001.0)
    assert r["amdgpu0"].energy_j == pytest.approx(100.0, abs=UNIT_J)
    assert "amdgpu1" not in r or r["amdgpu1"].energy_j == 0.0
    assert any("amdgpu1" in p for p in src.problems())


def test_open_amd_without_the_package_or_library(monkeypatch):
    from wattprint.daemon.sources.gpu import amd

    monkeypatch.setattr(amd, "import_amdsmi", lambda: (None, "amdsmi not installed (no module)"))
    src, message = open_amd(GpuConfig(backend="auto"), quiet=True)
    assert src is None and "not installed" in message
    src, message = open_amd(GpuConfig(backend="amdsmi"), quiet=False)
    assert src is None and "backend amdsmi" in message


def test_the_real_import_without_rocm_is_contained(capsys):
    from wattprint.daemon.sources.gpu.amd import import_amdsmi

    module, why = import_amdsmi()  # amdsmi ([test] extra) is installed; ROCm's library is not
    assert module is None and "libamd_smi.so" in why
    assert capsys.readouterr().out == ""  # amdsmi's own prints are swallowed


def test_open_amd_over_the_simulator(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd"), gpu(1, vendor="amd", name="AMD Instinct MI250X")])
    src, message = open_amd(GpuConfig(backend="sim", sim_file=str(sim_path)),
                            SimulatedAmdSmi(str(sim_path), clock=clock), quiet=True)
    assert src is not None and src.name == "gpu_amd"
    assert "2 AMD GPU(s): AMD Instinct MI300X, AMD Instinct MI250X" in message


def test_amdsmi_gpu_source_factory(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=10.0)])
    src = AmdSmiGpuSource(SimulatedAmdSmi(str(sim_path), clock=clock), clock=clock, wall_clock=clock,
                          pid_namespace_initial=True)
    assert set(read_at(src, clock, 1000.0)) == {"amdgpu0"}
    assert src.counters()["gpu_amd_amdsmi_calls_total"] > 0


def test_a_32_bit_accumulator_wraps_without_a_reset(sim_path, clock):
    # gpu_metrics v1.0: 2^32 units x 15.3 µJ = 65.7 kJ, about 164 s at 400 W.
    write_sim(sim_path, [gpu(0, vendor="amd", name="AMD Instinct MI50", power_w=400.0, accumulator_bits=32)])
    src = source(sim_path, clock)
    read_at(src, clock, 1000.0)
    got = [read_at(src, clock, 1000.0 + 60.0 * k)["amdgpu0"] for k in range(1, 6)]  # wraps at ~164 s
    for r in got:
        assert r.source == "counter"
        assert r.energy_j == pytest.approx(400.0 * 60.0, abs=UNIT_J)
    assert src.problems() == []
    # A real driver reload on that board is still a reset, not a wrap.
    write_sim(sim_path, [gpu(0, vendor="amd", name="AMD Instinct MI50", power_w=400.0, accumulator_bits=32,
                             counter_epoch=1)])
    r = read_at(src, clock, 1301.0)["amdgpu0"]
    assert r.source == "power"
    assert any("went backwards" in p for p in src.problems())
