"""The NVML collector (daemon/sources/gpu.py) against the simulated NVML
(daemon/sources/nvml_sim.py), driven by a fake clock, with real processes."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pynvml
import pytest

from wattprint.daemon.config import GpuConfig
from wattprint.daemon.model import DeviceReading
from wattprint.daemon.sources import gpu as gpu_mod
from wattprint.daemon.sources.gpu import nvidia as nvidia_mod
from wattprint.daemon.sources.base import SourceDisabled, SourceError
from wattprint.daemon.sources.gpu import NvmlGpuSource, open_gpu_source
from wattprint.daemon.sources.nvml_sim import SimFileError, SimulatedNvml

try:
    from gpusim import FakeClock, gpu, mig_instance, proc, write_raw, write_sim
except ImportError:  # pragma: no cover - tests/ not on sys.path (e.g. importlib mode)
    sys.path.insert(0, str(Path(__file__).parent))
    from gpusim import FakeClock, gpu, mig_instance, proc, write_raw, write_sim

MJ_TOL_J = 0.002  # the counter is integer millijoules: at most 1 mJ off per end


class CountingNvml(SimulatedNvml):
    """The simulator, counting how often each NVML function is called."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: dict[str, int] = {}

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name.startswith("nvml"):
            calls = super().__getattribute__("calls")
            calls[name] = calls.get(name, 0) + 1
        return attr


def make_source(sim_path: Path, clock: FakeClock, nvml_cls=SimulatedNvml, pid_exists=lambda pid: True, **options):
    """The collector on the simulator, on the test's clock; lost-GPU probes run inline."""
    nvml = nvml_cls(str(sim_path), clock=clock)
    options.setdefault("init_retry_s", 0.0)
    options.setdefault("pid_namespace_initial", True)
    options.setdefault("driver_gpus_dir", None)
    src = NvmlGpuSource(nvml, pid_exists=pid_exists, clock=clock, run_probe=lambda probe: probe(), **options)
    return src, nvml


def tick(src: NvmlGpuSource, clock: FakeClock, t: float) -> dict[str, DeviceReading]:
    clock.t = t
    return {r.device: r for r in src.read(t)}


def reload_at(nvml: SimulatedNvml, clock: FakeClock, t: float) -> None:
    """Let the simulator re-read its file at time t (as a tick in between would)."""
    clock.t = t
    nvml.nvmlDeviceGetCount()


# --- energy -------------------------------------------------------------------------------


def test_first_read_is_baseline_then_counter_energy_is_power_times_time(sim_path, clock):
    write_sim(sim_path, [gpu(0, 250.0)])
    src, _ = make_source(sim_path, clock)
    r0 = tick(src, clock, 1000.0)["gpu0"]
    assert r0.energy_j == 0.0 and r0.source == "counter" and r0.interval_s == 0.0
    assert r0.power_w == pytest.approx(250.0)
    assert r0.name == "NVIDIA H100 80GB HBM3" and r0.kind == "gpu"

    r1 = tick(src, clock, 1001.0)["gpu0"]
    assert r1.source == "counter"
    assert r1.interval_s == pytest.approx(1.0)
    assert r1.energy_j == pytest.approx(250.0, abs=MJ_TOL_J)
    assert r1.power_w == pytest.approx(250.0, abs=0.01)

    total = r1.energy_j
    for t in (1002.5, 1003.0, 1010.0):
        total += tick(src, clock, t)["gpu0"].energy_j
    assert total == pytest.approx(250.0 * 10.0, abs=MJ_TOL_J)
    assert src.problems() == []


def test_power_change_applies_from_the_moment_the_file_is_reread(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0)])
    src, nvml = make_source(sim_path, clock)
    tick(src, clock, 1000.0)

    # Re-read half-way through the interval: 0.5 s at 100 W + 0.5 s at 300 W.
    write_sim(sim_path, [gpu(0, 300.0)])
    reload_at(nvml, clock, 1000.5)
    r = tick(src, clock, 1001.0)["gpu0"]
    assert r.energy_j == pytest.approx(0.5 * 100 + 0.5 * 300, abs=MJ_TOL_J)
    assert r.power_w == pytest.approx(200.0, abs=0.01)  # average over the interval

    # Changed but not re-read until the next tick: the old power holds until then.
    write_sim(sim_path, [gpu(0, 50.0)])
    r = tick(src, clock, 1002.0)["gpu0"]
    assert r.energy_j == pytest.approx(300.0, abs=MJ_TOL_J)
    r = tick(src, clock, 1003.0)["gpu0"]
    assert r.energy_j == pytest.approx(50.0, abs=MJ_TOL_J)


def test_counter_reset_loses_nothing(sim_path, clock):
    write_sim(sim_path, [gpu(0, 200.0)])
    src, nvml = make_source(sim_path, clock)
    tick(src, clock, 1000.0)
    total = tick(src, clock, 1001.0)["gpu0"].energy_j

    # Driver reload half-way through the next interval: the counter restarts at 0.
    write_sim(sim_path, [gpu(0, 200.0, counter_epoch=1)])
    reload_at(nvml, clock, 1001.5)
    assert nvml.nvmlDeviceGetTotalEnergyConsumption(nvml.nvmlDeviceGetHandleByIndex(0)) == 0
    r = tick(src, clock, 1002.0)["gpu0"]
    assert r.source == "power"
    assert r.energy_j == pytest.approx(200.0, abs=MJ_TOL_J)
    assert any("backwards" in p for p in src.problems())
    total += r.energy_j

    r = tick(src, clock, 1003.0)["gpu0"]
    assert r.source == "counter"  # re-baselined on the new counter
    assert r.energy_j == pytest.approx(200.0, abs=MJ_TOL_J)
    total += r.energy_j
    assert total == pytest.approx(200.0 * 3, abs=3 * MJ_TOL_J)
    assert src.problems() == []


def test_without_energy_counter_power_is_integrated_by_trapezoid(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0, energy_counter=False)])
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml)
    r0 = tick(src, clock, 1000.0)["gpu0"]
    assert r0.source == "power" and r0.energy_j == 0.0 and r0.power_w == pytest.approx(100.0)

    r1 = tick(src, clock, 1001.0)["gpu0"]
    assert r1.source == "power"
    assert r1.energy_j == pytest.approx(100.0)

    write_sim(sim_path, [gpu(0, 300.0, energy_counter=False)])
    r2 = tick(src, clock, 1003.0)["gpu0"]  # 2 s between a 100 W and a 300 W sample
    assert r2.source == "power"
    assert r2.energy_j == pytest.approx((100.0 + 300.0) / 2 * 2.0)
    assert r2.power_w == pytest.approx(200.0)  # the average over the interval
    assert r2.interval_s == pytest.approx(2.0)

    # NOT_SUPPORTED turned the counter off once; it is not asked again every tick.
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1
    assert any("energy counter not supported" in n for n in src.notes())
    assert src.problems() == []


