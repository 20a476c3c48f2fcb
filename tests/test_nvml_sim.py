"""The simulated NVML (daemon/sources/nvml_sim.py) against what real boards and pynvml do.

Sources, cited per test:
- the real nvidia-smi captures in tests/fixtures/nvml/ (PROVENANCE.md there), read with
  tests/nvml_captures.py; comments give the capture file and its lines;
- the real ``pynvml`` module (nvidia-ml-py) installed in the venv: where possible a test
  runs pynvml's own function over a fake driver entry point that answers with the same
  data, and checks the simulator returns / raises exactly the same;
- nvml.h (field 185: "supported on Ampere (except GA100) or newer"; 186: "all
  architectures"), nvtop #110 (Count=100, smUtil 37100, pid-0 padding), go-nvml #11 /
  #51 (the size query says 100; one sample per PID), nvitop #75 / #181 (scrambled PIDs;
  FunctionNotFound for _v3 on older drivers).

Where the simulator deliberately differs from a capture, the test says why.
"""

from __future__ import annotations

import ctypes
import inspect
import sys
import time
from pathlib import Path

import pynvml
import pytest

from wattprint.daemon.sources import nvml_sim
from wattprint.daemon.sources.nvml_sim import SimFileError, SimMigHandle, SimulatedNvml

try:
    import nvml_captures as cap
    from gpusim import FakeClock, gpu, mig_instance, proc, write_sim
except ImportError:  # pragma: no cover - tests/ not on sys.path (e.g. importlib mode)
    sys.path.insert(0, str(Path(__file__).parent))
    import nvml_captures as cap
    from gpusim import FakeClock, gpu, mig_instance, proc, write_sim

MIB = 1 << 20


def started(sim_path: Path, clock: FakeClock) -> SimulatedNvml:
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    nvml.nvmlInit()
    return nvml


def at(nvml: SimulatedNvml, clock: FakeClock, t: float) -> None:
    """Move the clock and let the simulator re-read its file (as a collector tick does)."""
    clock.t = t
    nvml.nvmlDeviceGetCount()


# --- real pynvml over a fake driver entry point --------------------------------------------


class FakeDriver:
    """Stands in for libnvidia-ml's C entry points under the real pynvml wrappers:
    ``pynvml._nvmlGetFunctionPointer(name)`` returns ``symbols[name]`` or raises
    FUNCTION_NOT_FOUND, exactly where pynvml would."""

    def __init__(self, monkeypatch, symbols: dict):
        self.symbols = symbols
        monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer", self._lookup)

    def _lookup(self, name):
        if name not in self.symbols:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return self.symbols[name]


def fake_process_list_symbol(entries: list[tuple[int, int, int, int]]):
    """A C ``nvmlDeviceGet*RunningProcesses_v3``: the size query answers
    INSUFFICIENT_SIZE with the count, the second call fills the array."""

    def fn(handle, count_ref, array):
        count = count_ref._obj
        if array is None:
            if not entries:
                return pynvml.NVML_SUCCESS
            count.value = len(entries)
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
        for i, (pid, mem, gi, ci) in enumerate(entries):
            array[i].pid, array[i].usedGpuMemory = pid, mem
            array[i].gpuInstanceId, array[i].computeInstanceId = gi, ci
        count.value = len(entries)
        return pynvml.NVML_SUCCESS

    return fn


def fake_utilisation_symbol(samples: list[tuple[int, int, int, int, int, int]], reported: int):
    """A C ``nvmlDeviceGetProcessUtilization`` as nvtop #110 / go-nvml #11 show it: the
    size query says ``reported`` (100); the second call writes the samples and zeroed
    padding up to that count."""

    def fn(handle, array, count_ref, last_seen):
        count = count_ref._obj
        if array is None:
            count.value = reported
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
        for i, (pid, ts, sm, mem, enc, dec) in enumerate(samples):
            a = array[i]
            a.pid, a.timeStamp, a.smUtil, a.memUtil, a.encUtil, a.decUtil = pid, ts, sm, mem, enc, dec
        count.value = reported
        return pynvml.NVML_SUCCESS

    return fn


def as_tuple(obj, fields) -> tuple:
    return tuple(getattr(obj, f) for f in fields)


PROC_FIELDS = ("pid", "usedGpuMemory", "gpuInstanceId", "computeInstanceId")
SAMPLE_FIELDS = ("pid", "timeStamp", "smUtil", "memUtil", "encUtil", "decUtil")


# --- names, signatures, symbols ---------------------------------------------------------------

# pynvml's unversioned wrappers call these C symbols (pynvml.py: nvmlDeviceGetCount ->
# "nvmlDeviceGetCount_v2", nvmlDeviceGetComputeRunningProcesses -> ..._v3, ...).
_C_SYMBOL = {
    "nvmlDeviceGetCount": "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex": "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetComputeRunningProcesses": "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses": "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlDeviceGetMPSComputeRunningProcesses": "nvmlDeviceGetMPSComputeRunningProcesses_v3",
    "nvmlDeviceGetAttributes": "nvmlDeviceGetAttributes_v2",
    "nvmlInit": "nvmlInitWithFlags",
}


def sim_functions() -> list[str]:
    return sorted(n for n in dir(SimulatedNvml) if n.startswith("nvml"))


def test_every_simulated_function_is_pynvml_with_the_same_signature():
    for name in sim_functions():
        real = getattr(pynvml, name)  # AttributeError: the simulator invented a name
        real_params = list(inspect.signature(real).parameters)
        sim_params = list(inspect.signature(getattr(SimulatedNvml, name)).parameters)[1:]
        assert sim_params == real_params, name


