"""The simulated amdsmi (daemon/sources/amdsmi_sim.py) against what the real package does.

Sources:
- the real ``amdsmi`` package installed in the venv (PyPI amdsmi 7.0.2, a [test]
  dependency): its files are read with ``ast`` (importing it needs ROCm's
  libamd_smi.so): function names and parameters, the keys of the dicts it returns, its
  status codes and exception classes;
- ROCm/amdsmi at commit 0ceca28 and tags rocm-6.1.0 / rocm-6.2.0 for what older versions
  return and for the C library's behaviour (cited per test, as in the simulator's
  docstring).
"""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from wattprint.daemon.sources import amdsmi_sim
from wattprint.daemon.sources.amdsmi_sim import (
    AmdSmiLibraryException,
    AmdSmiParameterException,
    SimFileError,
    SimulatedAmdSmi,
)
from wattprint.daemon.sources.nvml_sim import SimulatedNvml

try:
    from gpusim import FakeClock, amd_proc, gpu, proc, write_sim
except ImportError:  # pragma: no cover - tests/ not on sys.path
    sys.path.insert(0, str(Path(__file__).parent))
    from gpusim import FakeClock, amd_proc, gpu, proc, write_sim

MIB = 1 << 20
RES = ctypes.c_float(15.3).value  # rocm_smi.cc kEnergyCounterResolution, as a C float


def started(sim_path: Path, clock: FakeClock) -> SimulatedAmdSmi:
    smi = SimulatedAmdSmi(str(sim_path), clock=clock)
    smi.amdsmi_init()
    return smi


def at(smi: SimulatedAmdSmi, clock: FakeClock, t: float) -> list:
    """Move the clock and let the simulator re-read its file (as the adapter's tick does)."""
    clock.t = t
    return smi.amdsmi_get_processor_handles()


def code_of(exc_info) -> int:
    return exc_info.value.get_error_code()


# --- the real package's source ---------------------------------------------------------


def _real_file(name: str) -> ast.Module:
    spec = importlib.util.find_spec("amdsmi")
    assert spec is not None and spec.submodule_search_locations, "amdsmi ([test] extra) is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return ast.parse(path.read_text(encoding="utf-8"))


def _real_functions() -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in _real_file("amdsmi_interface.py").body if isinstance(n, ast.FunctionDef)}


def _dict_keys(fn: ast.FunctionDef) -> set[str]:
    """Every string key of a dict literal in the function (its returned dicts)."""
    keys: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Dict):
            keys |= {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return keys


def _sim_functions() -> list[str]:
    return sorted(n for n in dir(SimulatedAmdSmi) if n.startswith("amdsmi_"))


def test_every_simulated_function_is_amdsmis_with_the_same_parameters():
    real = _real_functions()
    for name in _sim_functions():
        assert name in real, f"{name} is not an amdsmi function"
        sim_params = list(getattr(SimulatedAmdSmi, name).__code__.co_varnames[1:getattr(SimulatedAmdSmi, name).__code__.co_argcount])
        real_params = [a.arg for a in real[name].args.args]
        assert sim_params == real_params, name


def test_returned_dict_keys_are_amdsmi_7s(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", compute_partition="DPX",
                             processes=[amd_proc(5, gfx_util=10)])])
    smi = started(sim_path, clock)
    [h, _] = at(smi, clock, 1001.0)
    real = _real_functions()
    answers = {
        "amdsmi_get_energy_count": smi.amdsmi_get_energy_count(h),
        "amdsmi_get_power_info": smi.amdsmi_get_power_info(h),
        "amdsmi_get_gpu_asic_info": smi.amdsmi_get_gpu_asic_info(h),
        "amdsmi_get_gpu_vram_usage": smi.amdsmi_get_gpu_vram_usage(h),
        "amdsmi_get_gpu_activity": smi.amdsmi_get_gpu_activity(h),
        "amdsmi_get_gpu_kfd_info": smi.amdsmi_get_gpu_kfd_info(h),
    }
    for name, answer in answers.items():
        assert set(answer) == _dict_keys(real[name]), name
    [p] = smi.amdsmi_get_gpu_process_list(h)
    keys = _dict_keys(real["amdsmi_get_gpu_process_list"])
    assert set(p) | set(p["engine_usage"]) | set(p["memory_usage"]) == keys