def test_sim_raises_real_pynvml_errors_and_structs(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0, energy_counter=False, util_supported=False,
                             processes=[proc(os.getpid(), 123, sm_util=10)]),
                         gpu(1, 100.0, lost=True)])
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 2
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetTotalEnergyConsumption(h)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetProcessUtilization(h, 0)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetHandleByIndex(2)
    assert nvml.nvmlDeviceGetPowerUsage(h) == 100_000
    assert isinstance(nvml.nvmlDeviceGetMemoryInfo(h), pynvml.c_nvmlMemory_t)
    assert nvml.nvmlDeviceGetMemoryInfo(h).used == 123
    [p] = nvml.nvmlDeviceGetComputeRunningProcesses(h)
    assert (p.pid, p.usedGpuMemory, p.gpuInstanceId) == (os.getpid(), 123, 0xFFFFFFFF)
    assert nvml.nvmlDeviceGetGraphicsRunningProcesses(h) == []
    assert nvml.nvmlDeviceGetMigMode(h) == [pynvml.NVML_DEVICE_MIG_DISABLE] * 2
    nvml.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetName(h)


def test_sim_utilisation_samples_are_real_structs_with_epoch_microseconds(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(os.getpid(), sm_util=42)])])
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    nvml.nvmlInit()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    [s] = nvml.nvmlDeviceGetProcessUtilization(h, 0)
    assert isinstance(s, pynvml.c_nvmlProcessUtilizationSample_t)
    assert (s.pid, s.smUtil) == (os.getpid(), 42)
    assert abs(s.timeStamp / 1e6 - time.time()) < 60
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetProcessUtilization(h, s.timeStamp)


# --- failures -----------------------------------------------------------------------------


def test_lost_gpu_is_isolated_probed_with_backoff_and_its_gap_booked(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0), gpu(1, 300.0)])
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml, lost_retry_s=2.0)
    tick(src, clock, 1000.0)

    write_sim(sim_path, [gpu(0, 100.0), gpu(1, 300.0, lost=True)])
    readings = tick(src, clock, 1001.0)
    assert set(readings) == {"gpu0"}
    assert readings["gpu0"].energy_j == pytest.approx(100.0, abs=MJ_TOL_J)
    [problem] = src.problems()
    assert problem.startswith("gpu1:") and "GpuIsLost" in problem and "GPU is lost" in problem

    # Not asked again every tick: no probe before the backoff (2 s) is over.
    probes = nvml.calls.get("nvmlDeviceGetHandleByIndex", 0)
    write_sim(sim_path, [gpu(0, 100.0), gpu(1, 300.0)])  # back (e.g. after a reset)
    readings = tick(src, clock, 1002.0)
    assert set(readings) == {"gpu0"} and nvml.calls.get("nvmlDeviceGetHandleByIndex", 0) == probes
    assert any("gpu1" in p for p in src.problems())
    readings = tick(src, clock, 1003.0)  # the probe (run inline here) finds it back
    assert set(readings) == {"gpu0"} and nvml.calls["nvmlDeviceGetHandleByIndex"] == probes + 1

    # Read again from the next tick; its baseline was kept, so the whole gap is booked.
    readings = tick(src, clock, 1004.0)
    assert set(readings) == {"gpu0", "gpu1"}
    assert readings["gpu1"].energy_j == pytest.approx(4 * 300.0, abs=MJ_TOL_J)
    assert readings["gpu1"].interval_s == pytest.approx(4.0)
    assert src.problems() == []


def test_lost_gpu_probes_back_off_exponentially(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0), gpu(1, 300.0, lost=True)])
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml, lost_retry_s=2.0)
    tick(src, clock, 1000.0)  # lost at enumeration
    base = nvml.calls["nvmlDeviceGetHandleByIndex"]
    probe_times = []
    for t in range(1001, 1031):
        before = nvml.calls["nvmlDeviceGetHandleByIndex"]
        assert set(tick(src, clock, float(t))) == {"gpu0"}
        if nvml.calls["nvmlDeviceGetHandleByIndex"] > before:
            probe_times.append(t)
    # Waits of 2, 3, 4.5, 6.75, 10.125 s (x1.5), each from the previous probe (1 s ticks).
    assert probe_times == [1002, 1005, 1010, 1017, 1028]
    assert nvml.calls["nvmlDeviceGetHandleByIndex"] - base == len(probe_times)


def test_all_gpus_lost_raises_source_error(sim_path, clock):
    write_sim(sim_path, [gpu(0, lost=True), gpu(1, lost=True)])
    src, _ = make_source(sim_path, clock)
    with pytest.raises(SourceError) as err:
        tick(src, clock, 1000.0)
    assert "gpu0" in err.value.detail and "gpu1" in err.value.detail


def test_no_gpus_is_an_empty_read_not_an_error(sim_path, clock):
    write_sim(sim_path, [])
    src, _ = make_source(sim_path, clock)
    assert tick(src, clock, 1000.0) == {}
    assert src.problems() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"gpus": [{"name": "x", "uuid": "u", "power_w": "lots"}]}', "gpus[0].power_w: expected a number"),
        ('{"gpus": [{"uuid": "u"}]}', "gpus[0]: missing key 'power_w'"),
        ('{"gpus": [{"power_w": 1, "powr_w": 2}]}', "unknown key 'powr_w'"),
        ('{"gpus": [{"power_w": 1, "processes": [{"pid": -1}]}]}', "gpus[0].processes[0].pid"),
        ('{"gpu": []}', "unknown key 'gpu'"),
        ("[]", "expected an object"),
    ],
)
def test_malformed_sim_file_is_a_clear_source_error(sim_path, clock, text, expected):
    write_sim(sim_path, [gpu(0, 100.0)])
    src, _ = make_source(sim_path, clock)
    tick(src, clock, 1000.0)

    write_raw(sim_path, text)
    with pytest.raises(SourceError) as err:
        tick(src, clock, 1001.0)
    assert str(sim_path) in err.value.detail
    assert expected in err.value.detail

    # Fixed file: reading resumes, and the counter kept integrating the last good power.
    write_sim(sim_path, [gpu(0, 100.0)])
    r = tick(src, clock, 1002.0)["gpu0"]
    assert r.energy_j == pytest.approx(200.0, abs=MJ_TOL_J)


