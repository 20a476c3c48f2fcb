"""Energy sources: GPU (NVML), CPU and DRAM (RAPL powercap), and estimates."""
