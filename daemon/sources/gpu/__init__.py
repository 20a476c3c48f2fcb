"""GPU energy sources, one per vendor present: a vendor-neutral collector
(policy.py) over one adapter per vendor library (nvidia.py: NVML; amd.py: amdsmi),
chosen by the registry (registry.py) from ``[gpu] backend``. The boundary between the
collector and a vendor is vendor.py.

This package re-exports the names code and tests imported from the former single
module ``daemon/sources/gpu.py``.
"""

from __future__ import annotations

import pynvml

from .nvidia import (
                     DRIVER_GPUS_DIR,
                     ERR_FUNCTION_NOT_FOUND,
                     ERR_GPU_IS_LOST,
                     ERR_NOT_SUPPORTED,
                     FUTURE_TOLERANCE_S,
                     NO_INSTANCE,
                     NvidiaVendor,
                     NVMLError,
                     NvmlGpuSource,
                     nvml_error,
                     nvml_error_text,
                     process_struct_ok,
)
from .policy import (
                     INIT_RETRY_S,
                     LOST_RETRY_FACTOR,
                     LOST_RETRY_MAX_S,
                     LOST_RETRY_S,
                     MIG_LAYOUT_REFRESH_S,
                     POWER_SAMPLE_HZ,
                     PROC_PID_INIT_INO,
                     REINIT_INTERVAL_S,
                     RETRY_MAX_S,
                     RETRY_S,
                     GpuSource,
                     PowerIntegrator,
                     pid_namespace_is_initial,
                     proc_pid_exists,
)
from .registry import GpuOpening, open_gpu_source, open_gpu_sources
from .vendor import GpuError, GpuErrorKind, GpuVendor

__all__ = [
    "DRIVER_GPUS_DIR", "ERR_FUNCTION_NOT_FOUND", "ERR_GPU_IS_LOST", "ERR_NOT_SUPPORTED", "FUTURE_TOLERANCE_S",
    "INIT_RETRY_S", "LOST_RETRY_FACTOR", "LOST_RETRY_MAX_S", "LOST_RETRY_S", "MIG_LAYOUT_REFRESH_S", "NO_INSTANCE",
    "NVMLError", "POWER_SAMPLE_HZ", "PROC_PID_INIT_INO", "REINIT_INTERVAL_S", "RETRY_MAX_S", "RETRY_S",
    "GpuError", "GpuErrorKind", "GpuOpening", "GpuSource", "GpuVendor", "NvidiaVendor", "NvmlGpuSource",
    "PowerIntegrator", "nvml_error", "nvml_error_text", "open_gpu_source", "open_gpu_sources",
    "pid_namespace_is_initial", "proc_pid_exists", "process_struct_ok", "pynvml",
]