def test_missing_sim_file_fails_init_with_the_path_then_recovers(sim_path, clock):
    src, nvml = make_source(sim_path, clock)
    with pytest.raises(SourceError) as err:
        tick(src, clock, 1000.0)
    assert "init failed" in err.value.detail and str(sim_path) in err.value.detail and "not found" in err.value.detail
    write_sim(sim_path, [gpu(0, 100.0)])
    assert tick(src, clock, 1001.0)["gpu0"].energy_j == 0.0  # baseline
    assert tick(src, clock, 1002.0)["gpu0"].energy_j == pytest.approx(100.0, abs=MJ_TOL_J)


def test_sim_file_error_is_an_nvml_error_with_a_message(sim_path, clock):
    write_raw(sim_path, "{")
    with pytest.raises(pynvml.NVMLError_Unknown) as err:
        SimulatedNvml(str(sim_path), clock=clock).nvmlInit()
    assert isinstance(err.value, SimFileError)
    assert str(sim_path) in str(err.value)


def test_gpu_replaced_at_an_index_is_seen_at_the_next_reinit_with_a_new_baseline(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0)])
    src, _ = make_source(sim_path, clock, reinit_interval_s=10.0)
    tick(src, clock, 1000.0)
    write_sim(sim_path, [gpu(7, 100.0, name="NVIDIA A100-SXM4-40GB")])  # other uuid
    tick(src, clock, 1010.0)  # re-init at the end of this read
    r = tick(src, clock, 1011.0)["gpu0"]
    assert r.name == "NVIDIA A100-SXM4-40GB" and r.energy_j == 0.0  # another GPU: a new baseline
    assert tick(src, clock, 1012.0)["gpu0"].energy_j == pytest.approx(100.0, abs=MJ_TOL_J)


# --- processes ----------------------------------------------------------------------------


@pytest.fixture
def live_pid(labelled_process) -> int:
    return labelled_process().pid  # unlabelled; killed after the test


@pytest.fixture
def dead_pid(labelled_process) -> int:
    child = labelled_process(code="pass")
    child.wait()  # reaped: its /proc entry is gone
    assert not os.path.exists(f"/proc/{child.pid}")
    return child.pid


def test_processes_without_proc_entry_are_kept_invisible_and_deduplicated(sim_path, clock, live_pid, dead_pid):
    me = os.getpid()
    write_sim(sim_path, [gpu(0, processes=[
        proc(live_pid, 2 << 30, type="compute+graphics"),  # in both lists: once
        proc(me, None, type="graphics"),  # memory not available -> None
        proc(dead_pid, 1 << 30),
        proc(0, 1 << 30),
        proc(0xFFFFFFFF, 1 << 30),
        proc(live_pid + 1_000_000, 1 << 20, type="mps"),
    ])])
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    src = NvmlGpuSource(nvml, init_retry_s=0.0, pid_namespace_initial=True)  # default pid_exists: /proc
    r = tick(src, clock, 1000.0)["gpu0"]
    by_pid = {p.pid: p for p in r.processes}
    assert set(by_pid) == {live_pid, me, dead_pid, 0, 0xFFFFFFFF, live_pid + 1_000_000}
    assert {pid for pid, p in by_pid.items() if p.visible} == {live_pid, me}
    assert by_pid[live_pid].used_memory_bytes == 2 << 30 and by_pid[live_pid].kind == "compute+graphics"
    assert by_pid[me].used_memory_bytes is None and by_pid[me].kind == "graphics"
    assert by_pid[live_pid + 1_000_000].kind == "mps"
    assert r.memory_used_bytes == (2 << 30) + 3 * (1 << 30) + (1 << 20)  # NVML's own figure
    assert r.memory_total_bytes == 80 * (1 << 30)
    c = src.counters()
    assert c["gpu_processes_not_visible"] == 4 and c["gpu_pids_not_visible_total"] == 4
    tick(src, clock, 1001.0)
    assert src.counters()["gpu_pids_not_visible_total"] == 4  # distinct PIDs, not per tick
    assert src.problems() == []


def test_injected_pid_exists_is_used(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(111), proc(222)])])
    src, _ = make_source(sim_path, clock, pid_exists=lambda pid: pid == 222)
    assert [(p.pid, p.visible) for p in tick(src, clock, 1000.0)["gpu0"].processes] == [(111, False), (222, True)]


def test_utilisation_is_averaged_per_pid_over_the_interval(sim_path, clock):
    a, b = 101, 202
    write_sim(sim_path, [gpu(0, processes=[proc(a, sm_util=50), proc(b)])])
    src, nvml = make_source(sim_path, clock)
    r = tick(src, clock, 1000.0)["gpu0"]
    assert {p.pid: p.sm_util_pct for p in r.processes} == {a: 50.0, b: 0.0}

    write_sim(sim_path, [gpu(0, processes=[proc(a, sm_util=90), proc(b, sm_util=10)])])
    reload_at(nvml, clock, 1000.3)
    write_sim(sim_path, [gpu(0, processes=[proc(a, sm_util=30), proc(b)])])
    reload_at(nvml, clock, 1000.6)
    write_sim(sim_path, [gpu(0, processes=[proc(a, sm_util=60), proc(b)])])
    r = tick(src, clock, 1001.0)["gpu0"]
    # a: samples 90, 30, 60 (the first read's 50 is older than the last seen timestamp)
    # b: one sample of 10
    assert {p.pid: p.sm_util_pct for p in r.processes} == {a: pytest.approx(60.0), b: pytest.approx(10.0)}


def test_no_utilisation_samples_means_idle(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(101), proc(202)])])  # no sm_util: NOT_FOUND
    src, nvml = make_source(sim_path, clock)
    h = (nvml.nvmlInit(), nvml.nvmlDeviceGetHandleByIndex(0))[1]
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetProcessUtilization(h, 0)
    for t in (1000.0, 1001.0):
        r = tick(src, clock, t)["gpu0"]
        assert [p.sm_util_pct for p in r.processes] == [0.0, 0.0]


def test_unsupported_utilisation_is_none_and_not_retried(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(101, sm_util=80), proc(102, sm_util=10)], util_supported=False)])
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml)
    for t in (1000.0, 1001.0, 1002.0):
        r = tick(src, clock, t)["gpu0"]
        assert [p.sm_util_pct for p in r.processes] == [None, None]
        assert r.attributable
    assert nvml.calls["nvmlDeviceGetProcessUtilization"] == 1
    assert any("utilisation not supported" in n for n in src.notes())
    assert src.problems() == []