def test_status_codes_and_exceptions_are_amdsmis():
    wrapper = _real_file("amdsmi_wrapper.py")
    real_codes = {}
    for node in wrapper.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.startswith("AMDSMI_STATUS_") and isinstance(node.value, ast.Constant)):
            real_codes[node.targets[0].id[len("AMDSMI_STATUS_"):]] = node.value.value
    for name, code in amdsmi_sim.STATUS_CODES.items():
        assert real_codes[name] == code, name
    classes = {n.name: n for n in _real_file("amdsmi_exception.py").body if isinstance(n, ast.ClassDef)}
    for name in ("AmdSmiException", "AmdSmiLibraryException", "AmdSmiRetryException", "AmdSmiTimeoutException",
                 "AmdSmiParameterException"):
        assert name in classes
        assert getattr(amdsmi_sim, name).__name__ == name
    methods = {f.name for f in classes["AmdSmiLibraryException"].body if isinstance(f, ast.FunctionDef)}
    assert {"get_error_code", "get_error_info"} <= methods
    e = AmdSmiLibraryException(-2)  # abs() of the code, as amdsmi_exception.py
    assert e.get_error_code() == 2
    assert str(e) == "Error code:\n\t2 | AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported"
    assert isinstance(amdsmi_sim.AmdSmiTimeoutException(), AmdSmiLibraryException)
    assert amdsmi_sim.AmdSmiRetryException().get_error_code() == 9


# --- init, handles, errors -------------------------------------------------------------


def test_calls_outside_a_session_raise_not_init_and_init_is_not_reference_counted(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd")])
    smi = SimulatedAmdSmi(str(sim_path), clock=clock)
    with pytest.raises(AmdSmiLibraryException) as exc:
        smi.amdsmi_get_processor_handles()
    assert code_of(exc) == 32  # AMDSMI_STATUS_NOT_INIT
    smi.amdsmi_shut_down()  # without init: success (amd_smi.cc)
    smi.amdsmi_init()
    smi.amdsmi_init()  # a no-op
    [h] = smi.amdsmi_get_processor_handles()
    smi.amdsmi_shut_down()  # ONE shut_down ends the session
    with pytest.raises(AmdSmiLibraryException) as exc:
        smi.amdsmi_get_gpu_device_uuid(h)
    assert code_of(exc) == 32
    smi.amdsmi_init()
    with pytest.raises(AmdSmiLibraryException) as exc:  # a handle of an earlier session
        smi.amdsmi_get_gpu_device_uuid(h)
    assert code_of(exc) == 31  # NOT_FOUND (handle_to_processor)


def test_init_flag_and_handle_types_are_checked(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd")])
    smi = SimulatedAmdSmi(str(sim_path), clock=clock)
    with pytest.raises(AmdSmiParameterException):
        smi.amdsmi_init(2)  # an int, not an AmdSmiInitFlags
    smi.amdsmi_init(smi.AmdSmiInitFlags.INIT_AMD_GPUS)
    with pytest.raises(AmdSmiParameterException):
        smi.amdsmi_get_energy_count(0)


def test_driver_not_loaded(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd")], amdgpu_loaded=False)
    smi = SimulatedAmdSmi(str(sim_path), clock=clock)
    with pytest.raises(AmdSmiLibraryException) as exc:
        smi.amdsmi_init()
    assert code_of(exc) == 34  # DRIVER_NOT_LOADED
    write_sim(sim_path, [gpu(0, vendor="amd")])
    smi.amdsmi_init()
    assert len(smi.amdsmi_get_processor_handles()) == 1


def test_configured_errors_raise_amdsmis_exceptions(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", errors={"amdsmi_get_gpu_process_list": "NO_PERM",
                                                      "amdsmi_get_power_info": "TIMEOUT"})])
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1001.0)
    with pytest.raises(AmdSmiLibraryException) as exc:
        smi.amdsmi_get_gpu_process_list(h)
    assert code_of(exc) == 10
    with pytest.raises(amdsmi_sim.AmdSmiTimeoutException):  # _check_res: Timeout for 8
        smi.amdsmi_get_power_info(h)
    write_sim(sim_path, [gpu(0, vendor="amd", errors={"amdsmi_no_such": "NO_PERM"})])
    with pytest.raises(SimFileError, match="amdsmi_no_such"):
        at(smi, clock, 1002.0)