def test_every_simulated_device_function_is_exported_by_a_real_driver():
    # capture linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt lines 2170-2578: the
    # nvml* symbols of driver 590.48.01's libnvidia-ml.so.
    exported = cap.symbols(cap.H100)
    assert len(exported) > 300
    for name in sim_functions():
        if name.startswith("nvmlDevice"):
            assert _C_SYMBOL.get(name, name) in exported, name


# --- driver not loaded, init, errors ------------------------------------------------------------


def test_driver_not_loaded_then_loaded_later(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0)], driver_loaded=False)
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded) as err:
        nvml.nvmlInit()
    assert err.value.value == pynvml.NVML_ERROR_DRIVER_NOT_LOADED and str(err.value) == "Driver Not Loaded"
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()  # nothing was initialised

    clock.t = 1010.0
    write_sim(sim_path, [gpu(0, 100.0)])  # the driver is loaded now
    nvml.nvmlInit()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    clock.t = 1012.0
    # The counter counts from the load (1010), not from the failed init (1000).
    assert nvml.nvmlDeviceGetTotalEnergyConsumption(h) == 200_000

    # The module cannot be unloaded under an open session: a nested init still works.
    write_sim(sim_path, [gpu(0, 100.0)], driver_loaded=False)
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetPowerUsage(h) == 100_000


def test_the_file_is_parsed_again_whenever_its_bytes_change_in_place_or_replaced(sim_path, clock, monkeypatch):
    """The simulator re-reads the file on every reload and parses it only when its
    bytes changed: a rewrite in place with the same size (and, on a coarse clock, the
    same mtime) is seen, a replace is seen, the same bytes are not parsed again, and a
    malformed file raises and leaves the old GPUs as they were."""
    parses = []
    real_parse = nvml_sim.parse_sim_doc
    monkeypatch.setattr(nvml_sim, "parse_sim_doc", lambda *a, **k: parses.append(1) or real_parse(*a, **k))
    write_sim(sim_path, [gpu(0, 300.0)])
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    nvml.nvmlInit()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    for _ in range(3):
        assert nvml.nvmlDeviceGetCount() == 1
    assert len(parses) == 1 and nvml.reloads == 4  # read four times, parsed once
    text = sim_path.read_text()
    with open(sim_path, "r+") as fh:  # in place: same inode, same size
        fh.write(text.replace("300.0", "400.0"))
    assert sim_path.read_text() != text and len(sim_path.read_text()) == len(text)
    nvml.nvmlDeviceGetCount()
    assert nvml.nvmlDeviceGetPowerUsage(h) == 400_000 and len(parses) == 2
    write_sim(sim_path, [gpu(0, 500.0)])  # replaced
    nvml.nvmlDeviceGetCount()
    assert nvml.nvmlDeviceGetPowerUsage(h) == 500_000 and len(parses) == 3
    sim_path.write_text("{not json")
    with pytest.raises(SimFileError):
        nvml.nvmlDeviceGetCount()
    assert nvml.nvmlDeviceGetPowerUsage(h) == 500_000  # the old state stays
    write_sim(sim_path, [gpu(0, 500.0)])  # good again (the bytes parsed before the bad file)
    nvml.nvmlDeviceGetCount()
    assert nvml.nvmlDeviceGetPowerUsage(h) == 500_000


def test_only_the_gpus_whose_objects_changed_are_parsed_again(sim_path, clock, monkeypatch):
    """A job starting changes one GPU's process list: that GPU is parsed again, the
    others are kept (immutable specs); what every GPU reports follows the file."""
    parsed = []
    real = nvml_sim._parse_gpu
    monkeypatch.setattr(nvml_sim, "_parse_gpu", lambda where, index, raw: parsed.append(where) or real(where, index, raw))
    gpus = [gpu(i, 100.0 * (i + 1)) for i in range(3)]
    write_sim(sim_path, gpus)
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    nvml.nvmlInit()
    assert parsed == ["gpus[0]", "gpus[1]", "gpus[2]"]
    gpus[1] = gpu(1, 200.0, processes=[proc(4242)])
    write_sim(sim_path, gpus)
    parsed.clear()
    assert nvml.nvmlDeviceGetCount() == 3
    assert parsed == ["gpus[1]"]
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(3)]
    assert [nvml.nvmlDeviceGetPowerUsage(h) for h in handles] == [100_000, 200_000, 300_000]
    assert [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(handles[1])] == [4242]
    assert nvml.nvmlDeviceGetComputeRunningProcesses(handles[0]) == []
    # A GPU inserted in front shifts the others: every one after it is parsed again
    # (its position, and so its index and messages, changed).
    write_sim(sim_path, [gpu(9, 50.0), *gpus])
    parsed.clear()
    assert nvml.nvmlDeviceGetCount() == 4
    assert parsed == ["gpus[0]", "gpus[1]", "gpus[2]", "gpus[3]"]