def test_mig_gpu_is_not_attributable(sim_path, clock):
    write_sim(sim_path, [gpu(0, 400.0, mig=True, processes=[proc(101, sm_util=80)]), gpu(1, 100.0)])
    src, _ = make_source(sim_path, clock)
    tick(src, clock, 1000.0)
    readings = tick(src, clock, 1001.0)
    r = readings["gpu0"]
    assert r.attributable is False
    assert r.energy_j == pytest.approx(400.0, abs=MJ_TOL_J) and r.source == "counter"
    assert [p.pid for p in r.processes] == [101]
    assert readings["gpu1"].attributable is True
    assert any("gpu0" in n and "MIG" in n for n in src.notes())
    assert src.problems() == []


# --- open_gpu_source ----------------------------------------------------------------------


def test_open_auto_without_a_driver_keeps_a_quiet_source():
    src, message = open_gpu_source(GpuConfig(backend="auto"))
    if src is not None and not getattr(src, "disabled_reason", ""):  # pragma: no cover - GPU machine
        src.close()
        pytest.skip("this machine has NVML")
    assert src is not None, message
    try:
        assert message.startswith("no NVML (") and "until a driver loads" in message
        assert "no NVIDIA driver" in src.disabled_reason
        with pytest.raises(SourceDisabled) as err:
            src.read(100.0)
        assert "GPU energy not measured" in err.value.detail
    finally:
        src.close()


def test_open_none_is_disabled():
    assert open_gpu_source(GpuConfig(backend="none")) == (None, "GPU disabled by config")


def test_open_sim_reads_the_file(sim_path):
    write_sim(sim_path, [gpu(0, 123.0)])
    src, message = open_gpu_source(GpuConfig(backend="sim", sim_file=str(sim_path)))
    assert src is not None and str(sim_path) in message and src.name == "gpu"
    try:
        [r] = src.read(0.0)
        assert r.device == "gpu0" and r.power_w == pytest.approx(123.0)
    finally:
        src.close()


def test_open_nvml_without_a_gpu_degrades_and_retries_init_slowly(monkeypatch):
    calls = []
    real_init = pynvml.nvmlInit

    def counting_init():
        calls.append(1)
        return real_init()

    monkeypatch.setattr(gpu_mod.pynvml, "nvmlInit", counting_init)
    src, message = open_gpu_source(GpuConfig(backend="nvml"))
    if not calls or message.startswith("GPU: NVML driver"):  # pragma: no cover - GPU machine
        pytest.skip("this machine has NVML")
    assert src is not None and "init failed" in message
    calls.clear()
    with pytest.raises(SourceError) as err:
        src.read(100.0)
    assert "NVML init failed" in err.value.detail and len(calls) == 1
    assert not isinstance(err.value, SourceDisabled)  # asked for explicitly: degraded
    with pytest.raises(SourceError):
        src.read(110.0)  # within 30 s: not retried
    assert len(calls) == 1
    with pytest.raises(SourceError):
        src.read(131.0)
    assert len(calls) == 2
    with pytest.raises(SourceError):
        src.read(180.0)  # then 60 s (backoff)
    assert len(calls) == 2
    with pytest.raises(SourceError):
        src.read(192.0)
    assert len(calls) == 3
    src.close()


# --- scripts/nvml_record.py ---------------------------------------------------------------


def test_nvml_record_script_runs_against_the_simulator(sim_path, tmp_path, monkeypatch, live_pid):
    """No GPU here: route pynvml's functions that the simulator has to it (the rest
    raise the real library's NVMLError_Uninitialized) and check the fixture's shape."""
    import importlib.util
    import json

    script = Path(__file__).resolve().parent.parent / "scripts" / "nvml_record.py"
    spec = importlib.util.spec_from_file_location("nvml_record", script)
    rec_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rec_mod)

    write_sim(sim_path, [gpu(0, 150.0, processes=[proc(live_pid, 1 << 20, sm_util=70), proc(0, None),
                                                  proc(live_pid + 1, 1 << 10, type="mps")]),
                         gpu(1, 50.0, energy_counter=False, mig=True,
                             mig_instances=[mig_instance(3, "3g.40gb"), mig_instance(4, "4g.40gb", slices=4)],
                             processes=[proc(live_pid, 1 << 20, gi_id=4)])])
    sim = SimulatedNvml(str(sim_path))
    for name in dir(sim):
        if name.startswith("nvml"):
            monkeypatch.setattr(pynvml, name, getattr(sim, name))
    monkeypatch.setattr(rec_mod.time, "sleep", lambda s: None)
    out = tmp_path / "rec.json"
    assert rec_mod.main(["--seconds", "2", "--interval", "1", "--out", str(out)]) == 0

    doc = json.loads(out.read_text())
    assert doc["format"] == "wattprint-nvml-record/1"
    assert doc["device_count"]["result"] == 2
    assert doc["devices"][0]["static"]["nvmlDeviceGetName"]["result"] == "NVIDIA H100 80GB HBM3"
    # The simulator has nvmlDeviceGetArchitecture (its "architecture" key, default hopper);
    # a function it lacks still raises the real library's error.
    assert doc["devices"][0]["static"]["nvmlDeviceGetArchitecture"]["result"] == pynvml.NVML_DEVICE_ARCH_HOPPER
    assert doc["devices"][0]["static"]["nvmlDeviceGetPowerManagementLimit"]["error"] == "NVMLError_Uninitialized"
    assert len(doc["ticks"]) == 3
    g0, g1 = doc["ticks"][0]["gpus"]
    assert isinstance(g0["calls"]["nvmlDeviceGetTotalEnergyConsumption"]["result"], int)
    assert g0["calls"]["nvmlDeviceGetPowerUsage"]["result"] == 150_000
    assert g0["calls"]["nvmlDeviceGetMemoryInfo"]["result"]["total"] == 80 * (1 << 30)
    procs = g0["calls"]["nvmlDeviceGetComputeRunningProcesses"]["result"]
    assert {p["pid"]: p["usedGpuMemory"] for p in procs} == {live_pid: 1 << 20, 0: None}
    samples = g0["calls"]["nvmlDeviceGetProcessUtilization"]["result"]
    assert samples and {(s["pid"], s["smUtil"]) for s in samples} == {(live_pid, 70)}
    assert g0["proc_exists"] == {"0": False, str(live_pid): True, str(live_pid + 1): os.path.exists(f"/proc/{live_pid + 1}")}
    assert [p["pid"] for p in g0["calls"]["nvmlDeviceGetMPSComputeRunningProcesses"]["result"]] == [live_pid + 1]
    assert doc["pid_namespace_inode"] == os.stat("/proc/self/ns/pid").st_ino
    migs = doc["devices"][1]["static"]["mig_devices"]
    assert [m["nvmlDeviceGetGpuInstanceId"]["result"] for m in migs[:2]] == [3, 4]
    assert migs[1]["nvmlDeviceGetAttributes"]["result"]["gpuInstanceSliceCount"] == 4
    assert [p["pid"] for p in migs[1]["nvmlDeviceGetComputeRunningProcesses"]["result"]] == [live_pid]
    assert migs[2]["nvmlDeviceGetMigDeviceHandleByIndex"]["error"] == "NVMLError_NotFound"  # unused slot
    second = doc["ticks"][1]["gpus"][0]["calls"]["nvmlDeviceGetProcessUtilization"]
    assert second["args"] == [{"lastSeenTimeStamp": max(s["timeStamp"] for s in samples)}]
    err = g1["calls"]["nvmlDeviceGetTotalEnergyConsumption"]
    assert (err["error"], err["code"], err["message"]) == ("NVMLError_NotSupported", pynvml.NVML_ERROR_NOT_SUPPORTED, "Not Supported")