def test_nvidia_and_amd_gpus_in_one_file_each_simulator_sees_its_own(sim_path, clock):
    write_sim(sim_path, [gpu(0, power_w=100.0), gpu(0, vendor="amd", power_w=500.0),
                         gpu(1, power_w=200.0), gpu(1, vendor="amd", power_w=600.0)])
    smi = started(sim_path, clock)
    handles = at(smi, clock, 1001.0)
    assert [smi.amdsmi_get_power_info(h)["socket_power"] for h in handles] == [500, 600]
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 2
    watts = [nvml.nvmlDeviceGetPowerUsage(nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(2)]
    assert watts == [100_000, 200_000]
    assert nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(1)) == "GPU-00000001-sim"


def test_nvml_sim_ignores_amd_gpus_and_their_keys(sim_path, clock):
    # AMD-only keys (gfx_util, compute_partition) would be errors for NVML: not validated there.
    write_sim(sim_path, [gpu(0, vendor="amd", compute_partition="CPX", processes=[amd_proc(1, gfx_util=5)])],
              amdsmi_api="6.3", amdgpu_loaded=True)
    nvml = SimulatedNvml(str(sim_path), clock=clock)
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 0
    # The top-level vendor makes every GPU without its own key AMD.
    sim_path.write_text(json.dumps({"vendor": "amd", "gpus": [{"power_w": 300}, {"vendor": "nvidia", "power_w": 50}]}))
    assert nvml.nvmlDeviceGetCount() == 1
    smi = started(sim_path, clock)
    assert len(smi.amdsmi_get_processor_handles()) == 1
    sim_path.write_text(json.dumps({"gpus": [{"vendor": "intel", "power_w": 1}]}))
    with pytest.raises(Exception, match="intel"):
        nvml.nvmlDeviceGetCount()


def test_nvidia_key_on_an_amd_process_is_rejected_with_a_hint(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[proc(1, sm_util=50)])])
    with pytest.raises(SimFileError, match="gfx_util"):
        started(sim_path, clock)


# --- energy and power ------------------------------------------------------------------


def test_energy_accumulator_counts_resolution_units_and_resets_on_driver_reload(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=612.0)])
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1000.0)
    e0 = smi.amdsmi_get_energy_count(h)
    assert e0["counter_resolution"] == RES  # a C float: 15.300000190734863
    clock.t = 1010.0
    e1 = smi.amdsmi_get_energy_count(h)
    joules = (e1["energy_accumulator"] - e0["energy_accumulator"]) * e1["counter_resolution"] / 1e6
    assert joules == pytest.approx(612.0 * 10, abs=RES * 1e-6)  # within one unit
    assert e1["timestamp"] - e0["timestamp"] == 10 * 10**9  # ns
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=612.0, counter_epoch=1)])  # driver reload
    at(smi, clock, 1011.0)
    clock.t = 1012.0
    e2 = smi.amdsmi_get_energy_count(h)
    assert e2["energy_accumulator"] < e1["energy_accumulator"]
    assert e2["energy_accumulator"] * RES / 1e6 == pytest.approx(612.0, abs=RES * 1e-6)


@pytest.mark.parametrize("api, keys", [
    ("6.1", {"power", "counter_resolution", "timestamp"}),  # rocm-6.1.0
    ("6.2", {"power", "counter_resolution", "timestamp"}),  # rocm-6.2.0
    ("6.3", {"power", "energy_accumulator", "counter_resolution", "timestamp"}),  # 0ceca28
    ("7.0", {"energy_accumulator", "counter_resolution", "timestamp"}),  # 7.0.2
])
def test_energy_count_keys_by_version(sim_path, clock, api, keys):
    write_sim(sim_path, [gpu(0, vendor="amd")], amdsmi_api=api)
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1001.0)
    assert set(smi.amdsmi_get_energy_count(h)) == keys


def test_no_energy_counter_is_not_supported(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", energy_counter=False)])
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1001.0)
    with pytest.raises(AmdSmiLibraryException) as exc:
        smi.amdsmi_get_energy_count(h)
    assert code_of(exc) == 2