@pytest.mark.parametrize("name, cls", [
    ("NO_PERMISSION", pynvml.NVMLError_NoPermission),
    ("UNKNOWN", pynvml.NVMLError_Unknown),
    ("TIMEOUT", pynvml.NVMLError_Timeout),
    ("NOT_SUPPORTED", pynvml.NVMLError_NotSupported),
    ("GPU_IS_LOST", pynvml.NVMLError_GpuIsLost),
    ("NOT_FOUND", pynvml.NVMLError_NotFound),
    ("FUNCTION_NOT_FOUND", pynvml.NVMLError_FunctionNotFound),
    ("INSUFFICIENT_SIZE", pynvml.NVMLError_InsufficientSize),
])
def test_errors_raise_the_same_exception_as_pynvml(sim_path, clock, monkeypatch, name, cls):
    write_sim(sim_path, [gpu(0, 100.0, errors={"nvmlDeviceGetPowerUsage": name})])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(cls) as sim_err:
        nvml.nvmlDeviceGetPowerUsage(h)
    # Real pynvml over a driver entry point returning that code.
    code = nvml_sim.ERROR_CODES[name]
    FakeDriver(monkeypatch, {"nvmlDeviceGetPowerUsage": lambda handle, ref: code})
    with pytest.raises(cls) as real_err:
        pynvml.nvmlDeviceGetPowerUsage(None)
    assert type(sim_err.value) is type(real_err.value)
    assert sim_err.value.value == real_err.value.value == code
    assert str(sim_err.value) == str(real_err.value)
    # Other functions and other GPUs are unaffected.
    assert nvml.nvmlDeviceGetName(h) == "NVIDIA H100 80GB HBM3"


def test_function_not_found_on_a_process_list_is_what_pynvml_raises(sim_path, clock, monkeypatch):
    """A driver older than pynvml lacks the _v3 symbol (nvitop #181): pynvml's
    unversioned wrapper raises NVMLLibraryMismatchError, the _v3 one FunctionNotFound,
    and _v2 still works."""
    write_sim(sim_path, [gpu(0, processes=[proc(42, 5 * MIB)],
                             errors={"nvmlDeviceGetComputeRunningProcesses": "FUNCTION_NOT_FOUND"})])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    FakeDriver(monkeypatch, {"nvmlDeviceGetComputeRunningProcesses_v2":
                             fake_process_list_symbol([(42, 5 * MIB, 0xFFFFFFFF, 0xFFFFFFFF)])})
    with pytest.raises(pynvml.NVMLLibraryMismatchError) as real_err:
        pynvml.nvmlDeviceGetComputeRunningProcesses(None)
    with pytest.raises(pynvml.NVMLLibraryMismatchError) as sim_err:
        nvml.nvmlDeviceGetComputeRunningProcesses(h)
    assert str(sim_err.value) == str(real_err.value)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        nvml.nvmlDeviceGetComputeRunningProcesses_v3(h)
    real = [as_tuple(p, PROC_FIELDS) for p in pynvml.nvmlDeviceGetComputeRunningProcesses_v2(None)]
    sim = [as_tuple(p, PROC_FIELDS) for p in nvml.nvmlDeviceGetComputeRunningProcesses_v2(h)]
    assert sim == real == [(42, 5 * MIB, 0xFFFFFFFF, 0xFFFFFFFF)]


def test_other_errors_on_a_process_list_apply_to_every_version(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(42)],
                             errors={"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION",
                                     "nvmlDeviceGetGraphicsRunningProcesses_v2": "TIMEOUT"})])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    for fn in ("", "_v2", "_v3"):
        with pytest.raises(pynvml.NVMLError_NoPermission):
            getattr(nvml, f"nvmlDeviceGetComputeRunningProcesses{fn}")(h)
    with pytest.raises(pynvml.NVMLError_Timeout):
        nvml.nvmlDeviceGetGraphicsRunningProcesses_v2(h)
    assert nvml.nvmlDeviceGetGraphicsRunningProcesses(h) == []  # only _v2 was named


def test_error_names_and_values_are_checked(sim_path, clock):
    for bad, needle in (({"nvmlDeviceGetPowerUsagee": "UNKNOWN"}, "nvmlDeviceGetPowerUsagee"),
                        ({"nvmlDeviceGetPowerUsage": "BROKEN"}, "BROKEN")):
        write_sim(sim_path, [gpu(0, errors=bad)])
        with pytest.raises(SimFileError) as err:
            started(sim_path, clock)
        assert needle in str(err.value) and "errors" in str(err.value)


def test_field_values_are_pynvml_structs_with_a_return_per_field(sim_path, clock, monkeypatch):
    write_sim(sim_path, [gpu(0, 250.0, field_errors={"186": "NO_PERMISSION"})])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    clock.t = 1004.0
    ids = [pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, pynvml.NVML_FI_DEV_POWER_AVERAGE,
           (pynvml.NVML_FI_DEV_POWER_INSTANT, 0), 999_999]
    values = nvml.nvmlDeviceGetFieldValues(h, ids)
    # Same type as pynvml.nvmlDeviceGetFieldValues returns (an array of c_nvmlFieldValue_t).
    FakeDriver(monkeypatch, {"nvmlDeviceGetFieldValues": lambda handle, n, ref: pynvml.NVML_SUCCESS})
    real = pynvml.nvmlDeviceGetFieldValues(None, ids)
    assert type(values)._type_ is type(real)._type_ is pynvml.c_nvmlFieldValue_t and len(values) == len(real) == 4
    energy, average, instant, unknown = values
    assert (energy.nvmlReturn, energy.valueType, energy.value.ullVal) == (
        pynvml.NVML_SUCCESS, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, 1_000_000)  # 250 W x 4 s in mJ
    assert (average.nvmlReturn, average.value.uiVal) == (pynvml.NVML_SUCCESS, 250_000)
    assert (instant.fieldId, instant.scopeId, instant.nvmlReturn) == (186, 0, pynvml.NVML_ERROR_NO_PERMISSION)
    assert (unknown.fieldId, unknown.nvmlReturn) == (999_999, pynvml.NVML_ERROR_NOT_SUPPORTED)
    assert abs(energy.timestamp - time.time() * 1e6) < 60e6  # µs since the epoch


# --- process lists --------------------------------------------------------------------------------