# --- issue 12: NVML as it really behaves -----------------------------------------------------


class StrippedNvml:
    """The simulator without some functions, as an older nvidia-ml-py would be."""

    def __init__(self, sim: SimulatedNvml, missing: set[str]):
        self._sim, self._missing = sim, missing

    def __getattr__(self, name):
        if name in self._missing:
            raise AttributeError(name)
        return getattr(self._sim, name)


def test_pynvml_floor_is_pinned_to_a_version_with_the_right_struct():
    """pyproject's floor: 12.535.77 scrambled process lists (extra struct field) and had
    no _v2 fallbacks; 12.550.52 is the first with both right (checked against the wheels)."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"nvidia-ml-py>=12.550.52"' in text
    assert gpu_mod.process_struct_ok(pynvml)  # the installed one (floor or newest in CI)


def test_scrambling_process_struct_is_detected_and_lists_not_used(sim_path, clock, monkeypatch):
    import ctypes

    class Scrambled(ctypes.Structure):  # nvidia-ml-py 12.535.77's c_nvmlProcessInfo_t
        _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong), ("gpuInstanceId", ctypes.c_uint),
                    ("computeInstanceId", ctypes.c_uint), ("usedGpuCcProtectedMemory", ctypes.c_ulonglong)]

    class Old:
        c_nvmlProcessInfo_t = Scrambled

    assert not gpu_mod.process_struct_ok(Old)
    monkeypatch.setattr(nvidia_mod, "process_struct_ok", lambda module=None: False)
    write_sim(sim_path, [gpu(0, 200.0, processes=[proc(101, sm_util=50)])])
    src, _ = make_source(sim_path, clock)
    tick(src, clock, 1000.0)
    r = tick(src, clock, 1001.0)["gpu0"]
    assert r.energy_j == pytest.approx(200.0, abs=MJ_TOL_J)  # energy still booked
    assert r.processes == () and r.attributable is False
    assert any("12.550.52" in p for p in src.problems())


def test_process_list_falls_back_to_v2_on_an_older_driver_and_remembers_it(sim_path, clock):
    """Unversioned call on a driver without _v3: pynvml >= 12.550 raises
    NVMLLibraryMismatchError (the simulator does as pynvml does); _v2 answers."""
    write_sim(sim_path, [gpu(0, processes=[proc(101, 1 << 20), proc(102, 2 << 20)],
                             errors={"nvmlDeviceGetComputeRunningProcesses": "FUNCTION_NOT_FOUND"})])
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml)
    for t in (1000.0, 1001.0, 1002.0):
        r = tick(src, clock, t)["gpu0"]
        assert [(p.pid, p.used_memory_bytes) for p in r.processes] == [(101, 1 << 20), (102, 2 << 20)]
        assert r.attributable
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses"] == 1  # tried once, then _v2 only
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 3
    assert src.problems() == []


def test_a_function_missing_from_pynvml_turns_only_that_feature_off(sim_path, clock):
    write_sim(sim_path, [gpu(0, 150.0, processes=[proc(101, 1 << 20)])])
    sim = SimulatedNvml(str(sim_path), clock=clock)
    old = StrippedNvml(sim, {"nvmlDeviceGetMPSComputeRunningProcesses", "nvmlDeviceGetMPSComputeRunningProcesses_v2",
                             "nvmlDeviceGetMigMode", "NVMLLibraryMismatchError"})
    src = NvmlGpuSource(old, pid_exists=lambda pid: True, init_retry_s=0.0, pid_namespace_initial=True,
                        driver_gpus_dir=None)
    tick(src, clock, 1000.0)
    r = tick(src, clock, 1001.0)["gpu0"]
    assert r.energy_j == pytest.approx(150.0, abs=MJ_TOL_J) and [p.pid for p in r.processes] == [101]
    assert src.problems() == []
    assert any("MPS process list not supported" in n for n in src.notes())


@pytest.mark.parametrize("error", ["NO_PERMISSION", "UNKNOWN", "TIMEOUT"])
def test_failing_side_queries_never_skip_the_energy(sim_path, clock, error):
    """Item 2: memory, process list and utilisation each fail alone; the energy is read
    and booked first; the failures are named problems retried with backoff."""
    procs = [proc(101, 1 << 30, sm_util=80), proc(102, 1 << 30, sm_util=20)]
    errors = {"nvmlDeviceGetMemoryInfo": error, "nvmlDeviceGetComputeRunningProcesses": error}
    write_sim(sim_path, [gpu(0, 430.0, processes=procs, errors=errors), gpu(1, 100.0, processes=procs,
                                                                          errors={"nvmlDeviceGetProcessUtilization": error})])
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml, retry_s=30.0, retry_max_s=120.0)
    tick(src, clock, 1000.0)
    total = 0.0
    for t in range(1001, 1011):
        readings = tick(src, clock, float(t))
        r0, r1 = readings["gpu0"], readings["gpu1"]
        total += r0.energy_j
        assert r1.energy_j == pytest.approx(100.0, abs=MJ_TOL_J)
        assert r0.attributable is False and r0.processes == () and r0.memory_used_bytes is None
        assert [p.sm_util_pct for p in r1.processes] == [None, None] and r1.attributable  # memory share then
        problems = src.problems()
        assert any(p.startswith("gpu0: memory info failed") for p in problems)
        assert any(p.startswith("gpu0: compute process list failed") and error.replace("_", "").lower()
                   in p.lower().replace("_", "") for p in problems)
        assert any(p.startswith("gpu1: process utilisation failed") for p in problems)
    assert total == pytest.approx(430.0 * 10, abs=10 * MJ_TOL_J)  # not one tick of energy lost
    # gpu0's failing queries were made once (at 1000; next try at 1030), gpu1's every tick.
    assert nvml.calls["nvmlDeviceGetMemoryInfo"] == 1 + 11
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses"] == 1 + 11


def test_side_query_backoff_is_exponential_and_recovery_clears_the_problem(sim_path, clock):
    errs = {"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION"}
    write_sim(sim_path, [gpu(0, 100.0, processes=[proc(101)], errors=errs)])
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml, retry_s=30.0, retry_max_s=120.0)
    tried = []
    for t in range(1000, 1400, 5):
        before = nvml.calls.get("nvmlDeviceGetComputeRunningProcesses", 0)
        tick(src, clock, float(t))
        if nvml.calls["nvmlDeviceGetComputeRunningProcesses"] > before:
            tried.append(t)
    assert tried == [1000, 1030, 1090, 1210, 1330]  # +30, +60, +120 (max), +120
    write_sim(sim_path, [gpu(0, 100.0, processes=[proc(101)])])
    r = tick(src, clock, 1450.0)["gpu0"]
    assert [p.pid for p in r.processes] == [101] and r.attributable and src.problems() == []


def test_junk_utilisation_samples_are_discarded_and_never_move_the_window(sim_path, clock):
    """Item 3, realistic driver: padding, a stray PID with smUtil 37100 and, every 5th
    call, a timestamp an hour ahead. The old collector read 0 % for good after that."""
    a, b = 101, 202
    write_sim(sim_path, [gpu(0, 300.0, processes=[proc(a, sm_util=75), proc(b, sm_util=25)])], realistic=True)
    src, nvml = make_source(sim_path, clock)
    wall = src._wall  # the simulator's wall clock
    tick(src, clock, 1000.0)
    for t in range(1001, 1021):
        r = tick(src, clock, float(t))["gpu0"]
        assert {p.pid: p.sm_util_pct for p in r.processes} == {a: 75.0, b: 25.0}, t
        st = next(iter(src._states.values()))
        assert st.util.last_ts_us <= wall() * 1e6 + gpu_mod.FUTURE_TOLERANCE_S * 1e6
    # One garbage entry per call (stray PID, 37100 %), none of the padding: counted.
    assert src.counters()["gpu_util_samples_discarded_total"] >= 20


def test_listed_process_with_garbage_samples_and_memory_only_process(sim_path, clock):
    """nvtop #110's zombie (a listed PID with smUtil 37100) is discarded; a memory-only
    process (no samples) reads 0 %, encoder/decoder % come from encUtil/decUtil."""
    write_sim(sim_path, [gpu(0, 300.0, processes=[
        proc(101, sm_util=5, enc_util=40, dec_util=10),
        proc(102, 1 << 30),  # memory only
        proc(103, sm_util=50, garbage_util=True)])], realistic=True)
    src, _ = make_source(sim_path, clock)
    tick(src, clock, 1000.0)
    r = tick(src, clock, 1001.0)["gpu0"]
    got = {p.pid: (p.sm_util_pct, p.enc_util_pct, p.dec_util_pct) for p in r.processes}
    assert got == {101: (5.0, 40.0, 10.0), 102: (0.0, 0.0, 0.0), 103: (0.0, 0.0, 0.0)}


def test_utilisation_only_when_two_or_more_processes_share_a_gpu(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(101, sm_util=90)]), gpu(1, processes=[])])
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml)
    for t in (1000.0, 1001.0, 1002.0):
        r = tick(src, clock, t)
        assert [p.sm_util_pct for p in r["gpu0"].processes] == [None]  # a sole process: not asked
    assert "nvmlDeviceGetProcessUtilization" not in nvml.calls
    # A second process arrives: asked, and only samples from now on count.
    write_sim(sim_path, [gpu(0, processes=[proc(101, sm_util=60), proc(102, sm_util=20)]), gpu(1, processes=[])])
    r = tick(src, clock, 1003.0)["gpu0"]
    assert {p.pid: p.sm_util_pct for p in r.processes} == {101: 60.0, 102: 20.0}


def test_nvml_calls_per_tick_are_bounded_and_static_facts_cached(sim_path, clock):
    """Item 9: handles, UUIDs, names, MIG mode once; per tick one count, then per GPU
    energy, memory, three process lists and utilisation when shared: <= 6."""
    gpus = [gpu(i, 100.0 + i, processes=[proc(100 + i, sm_util=50), proc(200 + i, sm_util=10)]) for i in range(8)]
    write_sim(sim_path, gpus)
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml)
    tick(src, clock, 1000.0)
    before = dict(nvml.calls)
    n_ticks = 5
    for t in range(1001, 1001 + n_ticks):
        tick(src, clock, float(t))
    per_tick = {k: (v - before.get(k, 0)) / n_ticks for k, v in nvml.calls.items() if v - before.get(k, 0)}
    assert sum(per_tick.values()) <= 1 + 6 * 8, per_tick
    for static in ("nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetMigMode"):
        assert static not in per_tick
    assert per_tick["nvmlDeviceGetCount"] == 1
    assert src.counters()["gpu_nvml_calls_total"] >= sum(nvml.calls.values()) - 1  # its own count agrees


def test_mig_energy_is_split_by_instance_size_and_processes_by_instance(sim_path, clock):
    """Item 4: a 7-slice board with GIs of 3, 2 and 1 slices: 3/7, 2/7, 1/7 of the board's
    energy; the free slice (1/7) stays on the board's own reading, unattributed."""
    instances = [mig_instance(1, "3g.40gb"), mig_instance(5, "2g.20gb"), mig_instance(13, "1g.10gb")]
    procs = [proc(101, 4 << 30, gi_id=1), proc(102, 2 << 30, gi_id=1), proc(103, 1 << 30, gi_id=5)]
    write_sim(sim_path, [gpu(0, 700.0, mig=True, mig_instances=instances, processes=procs)], realistic=True)
    src, _ = make_source(sim_path, clock)
    tick(src, clock, 1000.0)
    rs = tick(src, clock, 1001.0)
    assert set(rs) == {"gpu0", "gpu0-mig1", "gpu0-mig5", "gpu0-mig13"}
    e = {d: r.energy_j for d, r in rs.items()}
    assert sum(e.values()) == pytest.approx(700.0, abs=0.1 * 700)  # one 100 ms step of the counter at most
    board = sum(e.values())
    assert e["gpu0-mig1"] == pytest.approx(board * 3 / 7) and e["gpu0-mig5"] == pytest.approx(board * 2 / 7)
    assert e["gpu0-mig13"] == pytest.approx(board / 7) and e["gpu0"] == pytest.approx(board / 7)
    assert [p.pid for p in rs["gpu0-mig1"].processes] == [101, 102]
    assert [p.pid for p in rs["gpu0-mig5"].processes] == [103] and rs["gpu0-mig13"].processes == ()
    for d in ("gpu0-mig1", "gpu0-mig5", "gpu0-mig13"):
        assert rs[d].parent == "gpu0" and rs[d].attributable and rs[d].source == "counter"
        assert all(p.sm_util_pct is None for p in rs[d].processes)  # NVML: no utilisation on MIG
    assert rs["gpu0"].parent == "" and rs["gpu0"].attributable is False
    assert rs["gpu0-mig1"].memory_total_bytes == 40 * 1024 << 20
    assert src.problems() == []