def test_power_info_mi300_current_only_mi250_average_only(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=640.4),
                         gpu(1, vendor="amd", name="AMD Instinct MI250X", power_pattern=[[100, 0.5], [300, 0.5]])])
    smi = started(sim_path, clock)
    mi300, mi250 = at(smi, clock, 1000.0)
    clock.t = 1002.0
    p = smi.amdsmi_get_power_info(mi300)
    assert (p["socket_power"], p["current_socket_power"], p["average_socket_power"]) == (640, 640, "N/A")
    q = smi.amdsmi_get_power_info(mi250)
    assert (q["socket_power"], q["current_socket_power"], q["average_socket_power"]) == (200, "N/A", 200)
    assert q["gfx_voltage"] == "N/A"


def test_power_info_before_rocm_6_2_keeps_65535(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=500)], amdsmi_api="6.1")
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1001.0)
    p = smi.amdsmi_get_power_info(h)
    assert "socket_power" not in p
    assert (p["current_socket_power"], p["average_socket_power"]) == (500, 0xFFFF)


# --- processes -------------------------------------------------------------------------


def test_engine_usage_is_cumulative_nanoseconds(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(7, gfx_util=40, enc_util=10, name="ffmpeg"),
                                                         amd_proc(8, used_memory_bytes=3 * MIB)])])
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1000.0)
    clock.t = 1005.0
    a, b = smi.amdsmi_get_gpu_process_list(h)
    assert a["engine_usage"] == {"gfx": 2_000_000_000, "enc": 500_000_000}  # 40 % and 10 % of 5 s
    assert a["name"] == "ffmpeg" and a["memory_usage"]["vram_mem"] == 1 << 30
    assert b["engine_usage"] == {"gfx": 0, "enc": 0} and b["mem"] == 3 * MIB
    assert a["cu_occupancy"] == "N/A"
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(7, gfx_util=100)])])
    at(smi, clock, 1006.0)
    clock.t = 1007.0
    [a] = smi.amdsmi_get_gpu_process_list(h)
    assert a["engine_usage"]["gfx"] == 2_000_000_000 + 400_000_000 + 1_000_000_000
    write_sim(sim_path, [gpu(0, vendor="amd")])  # it left ...
    at(smi, clock, 1008.0)
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(7, gfx_util=50)])])  # ... and came back
    at(smi, clock, 1009.0)
    clock.t = 1010.0
    [a] = smi.amdsmi_get_gpu_process_list(h)
    assert a["engine_usage"]["gfx"] == 500_000_000  # a new fd: from 0


def test_unreadable_fdinfo_keeps_only_pid_and_vram_since_rocm_6_2(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(9, gfx_util=90, fdinfo_readable=False)])])
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1000.0)
    clock.t = 1001.0
    [p] = smi.amdsmi_get_gpu_process_list(h)
    assert p["name"] == "N/A" and p["mem"] == 0 and p["engine_usage"] == {"gfx": 0, "enc": 0}
    assert p["memory_usage"]["vram_mem"] == 1 << 30


def test_rocm_6_1_lists_handles_and_process_info_says_no_perm(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(11, gfx_util=50),
                                                         amd_proc(12, fdinfo_readable=False)])],
              amdsmi_api="6.1")
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1000.0)
    clock.t = 1002.0
    listed = smi.amdsmi_get_gpu_process_list(h)
    assert [type(p) for p in listed] == [ctypes.c_uint32] and listed[0].value == 11  # 12 is not listed
    info = smi.amdsmi_get_gpu_process_info(h, listed[0])
    assert info["engine_usage"]["gfx"] == 1_000_000_000 and info["pid"] == 11
    with pytest.raises(AmdSmiLibraryException) as exc:
        smi.amdsmi_get_gpu_process_info(h, ctypes.c_uint32(12))
    assert code_of(exc) == 10  # NO_PERM: its fdinfo cannot be opened
    with pytest.raises(AmdSmiParameterException):
        smi.amdsmi_get_gpu_process_info(h, 11)
    write_sim(sim_path, [gpu(0, vendor="amd")])  # 7.0: the function does not exist
    at(smi, clock, 1003.0)
    assert not hasattr(smi, "amdsmi_get_gpu_process_info")


def test_vram_usage_in_mib(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", processes=[amd_proc(1, used_memory_bytes=5 * MIB)])])
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1001.0)
    assert smi.amdsmi_get_gpu_vram_usage(h) == {"vram_total": 192 * 1024, "vram_used": 5}


# --- partitions ------------------------------------------------------------------------