def test_process_lists_are_converted_exactly_as_pynvml_converts_them(sim_path, clock, monkeypatch):
    entries = [(101, 7 * MIB, 0xFFFFFFFF, 0xFFFFFFFF), (102, pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value,
                                                        0xFFFFFFFF, 0xFFFFFFFF)]
    write_sim(sim_path, [gpu(0, processes=[proc(101, 7 * MIB), proc(102, None)])])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    FakeDriver(monkeypatch, {"nvmlDeviceGetComputeRunningProcesses_v3": fake_process_list_symbol(entries)})
    real = pynvml.nvmlDeviceGetComputeRunningProcesses(None)
    sim = nvml.nvmlDeviceGetComputeRunningProcesses(h)
    assert [type(p) for p in sim] == [type(p) for p in real] == [pynvml.nvmlFriendlyObject] * 2
    assert [vars(p) for p in sim] == [vars(p) for p in real]
    assert sim[1].usedGpuMemory is None  # "not available" -> None, as pynvml does


def test_rtx4080_capture_compute_list_holds_compute_and_c_plus_g(sim_path, clock):
    # capture ...rtx-4080-super__595.71.05.txt: -q Processes lines 2062-2110 list 2165
    # (C+G), four G and two C (ffmpeg); --query-compute-apps lines 2122-2125 lists 2165,
    # 5022, 5021: compute and C+G processes, no graphics-only ones.
    procs = cap.query_processes(cap.RTX4080)
    write_sim(sim_path, [cap.sim_gpu_from_capture(cap.RTX4080)])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    compute = {p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)}
    graphics = {p.pid for p in nvml.nvmlDeviceGetGraphicsRunningProcesses(h)}
    assert compute == {p["pid"] for p in procs if "C" in p["type"]} == {2165, 5021, 5022}
    assert graphics == {p["pid"] for p in procs if "G" in p["type"]}
    mem = {p.pid: p.usedGpuMemory for p in nvml.nvmlDeviceGetGraphicsRunningProcesses(h)}
    assert mem[2496] == 200 * MIB  # line 2074: Used GPU Memory 200 MiB
    assert [p.gpuInstanceId for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)] == [0xFFFFFFFF] * 3  # "N/A"


def test_mps_clients_are_listed_only_by_the_mps_function(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(500, 300 * MIB),  # the MPS server: a compute process
                                           proc(501, 100 * MIB, type="mps"), proc(502, None, type="mps")])])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)] == [500]
    assert [p.pid for p in nvml.nvmlDeviceGetGraphicsRunningProcesses(h)] == []
    mps = nvml.nvmlDeviceGetMPSComputeRunningProcesses(h)
    assert [(p.pid, p.usedGpuMemory) for p in mps] == [(501, 100 * MIB), (502, None)]
    assert [p.pid for p in nvml.nvmlDeviceGetMPSComputeRunningProcesses_v2(h)] == [501, 502]


# --- utilisation: idealised vs realistic ------------------------------------------------------------


def test_idealised_mode_keeps_every_sample_and_enc_dec(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(7, sm_util=10, enc_util=30, dec_util=5)])])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    write_sim(sim_path, [gpu(0, processes=[proc(7, sm_util=20, enc_util=40)])])
    at(nvml, clock, 1000.5)
    samples = nvml.nvmlDeviceGetProcessUtilization(h, 0)
    assert [(s.smUtil, s.encUtil, s.decUtil) for s in samples] == [(10, 30, 5), (20, 40, 0)]
    assert all(isinstance(s, pynvml.c_nvmlProcessUtilizationSample_t) for s in samples)


def test_realistic_utilisation_is_latest_only_with_padding_and_garbage(sim_path, clock, monkeypatch):
    def write(sm):
        write_sim(sim_path, [gpu(0, processes=[proc(7, sm_util=sm, enc_util=3), proc(8)])], realistic=True)

    write(10)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    for t, sm in ((1000.3, 20), (1000.6, 30), (1000.9, 40)):  # three changes between two reads
        write(sm)
        at(nvml, clock, t)
    clock.t = 1001.0
    samples = nvml.nvmlDeviceGetProcessUtilization(h, 0)
    # nvtop #110: "Count=100": the real entries, one garbage entry, then pid-0 padding.
    assert len(samples) == nvml_sim.UTIL_REPORTED_COUNT
    real = [s for s in samples if s.pid == 7]
    assert [(s.smUtil, s.encUtil) for s in real] == [(40, 3)]  # the latest sample only
    assert not [s for s in samples if s.pid == 8]  # memory-only: no entry
    stray = [s for s in samples if s.pid not in (0, 7)]
    assert [(s.pid, s.smUtil, s.encUtil, s.decUtil) for s in stray] == [(nvml_sim.STRAY_PID, 37100, 50583, 50624)]
    padding = samples[2:]
    assert all(as_tuple(s, SAMPLE_FIELDS) == (0, 0, 0, 0, 0, 0) for s in padding)

    # The same buffer through real pynvml's two-call protocol gives the same list.
    FakeDriver(monkeypatch, {"nvmlDeviceGetProcessUtilization": fake_utilisation_symbol(
        [as_tuple(s, SAMPLE_FIELDS) for s in samples[:2]], nvml_sim.UTIL_REPORTED_COUNT)})
    via_pynvml = pynvml.nvmlDeviceGetProcessUtilization(None, 0)
    assert [as_tuple(s, SAMPLE_FIELDS) for s in via_pynvml] == [as_tuple(s, SAMPLE_FIELDS) for s in samples]
    assert type(via_pynvml[0]) is type(samples[0])