def test_mig_readings_say_which_share_of_the_board_they_stand_for(sim_path, clock):
    """Issue 16: embodied carbon is booked by board-time, so each reading carries its
    fraction of the physical board: a 3g instance of a 7-slice board 3/7, the board's
    own remainder reading the free slices (7 - 3 - 2 = 2 -> 2/7); a whole board 1."""
    instances = [mig_instance(1, "3g.40gb"), mig_instance(5, "2g.20gb")]
    write_sim(sim_path, [gpu(0, 700.0, mig=True, mig_instances=instances, processes=[proc(101, 1 << 30, gi_id=1)]),
                         gpu(1, 300.0)], realistic=True)
    src, _ = make_source(sim_path, clock)
    tick(src, clock, 1000.0)
    rs = tick(src, clock, 1001.0)
    assert rs["gpu0-mig1"].board_share == pytest.approx(3 / 7)
    assert rs["gpu0-mig5"].board_share == pytest.approx(2 / 7)
    assert rs["gpu0"].board_share == pytest.approx(2 / 7)
    assert rs["gpu1"].board_share == 1.0
    assert sum(r.board_share for d, r in rs.items() if d.startswith("gpu0")) == pytest.approx(1.0)


def test_mig_parent_without_privileges_reads_the_mig_device_lists(sim_path, clock):
    instances = [mig_instance(1, "3g.40gb"), mig_instance(2, "4g.40gb", slices=4)]
    procs = [proc(101, 4 << 30, gi_id=1), proc(102, 2 << 30, gi_id=2)]
    errors = {"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION"}
    write_sim(sim_path, [gpu(0, 700.0, mig=True, mig_instances=instances, processes=procs, errors=errors)])
    src, _ = make_source(sim_path, clock)
    tick(src, clock, 1000.0)
    rs = tick(src, clock, 1001.0)
    assert [p.pid for p in rs["gpu0-mig1"].processes] == [101] and rs["gpu0-mig1"].attributable
    assert [p.pid for p in rs["gpu0-mig2"].processes] == [102]
    assert rs["gpu0-mig2"].energy_j == pytest.approx(400.0, abs=MJ_TOL_J)
    assert src.problems() == []  # complete data: a fact, not a fault
    assert any("MIG parent's process lists failed" in n for n in src.notes())