def test_mi300x_cpx_is_eight_handles_of_one_board(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=700.0, compute_partition="CPX", memory_partition="NPS4",
                             processes=[amd_proc(21, partition=5, gfx_util=60)]),
                         gpu(1, vendor="amd", name="AMD Instinct MI250X")])
    smi = started(sim_path, clock)
    handles = at(smi, clock, 1000.0)
    assert len(handles) == 9  # 8 partitions + 1 board
    parts, mi250 = handles[:8], handles[8]
    assert {smi.amdsmi_get_gpu_device_uuid(h) for h in parts} == {smi.amdsmi_get_gpu_device_uuid(parts[0])}
    assert smi.amdsmi_get_gpu_device_uuid(mi250) != smi.amdsmi_get_gpu_device_uuid(parts[0])
    assert [smi.amdsmi_get_gpu_kfd_info(h)["current_partition_id"] for h in parts] == list(range(8))
    assert smi.amdsmi_get_gpu_device_bdf(parts[3]).endswith(".3")
    assert smi.amdsmi_get_gpu_compute_partition(parts[0]) == "CPX"
    assert smi.amdsmi_get_gpu_memory_partition(parts[0]) == "NPS4"
    with pytest.raises(AmdSmiLibraryException) as exc:
        smi.amdsmi_get_gpu_compute_partition(mi250)
    assert code_of(exc) == 2
    clock.t = 1001.0
    # Every partition reports the whole board's power and energy.
    assert {smi.amdsmi_get_power_info(h)["socket_power"] for h in parts} == {700}
    assert len({smi.amdsmi_get_energy_count(h)["energy_accumulator"] for h in parts}) == 1
    assert [len(smi.amdsmi_get_gpu_process_list(h)) for h in parts] == [0, 0, 0, 0, 0, 1, 0, 0]
    assert smi.amdsmi_get_gpu_vram_usage(parts[5])["vram_total"] == 192 * 1024 // 4
    assert smi.amdsmi_get_gpu_asic_info(parts[0])["num_compute_units"] == 304 // 8


def test_board_set_is_fixed_at_init(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd")])
    smi = started(sim_path, clock)
    write_sim(sim_path, [gpu(0, vendor="amd"), gpu(1, vendor="amd")])
    assert len(at(smi, clock, 1001.0)) == 1
    smi.amdsmi_shut_down()
    smi.amdsmi_init()
    assert len(at(smi, clock, 1002.0)) == 2
    handles = smi.amdsmi_get_processor_handles()
    write_sim(sim_path, [gpu(0, vendor="amd")])
    at(smi, clock, 1003.0)
    with pytest.raises(AmdSmiLibraryException) as exc:
        smi.amdsmi_get_energy_count(handles[1])
    assert code_of(exc) == 31


def test_malformed_file_keeps_the_last_good_state(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=100.0)])
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1000.0)
    e0 = smi.amdsmi_get_energy_count(h)["energy_accumulator"]
    sim_path.write_text("{not json")
    with pytest.raises(SimFileError, match="not valid JSON") as exc:
        at(smi, clock, 1005.0)
    assert code_of(exc) == 14  # FILE_ERROR, an AmdSmiLibraryException
    clock.t = 1010.0
    e1 = smi.amdsmi_get_energy_count(h)["energy_accumulator"]
    assert (e1 - e0) * RES / 1e6 == pytest.approx(1000.0, abs=1e-4)


def test_pid_namespace_sets_reports_host_pids(sim_path, clock):
    write_sim(sim_path, [gpu(0, vendor="amd")], pid_namespace="host")
    assert started(sim_path, clock).reports_host_pids is True


def test_a_gpu_metrics_v1_0_accumulator_wraps_at_2_to_the_32(sim_path, clock):
    # rocm_smi_gpu_metrics.h: energy_accumulator "v1 mod. (32->64)": 32-bit in v1.0.
    write_sim(sim_path, [gpu(0, vendor="amd", power_w=500.0, accumulator_bits=32)])
    smi = started(sim_path, clock)
    [h] = at(smi, clock, 1000.0)
    clock.t = 1000.0 + 150.0  # 75 kJ: past 2^32 x 15.3 µJ = 65.7 kJ
    e = smi.amdsmi_get_energy_count(h)["energy_accumulator"]
    assert e == pytest.approx((75_000.0 / (RES * 1e-6)) - (1 << 32), abs=2)