def test_realistic_utilisation_not_found_and_future_timestamps(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(7, sm_util=50)])], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    last = 0
    wall_us = time.time() * 1e6
    future = []
    for k in range(1, 11):
        at(nvml, clock, 1000.0 + k)
        samples = nvml.nvmlDeviceGetProcessUtilization(h, last)
        mine = [s for s in samples if s.pid == 7]
        assert len(mine) == 1 and mine[0].timeStamp > last
        stray = [s for s in samples if s.pid == nvml_sim.STRAY_PID][0]
        future.append(stray.timeStamp > wall_us + 3000e6)
        last = mine[0].timeStamp  # a careful caller keeps the largest *valid* timestamp
        with pytest.raises(pynvml.NVMLError_NotFound):  # nothing newer at the same instant
            nvml.nvmlDeviceGetProcessUtilization(h, last)
    # "occasionally a timestamp in the future": every FUTURE_EVERY-th non-empty result.
    assert future == [k % nvml_sim.FUTURE_EVERY == 0 for k in range(1, 11)]


def test_realistic_garbage_can_be_turned_off_and_put_on_a_listed_zombie(sim_path, clock):
    write_sim(sim_path, [gpu(0, util_garbage=False,
                             processes=[proc(7, sm_util=50), proc(9, sm_util=1, garbage_util=True)])], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    samples = [s for s in nvml.nvmlDeviceGetProcessUtilization(h, 0) if s.pid]
    assert nvml_sim.STRAY_PID not in {s.pid for s in samples}  # util_garbage false: no stray entry
    # nvtop #110: the zombie's own entry reads "PID=50554 %SM=37100 %ENC=50583 %DEC=50624".
    assert sorted((s.pid, s.smUtil, s.encUtil, s.decUtil) for s in samples) == [(7, 50, 0, 0), (9, 37100, 50583, 50624)]


def test_h100_capture_memory_only_processes_have_no_samples(sim_path, clock):
    # capture ...h100-80gb-hbm3__590.48.01.txt, load pmon lines 2140-2142 (and every
    # repeat to 2154): memhog 11327 / 11328 "-" in every column, gpu_burn 11345 sm 99
    # mem 10. "-" is pmon's "no sample"; the simulator gives those processes no entry.
    rows = cap.pmon(cap.H100)
    assert {(r["pid"], r["sm"], r["mem"]) for r in rows} == {(11327, None, None), (11328, None, None), (11345, 99, 10)}
    write_sim(sim_path, [cap.sim_gpu_from_capture(cap.H100)], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    listed = {p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)}
    assert listed == {11327, 11328, 11345}
    valid = [s for s in nvml.nvmlDeviceGetProcessUtilization(h, 0) if s.pid in listed]
    assert [(s.pid, s.smUtil, s.memUtil) for s in valid] == [(11345, 99, 10)]


def test_l40s_capture_encoder_heavy_ffmpeg(sim_path, clock):
    # capture ...l40s__595.80.txt, load pmon lines 2091-2092: ffmpeg 20037 sm 2 mem 0
    # enc 24, ffmpeg 20038 sm 6 mem 0 enc 40, dec "-"; device Encoder 59 % (-q line 1902).
    write_sim(sim_path, [cap.sim_gpu_from_capture(cap.L40S)], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    valid = sorted((s.pid, s.smUtil, s.memUtil, s.encUtil, s.decUtil)
                   for s in nvml.nvmlDeviceGetProcessUtilization(h, 0) if s.pid in (20037, 20038))
    assert valid == [(20037, 2, 0, 24, 0), (20038, 6, 0, 40, 0)]
    assert nvml.nvmlDeviceGetArchitecture(h) == pynvml.NVML_DEVICE_ARCH_ADA
    # The L40S is not MIG-capable: mig.mode.current "[N/A]" (load -q line 1793).
    assert cap.mig_mode(cap.L40S)[0] == "N/A"
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetMigMode(h)


# --- MIG -------------------------------------------------------------------------------------------


def test_h100_mig_capture_replayed(sim_path, clock):
    # capture ...h100-mig__590.48.01.txt, load -q:
    #  lines 1958-2053: MIG devices 0-3 = GI 2/3/9/10, CI 0, 60/32/16/16 SMs, CE 3/2/1/1,
    #                   DEC 3/2/1/1, ENC 0, shared FB 40448/20096/9984/9984 MiB;
    #  lines 2275-2299: processes 21180 (2296 MiB), 21181 (1272 MiB), 21198 (7484 MiB),
    #                   all in GI 2, CI 0;
    #  lines 2217-2218: power only for the board (432.21 W average);
    #  load pmon lines 2339-2353: "-" for every process (no utilisation under MIG).
    expected_procs = cap.query_processes(cap.H100_MIG)
    devices = cap.mig_devices(cap.H100_MIG)
    write_sim(sim_path, [cap.sim_gpu_from_capture(cap.H100_MIG)], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetMigMode(h) == [pynvml.NVML_DEVICE_MIG_ENABLE] * 2
    board = nvml.nvmlDeviceGetComputeRunningProcesses(h)
    assert [(p.pid, p.gpuInstanceId, p.computeInstanceId, p.usedGpuMemory) for p in board] == [
        (p["pid"], p["gi"], p["ci"], p["used_mib"] * MIB) for p in expected_procs]
    assert [p["pid"] for p in expected_procs] == [21180, 21181, 21198]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetProcessUtilization(h, 0)

    assert nvml.nvmlDeviceGetMaxMigDeviceCount(h) == 7
    handles = [nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, d["index"]) for d in devices]
    for d, m in zip(devices, handles):
        assert nvml.nvmlDeviceIsMigDeviceHandle(m).value == 1
        assert (nvml.nvmlDeviceGetGpuInstanceId(m), nvml.nvmlDeviceGetComputeInstanceId(m)) == (d["gi"], d["ci"])
        a = nvml.nvmlDeviceGetAttributes(m)
        assert isinstance(a, pynvml.c_nvmlDeviceAttributes)
        assert (a.multiprocessorCount, a.sharedCopyEngineCount, a.sharedDecoderCount, a.sharedEncoderCount,
                a.sharedJpegCount, a.sharedOfaCount, a.memorySizeMB) == (
            d["sms"], d["ce"], d["dec"], d["enc"], d["jpg"], d["ofa"], d["total_mib"])
        assert nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m) == h
        pids = [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(m)]
        assert pids == ([21180, 21181, 21198] if d["gi"] == 2 else [])
        # Deliberate difference: the capture's used memory of GI 2 is 11091 MiB, 39 MiB
        # more than its processes' 11052 MiB (driver context overhead the process list
        # does not show); the simulator reports the processes' sum.
        used_mib = nvml.nvmlDeviceGetMemoryInfo(m).used // MIB
        assert used_mib == (11052 if d["gi"] == 2 else 0) and abs(used_mib - d["used_mib"]) < 40
        with pytest.raises(pynvml.NVMLError_NotSupported):
            nvml.nvmlDeviceGetPowerUsage(m)  # power and energy exist for the board only
        with pytest.raises(pynvml.NVMLError_NotSupported):
            nvml.nvmlDeviceGetTotalEnergyConsumption(m)
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, len(devices))  # unused slot
    assert nvml.nvmlDeviceIsMigDeviceHandle(h).value == 0
    assert isinstance(nvml.nvmlDeviceIsMigDeviceHandle(h), ctypes.c_uint)  # pynvml returns the c_uint