def test_mig_without_any_process_list_books_energy_unattributed_and_says_so(sim_path, clock):
    instances = [mig_instance(1, "7g.80gb")]
    errors = {"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION"}
    write_sim(sim_path, [gpu(0, 430.0, mig=True, mig_instances=instances, processes=[proc(101, gi_id=1)],
                             errors=errors, mig_errors=errors)])
    src, _ = make_source(sim_path, clock)
    tick(src, clock, 1000.0)
    rs = tick(src, clock, 1001.0)
    assert rs["gpu0-mig1"].energy_j == pytest.approx(430.0, abs=MJ_TOL_J)
    assert rs["gpu0-mig1"].attributable is False and rs["gpu0-mig1"].processes == ()
    [problem] = src.problems()
    assert "NoPermission" in problem and "unattributed" in problem and "gpu0" in problem


def test_host_pids_seen_from_another_pid_namespace_are_invisible_and_degrade(sim_path, clock, live_pid):
    """Item 5: NVML reports host PIDs; a daemon in its own PID namespace must not match
    them (the number could belong to an unrelated process here)."""
    write_sim(sim_path, [gpu(0, processes=[proc(live_pid, sm_util=50), proc(os.getpid(), sm_util=50)])],
              pid_namespace="host")
    src, _ = make_source(sim_path, clock, pid_exists=gpu_mod.proc_pid_exists, pid_namespace_initial=False)
    r = tick(src, clock, 1000.0)["gpu0"]
    assert [p.visible for p in r.processes] == [False, False]
    assert src.problems() == ["daemon is not in the host PID namespace: GPU processes cannot be matched; "
                              "run with --pid=host"]
    assert src.counters()["gpu_processes_not_visible"] == 2
    # Same namespace as NVML (host daemon), or a simulator that reports our own PIDs: fine.
    for kwargs, ns in (({"pid_namespace_initial": True}, "host"), ({"pid_namespace_initial": False}, "daemon")):
        write_sim(sim_path, [gpu(0, processes=[proc(live_pid, sm_util=50)])], pid_namespace=ns)
        src, _ = make_source(sim_path, clock, pid_exists=gpu_mod.proc_pid_exists, **kwargs)
        assert [p.visible for p in tick(src, clock, 1000.0)["gpu0"].processes] == [True]
        assert src.problems() == []


def test_pid_namespace_detection_reads_the_inode(tmp_path):
    assert gpu_mod.pid_namespace_is_initial(str(tmp_path / "missing")) is None
    here = os.stat("/proc/self/ns/pid").st_ino
    assert gpu_mod.pid_namespace_is_initial() is (here == 0xEFFFFFFC)


def test_driver_loaded_after_start_is_found_quietly(sim_path, clock):
    """Item 6: no driver at start: disabled (not degraded), nvmlInit retried with backoff."""
    write_sim(sim_path, [gpu(0, 100.0)], driver_loaded=False)
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml, init_retry_s=5.0, quiet_without_driver=True)
    inits = []
    for t in range(1000, 1030):
        before = nvml.calls.get("nvmlInit", 0)
        with pytest.raises(SourceDisabled) as err:
            tick(src, clock, float(t))
        assert "no NVIDIA driver" in err.value.detail and "DriverNotLoaded" in err.value.detail
        if nvml.calls.get("nvmlInit", 0) > before:
            inits.append(t)
    assert inits == [1000, 1005, 1015]  # 5, 10, 20 s
    write_sim(sim_path, [gpu(0, 100.0)], driver_loaded=True)
    with pytest.raises(SourceDisabled):
        tick(src, clock, 1034.0)  # not due yet
    assert tick(src, clock, 1035.0)["gpu0"].energy_j == 0.0  # baseline
    assert tick(src, clock, 1036.0)["gpu0"].energy_j == pytest.approx(100.0, abs=MJ_TOL_J)
    assert src.problems() == []


