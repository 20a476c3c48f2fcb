"""The NVML collector (daemon/sources/gpu.py) against the simulated NVML
(daemon/sources/nvml_sim.py), driven by a fake clock, with real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pynvml
import pytest

from wattprint.daemon.config import GpuConfig
from wattprint.daemon.model import DeviceReading
from wattprint.daemon.sources import gpu as gpu_mod
from wattprint.daemon.sources.base import SourceError
from wattprint.daemon.sources.gpu import NvmlGpuSource, open_gpu_source
from wattprint.daemon.sources.nvml_sim import SimFileError, SimulatedNvml

try:
    from gpusim import gpu, proc, write_raw, write_sim
except ImportError:  # pragma: no cover - tests/ not on sys.path (e.g. importlib mode)
    sys.path.insert(0, str(Path(__file__).parent))
    from gpusim import gpu, proc, write_raw, write_sim

MJ_TOL_J = 0.002  # the counter is integer millijoules: at most 1 mJ off per end


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


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


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim_path(tmp_path: Path) -> Path:
    return tmp_path / "gpus.json"


def make_source(sim_path: Path, clock: FakeClock, nvml_cls=SimulatedNvml, pid_exists=lambda pid: True):
    nvml = nvml_cls(str(sim_path), clock=clock)
    return NvmlGpuSource(nvml, pid_exists=pid_exists, init_retry_s=0.0), nvml


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
    assert r2.power_w == pytest.approx(300.0)  # the sample
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


def test_lost_gpu_is_skipped_and_named_while_the_other_is_read(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0), gpu(1, 300.0)])
    src, nvml = make_source(sim_path, clock)
    tick(src, clock, 1000.0)

    write_sim(sim_path, [gpu(0, 100.0), gpu(1, 300.0, lost=True)])
    readings = tick(src, clock, 1001.0)
    assert set(readings) == {"gpu0"}
    assert readings["gpu0"].energy_j == pytest.approx(100.0, abs=MJ_TOL_J)
    [problem] = src.problems()
    assert problem.startswith("gpu1:") and "GpuIsLost" in problem and "GPU is lost" in problem

    # Back after one tick: its baseline was kept, so the two seconds are both booked.
    write_sim(sim_path, [gpu(0, 100.0), gpu(1, 300.0)])
    readings = tick(src, clock, 1002.0)
    assert set(readings) == {"gpu0", "gpu1"}
    assert readings["gpu1"].energy_j == pytest.approx(600.0, abs=MJ_TOL_J)
    assert readings["gpu1"].interval_s == pytest.approx(2.0)
    assert src.problems() == []


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


def test_gpu_replaced_at_an_index_gets_a_new_baseline(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0)])
    src, _ = make_source(sim_path, clock)
    tick(src, clock, 1000.0)
    write_sim(sim_path, [gpu(7, 100.0, name="NVIDIA A100-SXM4-40GB")])  # other uuid
    r = tick(src, clock, 1001.0)["gpu0"]
    assert r.energy_j == 0.0 and r.name == "NVIDIA A100-SXM4-40GB"


# --- processes ----------------------------------------------------------------------------


@pytest.fixture
def live_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


@pytest.fixture
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its /proc entry is gone
    assert not os.path.exists(f"/proc/{child.pid}")
    return child.pid


def test_processes_are_filtered_against_real_proc_and_deduplicated(sim_path, clock, live_pid, dead_pid):
    me = os.getpid()
    write_sim(sim_path, [gpu(0, processes=[
        proc(live_pid, 2 << 30, type="compute+graphics"),  # in both lists: once
        proc(me, None, type="graphics"),  # memory not available -> None
        proc(dead_pid, 1 << 30),
        proc(0, 1 << 30),
        proc(0xFFFFFFFF, 1 << 30),
    ])])
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    src = NvmlGpuSource(nvml, init_retry_s=0.0)  # default pid_exists: /proc
    r = tick(src, clock, 1000.0)["gpu0"]
    by_pid = {p.pid: p for p in r.processes}
    assert set(by_pid) == {live_pid, me}
    assert by_pid[live_pid].used_memory_bytes == 2 << 30
    assert by_pid[me].used_memory_bytes is None
    assert r.memory_used_bytes == (2 << 30) + 3 * (1 << 30)  # NVML's own figure, unfiltered
    assert r.memory_total_bytes == 80 * (1 << 30)


def test_injected_pid_exists_is_used(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(111), proc(222)])])
    src, _ = make_source(sim_path, clock, pid_exists=lambda pid: pid == 222)
    assert [p.pid for p in tick(src, clock, 1000.0)["gpu0"].processes] == [222]


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
    write_sim(sim_path, [gpu(0, processes=[proc(101, sm_util=80)], util_supported=False)])
    src, nvml = make_source(sim_path, clock, nvml_cls=CountingNvml)
    for t in (1000.0, 1001.0, 1002.0):
        r = tick(src, clock, t)["gpu0"]
        assert [p.sm_util_pct for p in r.processes] == [None]
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


def test_open_auto_without_a_gpu_returns_none_and_a_reason():
    src, message = open_gpu_source(GpuConfig(backend="auto"))
    if src is not None:  # pragma: no cover - only on a machine with a GPU
        src.close()
        pytest.skip("this machine has NVML")
    assert message.startswith("no NVML (") and "GPU energy not measured" in message


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
    with pytest.raises(SourceError):
        src.read(110.0)  # within 30 s: not retried
    assert len(calls) == 1
    with pytest.raises(SourceError):
        src.read(131.0)
    assert len(calls) == 2
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

    write_sim(sim_path, [gpu(0, 150.0, processes=[proc(live_pid, 1 << 20, sm_util=70), proc(0, None)]),
                         gpu(1, 50.0, energy_counter=False)])
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
    assert doc["devices"][0]["static"]["nvmlDeviceGetArchitecture"]["error"] == "NVMLError_Uninitialized"
    assert len(doc["ticks"]) == 3
    g0, g1 = doc["ticks"][0]["gpus"]
    assert isinstance(g0["calls"]["nvmlDeviceGetTotalEnergyConsumption"]["result"], int)
    assert g0["calls"]["nvmlDeviceGetPowerUsage"]["result"] == 150_000
    assert g0["calls"]["nvmlDeviceGetMemoryInfo"]["result"]["total"] == 80 * (1 << 30)
    procs = g0["calls"]["nvmlDeviceGetComputeRunningProcesses"]["result"]
    assert {p["pid"]: p["usedGpuMemory"] for p in procs} == {live_pid: 1 << 20, 0: None}
    samples = g0["calls"]["nvmlDeviceGetProcessUtilization"]["result"]
    assert samples and {(s["pid"], s["smUtil"]) for s in samples} == {(live_pid, 70)}
    assert g0["proc_exists"] == {"0": False, str(live_pid): True}
    second = doc["ticks"][1]["gpus"][0]["calls"]["nvmlDeviceGetProcessUtilization"]
    assert second["args"] == [{"lastSeenTimeStamp": max(s["timeStamp"] for s in samples)}]
    err = g1["calls"]["nvmlDeviceGetTotalEnergyConsumption"]
    assert (err["error"], err["code"], err["message"]) == ("NVMLError_NotSupported", pynvml.NVML_ERROR_NOT_SUPPORTED, "Not Supported")