def test_h200_mig_capture_two_compute_instances_in_one_gpu_instance(sim_path, clock):
    # capture ...h200-mig__590.48.01.txt, load -q lines 1995-2043: MIG devices 0 and 1
    # are GI 2 CI 0 (16 SMs) and GI 2 CI 1 (32 SMs), sharing 71424 MiB; lines 2336-2360:
    # processes 12249, 12250, 12267 in GI 2, CI 1.
    devices = cap.mig_devices(cap.H200_MIG)
    assert [(d["gi"], d["ci"], d["sms"]) for d in devices[:2]] == [(2, 0, 16), (2, 1, 32)]
    write_sim(sim_path, [cap.sim_gpu_from_capture(cap.H200_MIG)])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    handles = [nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, i) for i in range(len(devices))]
    assert [(m.gi_id, m.ci_id) for m in handles] == [(d["gi"], d["ci"]) for d in devices]
    assert [nvml.nvmlDeviceGetAttributes_v2(m).multiprocessorCount for m in handles] == [d["sms"] for d in devices]
    assert [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(handles[0])] == []
    assert [(p.pid, p.gpuInstanceId, p.computeInstanceId) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handles[1])] == [
        (p["pid"], 2, 1) for p in cap.query_processes(cap.H200_MIG)]
    # Both compute instances see their GPU instance's shared memory (71424 MiB).
    assert {nvml.nvmlDeviceGetMemoryInfo(m).total // MIB for m in handles[:2]} == {71424}


def test_mig_errors_apply_to_mig_handles_and_errors_to_the_board(sim_path, clock):
    write_sim(sim_path, [gpu(0, mig=True, mig_instances=[mig_instance(1, "3g.40gb"), mig_instance(2, "1g.10gb")],
                             processes=[proc(11, gi_id=1), proc(12, gi_id=2)],
                             errors={"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION"},
                             mig_errors={"nvmlDeviceGetMemoryInfo": "UNKNOWN"})])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        nvml.nvmlDeviceGetComputeRunningProcesses(h)
    m1, m2 = (nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, i) for i in (0, 1))
    assert [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(m1)] == [11]
    assert [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(m2)] == [12]
    assert nvml.nvmlDeviceGetAttributes(m1).gpuInstanceSliceCount == 3
    with pytest.raises(pynvml.NVMLError_Unknown):
        nvml.nvmlDeviceGetMemoryInfo(m1)
    assert nvml.nvmlDeviceGetMemoryInfo(h).total == 80 * (1 << 30)


def test_mig_file_errors(sim_path, clock):
    cases = [
        (gpu(0, mig_instances=[mig_instance(1)]), 'needs "mig": true'),
        (gpu(0, mig=True, mig_instances=[mig_instance(1)], processes=[proc(5)]), "missing key 'gi_id'"),
        (gpu(0, mig=True, mig_instances=[mig_instance(1)], processes=[proc(5, gi_id=3)]), "no MIG instance"),
        (gpu(0, processes=[proc(5, gi_id=1)]), "need mig_instances"),
        (gpu(0, mig=True, mig_instances=[mig_instance(1, "4g.40gb"), mig_instance(2, "4g.40gb")]), "slices"),
    ]
    for entry, needle in cases:
        write_sim(sim_path, [entry])
        with pytest.raises(SimFileError) as err:
            started(sim_path, clock)
        assert needle in str(err.value)


# --- power, energy ----------------------------------------------------------------------------------


