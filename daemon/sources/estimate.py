"""CPU and DRAM energy estimated from rated power, for machines without RAPL counters
(VMs, most clouds, containers that hide powercap). Every reading is labelled
``source = "estimate"``.

Where the constants come from:

- CPU: power = TDP × (0.1 + 0.9·load³), the load curve CodeCarbon uses, with its
  85 W default TDP for unknown CPUs (``[cpu] tdp_w``). ``load`` is the non-idle share
  of all CPU time between two reads, from the aggregate ``cpu`` line of /proc/stat
  (idle = idle + iowait; total = user + nice + system + idle + iowait + irq + softirq
  + steal; guest time is already inside user/nice).
- DRAM: power = W/GB × installed GiB, 0.375 W/GB by default (CodeCarbon: 3 W per
  8 GB; Cloud Carbon Footprint uses 0.392 W/GB) (``[memory] w_per_gb``).

Energy = power × the interval between reads; the first read only sets the baseline
(energy 0).
"""

from __future__ import annotations

from typing import Callable

from ..model import DeviceReading
from .base import SourceError

DEFAULT_TDP_W = 85.0  # CodeCarbon's default for CPUs it does not know
DEFAULT_DRAM_W_PER_GB = 0.375  # 3 W per 8 GB
_GIB = 1 << 30


def cpu_power_w(tdp_w: float, load: float) -> float:
    """CodeCarbon's curve: TDP × (0.1 + 0.9·load³), load clamped to 0..1."""
    load = min(1.0, max(0.0, load))
    return tdp_w * (0.1 + 0.9 * load ** 3)


def read_proc_stat(path: str = "/proc/stat") -> tuple[int, int]:
    """(idle ticks, total ticks) of all CPUs together since boot, from /proc/stat."""
    with open(path, "r", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("cpu "):
                values = [int(v) for v in line.split()[1:9]]
                values += [0] * (8 - len(values))  # very old kernels lack steal etc.
                user, nice, system, idle, iowait, irq, softirq, steal = values
                return idle + iowait, user + nice + system + idle + iowait + irq + softirq + steal
    raise ValueError(f"{path}: no aggregate 'cpu' line")


class CpuEstimateSource:
    """Source "cpu-estimate": one device ``cpu`` (kind cpu), power from TDP and load.

    ``read_proc_stat`` returns (idle ticks, total ticks) and is injectable for tests.
    """

    name = "cpu-estimate"

    def __init__(self, tdp_w: float = DEFAULT_TDP_W,
                 read_proc_stat: Callable[[], tuple[int, int]] = read_proc_stat) -> None:
        self.tdp_w = tdp_w
        self._read_proc_stat = read_proc_stat
        self._last_mono_s: float | None = None
        self._last_ticks: tuple[int, int] | None = None
        self._load = 0.0  # kept when an interval has no ticks (very short interval)

    def read(self, now_mono_s: float) -> list[DeviceReading]:
        try:
            idle, total = self._read_proc_stat()
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read CPU load from /proc/stat: {exc}") from None
        prev_mono_s, prev_ticks = self._last_mono_s, self._last_ticks
        self._last_mono_s, self._last_ticks = now_mono_s, (idle, total)
        if prev_mono_s is None or prev_ticks is None:
            return [self._reading(0.0, 0.0, 0.0)]
        d_idle, d_total = idle - prev_ticks[0], total - prev_ticks[1]
        if d_total > 0 and d_idle >= 0:
            self._load = min(1.0, max(0.0, 1.0 - d_idle / d_total))
        interval_s = max(0.0, now_mono_s - prev_mono_s)
        power_w = cpu_power_w(self.tdp_w, self._load)
        return [self._reading(power_w * interval_s, power_w, interval_s)]

    @property
    def load(self) -> float:
        """CPU load (0..1) over the last interval."""
        return self._load

    def _reading(self, energy_j: float, power_w: float, interval_s: float) -> DeviceReading:
        return DeviceReading(
            kind="cpu", device="cpu", energy_j=energy_j, power_w=power_w, source="estimate",
            interval_s=interval_s, name=f"estimate: TDP {self.tdp_w:g} W x (0.1 + 0.9 load^3)",
        )

    def problems(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def installed_memory_bytes(meminfo: str = "/proc/meminfo") -> int:
    """Installed memory in bytes: ``MemTotal`` of /proc/meminfo (kB x 1024), what
    ``psutil.virtual_memory().total`` reports on Linux; psutil itself (imported only
    here, issue 18: 0.9 MiB of RSS for a daemon that never calls it) where that file
    cannot be read or has no such line."""
    try:
        with open(meminfo, "rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import psutil

    return int(psutil.virtual_memory().total)


class DramEstimateSource:
    """Source "dram-estimate": one device ``dram`` (kind dram) at W/GB × installed GiB."""

    name = "dram-estimate"

    def __init__(self, w_per_gb: float = DEFAULT_DRAM_W_PER_GB, total_bytes: int | None = None) -> None:
        self.w_per_gb = w_per_gb
        self.total_bytes = installed_memory_bytes() if total_bytes is None else total_bytes
        self.power_w = w_per_gb * self.total_bytes / _GIB
        self._last_mono_s: float | None = None

    def read(self, now_mono_s: float) -> list[DeviceReading]:
        prev_mono_s, self._last_mono_s = self._last_mono_s, now_mono_s
        if prev_mono_s is None:
            return [self._reading(0.0, 0.0, 0.0)]
        interval_s = max(0.0, now_mono_s - prev_mono_s)
        return [self._reading(self.power_w * interval_s, self.power_w, interval_s)]

    def _reading(self, energy_j: float, power_w: float, interval_s: float) -> DeviceReading:
        gib = self.total_bytes / _GIB
        return DeviceReading(
            kind="dram", device="dram", energy_j=energy_j, power_w=power_w, source="estimate",
            interval_s=interval_s, name=f"estimate: {self.w_per_gb:g} W/GB x {gib:.1f} GiB",
        )

    def problems(self) -> list[str]:
        return []

    def close(self) -> None:
        pass