def test_gpu_added_after_start_appears_at_the_periodic_reinit(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0)], realistic=True)
    src, nvml = make_source(sim_path, clock, reinit_interval_s=60.0)
    total = 0.0
    for t in range(1000, 1030):
        total += tick(src, clock, float(t))["gpu0"].energy_j
    write_sim(sim_path, [gpu(0, 100.0), gpu(1, 50.0)], realistic=True)
    for t in range(1030, 1060):
        rs = tick(src, clock, float(t))
        assert set(rs) == {"gpu0"}  # the count is fixed until the re-init
        total += rs["gpu0"].energy_j
    rs = tick(src, clock, 1060.0)  # re-init at the end of this read
    total += rs["gpu0"].energy_j
    rs = tick(src, clock, 1061.0)
    assert set(rs) == {"gpu0", "gpu1"} and rs["gpu1"].energy_j == 0.0
    total += rs["gpu0"].energy_j
    assert tick(src, clock, 1062.0)["gpu1"].energy_j == pytest.approx(50.0, abs=0.1 * 50)
    # gpu0's baseline survived the re-init: nothing lost or double counted (100 ms steps).
    assert total == pytest.approx(100.0 * 61, abs=0.1 * 100)
    assert src.counters()["gpu_nvml_reinits_total"] == 1


def test_driver_gpu_list_change_triggers_a_reinit(sim_path, clock, tmp_path):
    gpus_dir = tmp_path / "gpus"
    (gpus_dir / "0000:01:00.0").mkdir(parents=True)
    write_sim(sim_path, [gpu(0, 100.0)], realistic=True)
    src, _ = make_source(sim_path, clock, reinit_interval_s=0.0, driver_gpus_dir=str(gpus_dir))
    tick(src, clock, 1000.0)
    write_sim(sim_path, [gpu(0, 100.0), gpu(1, 50.0)], realistic=True)
    assert set(tick(src, clock, 1001.0)) == {"gpu0"}
    (gpus_dir / "0000:02:00.0").mkdir()  # the driver bound a new GPU
    assert set(tick(src, clock, 1002.0)) == {"gpu0"}  # re-init at the end of this read
    assert set(tick(src, clock, 1003.0)) == {"gpu0", "gpu1"}


def test_power_only_board_sampled_faster_than_the_tick(sim_path, clock):
    """Item 7: 100/300 W alternating every 0.5 s, no energy counter. Power read once per
    tick (1 Hz) aliases to 100 or 300 W (-50 %/+50 %); sampled at 10 Hz and integrated
    it is 200 W within 5 %."""
    pattern = [[100, 0.5], [300, 0.5]]
    write_sim(sim_path, [gpu(0, power_pattern=pattern, architecture="pascal", energy_counter=False)])
    src, _ = make_source(sim_path, clock, power_sample_hz=10.0)
    once, _ = make_source(sim_path, clock)  # no sampler: one sample per tick
    t = 1000.0
    for s in (src, once):
        tick(s, clock, t)
    total = {"sampled": 0.0, "once": 0.0}
    for second in range(1, 21):
        for k in range(1, 10):
            clock.t = t + second - 1 + k / 10
            src.sample_power()  # what the sampler thread does at 10 Hz
        total["sampled"] += tick(src, clock, t + second)["gpu0"].energy_j
        total["once"] += tick(once, clock, t + second)["gpu0"].energy_j
    truth = 200.0 * 20
    assert total["sampled"] == pytest.approx(truth, rel=0.05)
    assert abs(total["once"] - truth) / truth > 0.4  # the aliasing the sampler removes
    assert src.counters()["gpu_power_samples_total"] >= 20 * 10


def test_power_sampler_thread_runs_only_for_boards_without_a_counter(sim_path):
    write_sim(sim_path, [gpu(0, 100.0)])
    src = NvmlGpuSource(SimulatedNvml(str(sim_path)), power_sample_hz=20.0, pid_namespace_initial=True,
                        driver_gpus_dir=None)
    try:
        src.read(time.monotonic())
        assert src._sampler is None
        write_sim(sim_path, [gpu(0, 100.0, energy_counter=False)])
        src.read(time.monotonic())
        assert src._sampler is not None and src._sampler.is_alive()
        time.sleep(0.5)
        assert src.counters()["gpu_power_samples_total"] >= 4
    finally:
        src.close()
    assert not src._sampler.is_alive()


def test_mig_instance_created_after_start_is_picked_up_by_a_layout_refresh(sim_path, clock):
    write_sim(sim_path, [gpu(0, 700.0, mig=True, mig_instances=[mig_instance(1, "3g.40gb")],
                             processes=[proc(101, gi_id=1)])], realistic=True)
    src, _ = make_source(sim_path, clock, reinit_interval_s=0.0)
    tick(src, clock, 1000.0)
    write_sim(sim_path, [gpu(0, 700.0, mig=True, mig_instances=[mig_instance(1, "3g.40gb"), mig_instance(2, "4g.40gb")],
                             processes=[proc(101, gi_id=1), proc(102, gi_id=2)])], realistic=True)
    rs = tick(src, clock, 1010.0)  # unknown instance: its process stays on the board (unattributed)
    assert "gpu0-mig2" not in rs and [p.pid for p in rs["gpu0"].processes] == [102]
    tick(src, clock, 1031.0)  # refreshed at most every 30 s: now
    rs = tick(src, clock, 1032.0)
    assert [p.pid for p in rs["gpu0-mig2"].processes] == [102]
    assert rs["gpu0-mig2"].energy_j == pytest.approx(sum(r.energy_j for r in rs.values()) * 4 / 7)
    assert rs["gpu0"].energy_j == pytest.approx(0.0, abs=1e-9)


def test_gpu_lost_after_its_energy_was_read_books_that_energy(sim_path, clock):
    write_sim(sim_path, [gpu(0, 200.0, processes=[proc(101)]), gpu(1, 100.0)])
    src, _ = make_source(sim_path, clock, lost_retry_s=5.0)
    tick(src, clock, 1000.0)
    write_sim(sim_path, [gpu(0, 200.0, processes=[proc(101)], errors={"nvmlDeviceGetMemoryInfo": "GPU_IS_LOST"}),
                         gpu(1, 100.0)])
    rs = tick(src, clock, 1001.0)
    assert rs["gpu0"].energy_j == pytest.approx(200.0, abs=MJ_TOL_J) and rs["gpu0"].attributable is False
    assert any(p.startswith("gpu0: skipped from now on") for p in src.problems())
    assert set(tick(src, clock, 1002.0)) == {"gpu1"}  # isolated until a probe finds it back