def test_realistic_power_usage_is_the_one_second_average(sim_path, clock):
    # Every capture's power.draw equals power.draw.average, not .instant: e.g. H100
    # ...h100-80gb-hbm3 query-gpu line 2105 (631.95 W average vs 625.68 W instant) and
    # -q lines 2018-2019 (629.45 W vs 588.39 W). After a load drops, the average lags
    # above the instant value: L40S idle -q lines 1619-1620 (183.28 W vs 119.88 W).
    h100 = cap.power_readings(cap.H100)
    assert (h100["average_w"], h100["instant_w"], h100["average_line"]) == (629.45, 588.39, 2018)
    l40s = cap.power_readings(cap.L40S, "idle")
    assert l40s["average_w"] > l40s["instant_w"]
    write_sim(sim_path, [gpu(0, 300.0)], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    write_sim(sim_path, [gpu(0, 100.0)], realistic=True)
    at(nvml, clock, 1010.0)  # the load drops from 300 W to 100 W
    clock.t = 1010.3
    instant, average = nvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT,
                                                         pynvml.NVML_FI_DEV_POWER_AVERAGE])
    assert instant.value.uiVal == 100_000
    assert average.value.uiVal == 240_000  # 0.7 s at 300 W + 0.3 s at 100 W
    assert nvml.nvmlDeviceGetPowerUsage(h) == 240_000  # what nvidia-smi's power.draw shows
    clock.t = 1011.5
    assert nvml.nvmlDeviceGetPowerUsage(h) == 100_000


def test_idealised_power_usage_is_instant(sim_path, clock):
    write_sim(sim_path, [gpu(0, 300.0)])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    write_sim(sim_path, [gpu(0, 100.0)])
    at(nvml, clock, 1010.0)
    clock.t = 1010.3
    assert nvml.nvmlDeviceGetPowerUsage(h) == 100_000


@pytest.mark.parametrize("arch, name, averages", [
    ("volta", "Tesla V100-SXM2-16GB", False),
    ("ampere", "NVIDIA A100-SXM4-80GB", False),  # GA100
    ("ampere", "NVIDIA A30", False),  # GA100
    ("ampere", "NVIDIA A10", True),
    ("ada", "NVIDIA L40S", True),
    ("hopper", "NVIDIA H100 80GB HBM3", True),
    ("blackwell", "NVIDIA B200", True),
])
def test_which_boards_average_power(sim_path, clock, arch, name, averages):
    # nvml.h: NVML_FI_DEV_POWER_AVERAGE "supported on Ampere (except GA100) or newer";
    # NVML_FI_DEV_POWER_INSTANT "supported on all architectures".
    write_sim(sim_path, [gpu(0, 300.0, architecture=arch, name=name)], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    write_sim(sim_path, [gpu(0, 100.0, architecture=arch, name=name)], realistic=True)
    at(nvml, clock, 1010.0)
    clock.t = 1010.5
    assert nvml.nvmlDeviceGetPowerUsage(h) == (200_000 if averages else 100_000)
    average, instant = nvml.nvmlDeviceGetFieldValues(h, [185, 186])
    assert average.nvmlReturn == (pynvml.NVML_SUCCESS if averages else pynvml.NVML_ERROR_NOT_SUPPORTED)
    assert (instant.nvmlReturn, instant.value.uiVal) == (pynvml.NVML_SUCCESS, 100_000)
    assert nvml.nvmlDeviceGetArchitecture(h) == nvml_sim.ARCHITECTURES[arch]


def test_pascal_has_no_energy_counter(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0, architecture="pascal", name="Tesla P100-PCIE-16GB")])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetTotalEnergyConsumption(h)
    [energy] = nvml.nvmlDeviceGetFieldValues(h, [83])
    assert energy.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert nvml.nvmlDeviceGetArchitecture(h) == pynvml.NVML_DEVICE_ARCH_PASCAL


def test_power_pattern_drives_counter_average_and_instant(sim_path, clock):
    pattern = [[100, 0.5], [300, 0.5]]  # 200 W on average, 200 J per second
    write_sim(sim_path, [gpu(0, power_pattern=pattern)])
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    for t in (1000.25, 1000.75, 1003.3):
        at(nvml, clock, t)  # re-reading the same pattern does not restart it
    clock.t = 1003.3
    instant, average = nvml.nvmlDeviceGetFieldValues(h, [186, 185])
    assert instant.value.uiVal == 100_000  # 3.3 s in: 0.3 s into a 100 W step
    # The last second, [1002.3, 1003.3] (3.0 s from the start is a cycle boundary):
    # [2.3, 2.5) 100 W, [2.5, 3.0) 300 W, [3.0, 3.3) 100 W -> 20 + 150 + 30 = 200 J.
    assert average.value.uiVal == 200_000
    assert nvml.nvmlDeviceGetPowerUsage(h) == 100_000  # idealised mode: instant
    # Counter: 3 whole cycles (600 J) + 0.3 s at 100 W.
    assert nvml.nvmlDeviceGetTotalEnergyConsumption(h) == 630_000
    write_sim(sim_path, [gpu(0, 50.0)])  # pattern replaced by a constant
    at(nvml, clock, 1004.0)
    clock.t = 1006.0
    # 1003.3 -> 1004: 0.2 s at 100 + 0.5 s at 300 = 170 J; then 2 s at 50 W.
    assert nvml.nvmlDeviceGetTotalEnergyConsumption(h) == 630_000 + 170_000 + 100_000


