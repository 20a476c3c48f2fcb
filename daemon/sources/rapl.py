"""CPU package and DRAM energy from Intel/AMD RAPL counters in the Linux powercap tree.

``RaplSource`` reads ``energy_uj`` of each zone under a powercap root
(``/sys/class/powercap`` or a directory shaped like it) and returns the joules used
since the previous read, correcting for the counter wrapping at
``max_energy_range_uj``. ``probe_rapl`` tells the CPU source factory whether RAPL is
usable, absent, or present but denied.

Which zones count (zones overlap; nothing is counted twice):

- ``intel-rapl:N`` named ``package-…`` → kind ``cpu``, device = the zone name
  (``package-0``);
- ``intel-rapl:N:M`` named ``dram`` under a package → kind ``dram``, device
  ``dram-<package number>`` (``dram-0``);
- ``core`` and ``uncore`` subzones are ignored: they are inside the package figure;
- ``psys`` (whole platform) is ignored when any package zone exists; when it is the
  only usable zone it is read alone as kind ``cpu``, device ``psys`` (it already
  contains the memory, so no dram zone is paired with it);
- ``intel-rapl-mmio:*`` zones are skipped: they duplicate the MSR zones.

Subzones are found both flat (``ROOT/intel-rapl:0:1``, as in ``/sys/class/powercap``)
and nested (``ROOT/intel-rapl:0/intel-rapl:0:1``, as under
``/sys/devices/virtual/powercap/intel-rapl``).

``energy_uj`` is opened afresh on every read, so a writer that updates it in place
and one that replaces it atomically (new inode) are both seen. A gap between two
successful reads of one zone keeps its baseline, so a zone that fails for a tick
loses nothing, as long as the gap is shorter than one wrap period (minutes at full
power: 262,143,328,850 µJ on Intel, 65.5e9 µJ on an AMD EPYC 7543). Two wraps
between two reads cannot be told from one: the daemon reads every second, far more
often than any zone wraps.

A zone whose ``energy_uj`` vanishes (module unloaded, zone removed) is different: when
it comes back its counter may have restarted, and a value below the old one would be
taken for a wrap worth up to a whole range. Its baseline is therefore dropped when it
vanishes, and it starts afresh (0 J for the gap, not a guess) when it is back.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from ..model import Component, DeviceReading
from .base import CounterDiff, SourceError

ProbeStatus = Literal["ok", "absent", "denied"]

_ZONE_RE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")


@dataclass(frozen=True, slots=True)
class RaplZone:
    """One powercap zone that wattprint reads."""

    zone_id: str  # "intel-rapl:0", "intel-rapl:0:1"
    path: str  # the zone's directory
    name: str  # content of its name file: "package-0", "dram", "psys"
    kind: Component  # "cpu" or "dram"
    device: str  # "package-0", "dram-0", "psys"
    max_energy_range_uj: int | None  # None: unreadable, wraps cannot be corrected
    max_problem: str = ""  # why max_energy_range_uj is None

    @property
    def energy_path(self) -> str:
        return os.path.join(self.path, "energy_uj")


def denied_detail(energy_path: str) -> str:
    """The message shown everywhere when energy_uj is not readable for this user."""
    return (
        f"{energy_path}: permission denied — energy_uj is root-only since Linux 5.10 "
        "(CVE-2020-8694); run wattprint as root or with CAP_DAC_READ_SEARCH"
    )


def _read_text(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("ascii", errors="replace").strip()


def _read_max(zone_dir: str) -> tuple[int | None, str]:
    path = os.path.join(zone_dir, "max_energy_range_uj")
    try:
        text = _read_text(path)
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}; counter wraps cannot be corrected"
    try:
        value = int(text)
    except ValueError:
        return None, f"{path}: not an integer: {text[:40]!r}; counter wraps cannot be corrected"
    if value <= 0:
        return None, f"{path}: {value} is not a positive range; counter wraps cannot be corrected"
    return value, ""


def _zone_key(zone_id: str) -> tuple[int, int]:
    m = _ZONE_RE.match(zone_id)
    assert m is not None
    return int(m.group(1)), -1 if m.group(2) is None else int(m.group(2))


def discover_zones(powercap_root: str) -> list[RaplZone]:
    """The zones under ``powercap_root`` that wattprint reads, in zone order; [] when
    the root is missing or holds no usable RAPL zone. Never reads energy_uj."""
    try:
        entries = os.listdir(powercap_root)
    except OSError:
        return []
    dirs: dict[str, str] = {}  # zone id -> directory
    for entry in entries:
        if _ZONE_RE.match(entry):
            dirs[entry] = os.path.join(powercap_root, entry)
    for zone_id, path in list(dirs.items()):  # nested subzones (…/intel-rapl:0/intel-rapl:0:1)
        if _zone_key(zone_id)[1] != -1:
            continue
        try:
            children = os.listdir(path)
        except OSError:
            continue
        for child in children:
            m = _ZONE_RE.match(child)
            if m and m.group(2) is not None and f"intel-rapl:{m.group(1)}" == zone_id:
                dirs.setdefault(child, os.path.join(path, child))

    names: dict[str, str] = {}
    for zone_id, path in dirs.items():
        try:
            names[zone_id] = _read_text(os.path.join(path, "name"))
        except OSError:
            continue  # not a zone we can identify

    packages: list[RaplZone] = []
    drams: list[RaplZone] = []
    psys: list[RaplZone] = []
    for zone_id in sorted(names, key=_zone_key):
        name = names[zone_id]
        path = dirs[zone_id]
        top, sub = _zone_key(zone_id)
        if sub == -1:
            if name.startswith("package-"):
                max_uj, why = _read_max(path)
                packages.append(RaplZone(zone_id, path, name, "cpu", name, max_uj, why))
            elif name == "psys":
                max_uj, why = _read_max(path)
                psys.append(RaplZone(zone_id, path, name, "cpu", "psys", max_uj, why))
        elif name == "dram":
            parent = names.get(f"intel-rapl:{top}", "")
            if parent.startswith("package-"):
                max_uj, why = _read_max(path)
                device = "dram-" + parent.removeprefix("package-")
                drams.append(RaplZone(zone_id, path, name, "dram", device, max_uj, why))
        # core / uncore / anything else: inside the package figure, ignored
    if packages:
        return sorted(packages + drams, key=lambda z: _zone_key(z.zone_id))
    return psys[:1]


def _read_energy_uj(zone: RaplZone) -> int:
    """energy_uj of one zone. Raises SourceError (permanent) on permission denied,
    FileNotFoundError when the zone vanished, ValueError/OSError otherwise."""
    path = zone.energy_path
    try:
        text = _read_text(path)
    except PermissionError:
        raise SourceError(denied_detail(path), permanent=True) from None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{path}: not an integer: {text[:40]!r}") from None
    if value < 0:
        raise ValueError(f"{path}: negative energy {value}")
    return value


def probe_rapl(powercap_root: str) -> tuple[ProbeStatus, str]:
    """Whether RAPL can be read under ``powercap_root``: ("ok", zones found),
    ("absent", why) or ("denied", the permission message)."""
    zones = discover_zones(powercap_root)
    if not zones:
        return "absent", f"no powercap zones under {powercap_root}"
    readable: list[str] = []
    failures: list[str] = []
    for zone in zones:
        try:
            _read_energy_uj(zone)
        except SourceError as exc:
            return "denied", exc.detail
        except FileNotFoundError:
            failures.append(f"{zone.energy_path}: not found")
        except ValueError as exc:
            failures.append(str(exc))
        except OSError as exc:
            failures.append(f"{zone.energy_path}: {exc.strerror or exc}")
        else:
            readable.append(zone.device)
    if not readable:
        return "absent", f"no readable RAPL zone under {powercap_root}: " + "; ".join(failures)
    return "ok", f"{', '.join(readable)} under {powercap_root}"


@dataclass
class _ZoneState:
    zone: RaplZone
    diff: CounterDiff
    last_ok_mono_s: float | None = None


@dataclass
class _ReadResult:
    readings: list[DeviceReading] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    vanished: int = 0


class RaplSource:
    """Source "rapl": package (kind cpu) and dram energy from powercap counters.

    ``include_cpu`` / ``include_dram`` choose which zone kinds are reported, so that
    the factory never books DRAM twice (RAPL dram and a DRAM estimate) and can read
    RAPL dram alone. The constructor never fails: a missing or denied tree makes every
    ``read()`` raise ``SourceError``, so /healthz shows the source degraded.
    """

    name = "rapl"

    def __init__(self, powercap_root: str, *, include_cpu: bool = True, include_dram: bool = True) -> None:
        self.powercap_root = powercap_root
        self.include_cpu = include_cpu
        self.include_dram = include_dram
        self._states: list[_ZoneState] = []
        self._problems: list[str] = []
        self._discover()

    @property
    def zones(self) -> tuple[RaplZone, ...]:
        """The zones this source currently reads (after include_cpu/include_dram)."""
        return tuple(s.zone for s in self._states)

    def _wanted(self, zone: RaplZone) -> bool:
        return self.include_cpu if zone.kind == "cpu" else self.include_dram

    def _discover(self) -> None:
        self._states = [
            _ZoneState(zone=z, diff=CounterDiff(max_value=z.max_energy_range_uj))
            for z in discover_zones(self.powercap_root)
            if self._wanted(z)
        ]

    def _nothing_detail(self) -> str:
        wanted = "+".join(k for k, on in (("package", self.include_cpu), ("dram", self.include_dram)) if on)
        return f"no RAPL {wanted} zones under {self.powercap_root}"

    def _read_states(self, now_mono_s: float) -> _ReadResult:
        out = _ReadResult()
        for st in self._states:
            zone = st.zone
            label = f"{zone.zone_id} ({zone.device})"
            if zone.max_problem:
                out.problems.append(f"{label}: {zone.max_problem}")
            try:
                uj = _read_energy_uj(zone)  # SourceError (denied) propagates: loud
            except FileNotFoundError:
                out.vanished += 1
                out.problems.append(f"{label}: vanished ({zone.energy_path} not found)")
                # Its counter may restart when it comes back: never read that as a wrap.
                st.diff = CounterDiff(max_value=zone.max_energy_range_uj)
                st.last_ok_mono_s = None
                continue
            except ValueError as exc:
                out.problems.append(f"{label}: {exc}")
                continue
            except OSError as exc:
                out.problems.append(f"{label}: {zone.energy_path}: {exc.strerror or exc}")
                continue
            delta_uj = st.diff.update(uj)
            prev_mono_s, st.last_ok_mono_s = st.last_ok_mono_s, now_mono_s
            if delta_uj is None:
                if prev_mono_s is not None:  # went backwards with no known range
                    out.problems.append(f"{label}: counter went backwards; re-baselined")
                energy_j, interval_s = 0.0, 0.0
            else:
                energy_j = delta_uj / 1e6
                interval_s = max(0.0, now_mono_s - prev_mono_s) if prev_mono_s is not None else 0.0
            power_w = energy_j / interval_s if interval_s > 0 else 0.0
            out.readings.append(DeviceReading(
                kind=zone.kind, device=zone.device, energy_j=energy_j, power_w=power_w,
                source="counter", interval_s=interval_s, name=zone.zone_id,
            ))
        return out

    def read(self, now_mono_s: float) -> list[DeviceReading]:
        if not self._states:
            self._discover()
            if not self._states:
                self._problems = [self._nothing_detail()]
                raise SourceError(self._nothing_detail())
        result = self._read_states(now_mono_s)
        if result.vanished == len(self._states):  # every zone gone: look again
            self._discover()
            if self._states:
                again = self._read_states(now_mono_s)
                result = _ReadResult(again.readings, result.problems + again.problems, again.vanished)
        self._problems = result.problems
        if not result.readings:
            raise SourceError("; ".join(result.problems) or self._nothing_detail())
        return result.readings

    def problems(self) -> list[str]:
        return list(self._problems)

    def close(self) -> None:
        self._states = []