def test_realistic_energy_counter_advances_in_100ms_steps(sim_path, clock):
    write_sim(sim_path, [gpu(0, 250.0)], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    readings = []
    for t in (1000.05, 1000.099, 1000.1, 1000.15, 1000.2, 1001.0):
        clock.t = t
        readings.append(nvml.nvmlDeviceGetTotalEnergyConsumption(h))
    assert readings == [0, 0, 25_000, 25_000, 50_000, 250_000]
    # Idealised mode: continuous.
    write_sim(sim_path, [gpu(0, 250.0)])
    at(nvml, clock, 1001.05)
    assert nvml.nvmlDeviceGetTotalEnergyConsumption(h) == 262_500


def test_realistic_counter_restart_reads_zero_not_negative(sim_path, clock):
    write_sim(sim_path, [gpu(0, 100.0)], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    write_sim(sim_path, [gpu(0, 100.0, counter_epoch=1)], realistic=True)
    at(nvml, clock, 1005.05)  # driver reload between two 100 ms steps
    assert nvml.nvmlDeviceGetTotalEnergyConsumption(h) == 0
    clock.t = 1005.3
    # The 1005.3 step holds the energy since the restart: 0.25 s at 100 W.
    assert nvml.nvmlDeviceGetTotalEnergyConsumption(h) == 25_000


# --- GPU count, lost GPUs, namespaces, hangs -------------------------------------------------------


def test_realistic_gpu_count_is_fixed_at_init(sim_path, clock):
    write_sim(sim_path, [gpu(0), gpu(1)], realistic=True)
    nvml = started(sim_path, clock)
    assert nvml.nvmlDeviceGetCount() == 2
    write_sim(sim_path, [gpu(0), gpu(1), gpu(2)], realistic=True)
    assert nvml.nvmlDeviceGetCount() == 2  # hot-added GPU: not until NVML is re-initialised
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetHandleByIndex(2)
    write_sim(sim_path, [gpu(0)], realistic=True)
    assert nvml.nvmlDeviceGetCount() == 2
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetHandleByIndex(1)  # removed: lost, not renumbered
    nvml.nvmlInit()  # a nested init (refcount) does not re-enumerate
    assert nvml.nvmlDeviceGetCount() == 2
    nvml.nvmlShutdown()
    nvml.nvmlShutdown()
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 1


def test_idealised_gpu_count_follows_the_file(sim_path, clock):
    write_sim(sim_path, [gpu(0)])
    nvml = started(sim_path, clock)
    write_sim(sim_path, [gpu(0), gpu(1)])
    assert nvml.nvmlDeviceGetCount() == 2


def test_pid_namespace_sets_reports_host_pids(sim_path, clock):
    write_sim(sim_path, [gpu(0)])
    nvml = started(sim_path, clock)
    assert nvml.reports_host_pids is False
    assert not hasattr(pynvml, "reports_host_pids")  # real pynvml: the collector assumes True
    write_sim(sim_path, [gpu(0)], pid_namespace="host")
    nvml.nvmlDeviceGetCount()
    assert nvml.reports_host_pids is True
    write_sim(sim_path, [gpu(0)], pid_namespace="container")
    with pytest.raises(SimFileError):
        nvml.nvmlDeviceGetCount()


def test_hang_blocks_every_call_on_that_gpu(sim_path, clock):
    write_sim(sim_path, [gpu(0, mig=True, mig_instances=[mig_instance(1)], processes=[proc(5, gi_id=1)]),
                         gpu(1)])
    nvml = started(sim_path, clock)
    h0, h1 = nvml.nvmlDeviceGetHandleByIndex(0), nvml.nvmlDeviceGetHandleByIndex(1)
    m = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h0, 0)
    write_sim(sim_path, [gpu(0, hang_s=0.2, mig=True, mig_instances=[mig_instance(1)], processes=[proc(5, gi_id=1)]),
                         gpu(1)])
    nvml.nvmlDeviceGetCount()
    for call in (lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h0), lambda: nvml.nvmlDeviceGetPowerUsage(h0),
                 lambda: nvml.nvmlDeviceGetComputeRunningProcesses(m)):
        start = time.monotonic()
        call()
        assert time.monotonic() - start >= 0.2
    start = time.monotonic()
    nvml.nvmlDeviceGetPowerUsage(h1)
    assert time.monotonic() - start < 0.2  # the other GPU answers at once


def test_used_memory_is_not_available_unless_given(sim_path, clock):
    write_sim(sim_path, [{"power_w": 10, "processes": [{"pid": 3}, {"pid": 4, "used_memory_bytes": 5}]}], realistic=True)
    nvml = started(sim_path, clock)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert [(p.pid, p.usedGpuMemory) for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)] == [(3, None), (4, 5)]


def test_the_garbage_pid_is_never_a_listed_one(sim_path, clock):
    write_sim(sim_path, [gpu(0, processes=[proc(nvml_sim.STRAY_PID, sm_util=5), proc(7, sm_util=9)])], realistic=True)
    nvml = started(sim_path, clock)
    samples = nvml.nvmlDeviceGetProcessUtilization(nvml.nvmlDeviceGetHandleByIndex(0), 0)
    garbage = [s for s in samples if s.smUtil == 37100]
    assert [s.pid for s in garbage] == [nvml_sim.STRAY_PID - 1]


def test_unknown_top_level_key_is_an_error(sim_path, clock):
    write_sim(sim_path, [gpu(0)], realistc=True)
    with pytest.raises(SimFileError) as err:
        started(sim_path, clock)
    assert "realistc" in str(err.value)


def test_mig_handle_is_opaque_and_distinct_from_board_handle(sim_path, clock):
    write_sim(sim_path, [gpu(0, mig=True, mig_instances=[mig_instance(3, "7g.80gb")], processes=[proc(5, gi_id=3)])])
    nvml = started(sim_path, clock)
    m = nvml.nvmlDeviceGetMigDeviceHandleByIndex(nvml.nvmlDeviceGetHandleByIndex(0), 0)
    assert isinstance(m, SimMigHandle)
    assert nvml.nvmlDeviceGetAttributes(m).multiprocessorCount == 132  # H100 7g: the whole GPU
