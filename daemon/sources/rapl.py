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

Counter trust. Every step of a counter is bounded by physics: the zone cannot use
more than ``max_power_w × (PHYSICS_MARGIN × elapsed_s + PHYSICS_SLACK_S)`` joules
between two reads, where ``max_power_w`` is the largest of the zone's
``constraint_*_max_power_uw`` and ``constraint_*_power_limit_uw`` (a package's PL1,
PL2 and, where present, PL4) or, when it has none, ``DEFAULT_MAX_POWER_W`` for its
kind (1000 W for a package, 2000 W for psys, 500 W for dram: above any shipping
part). Each reading is classified by ``CounterDiff.step``:

- ``first``: the baseline (the first read after start, or after a zone came back): 0 J;
- ``difference`` / ``wrapped``: trusted; a wrap is accepted only when
  ``(max − prev) + cur`` is within the bound, so a counter that steps back by 1 J is
  never booked as a near-whole range (262 kJ on Intel);
- ``implausible`` (reason ``backwards``: down by less than a plausible wrap;
  ``above_range``: a value above ``max_energy_range_uj``, or a step down from one;
  ``jump``: up by more than the bound) and ``reset`` (down, with no readable range):
  not trusted. The new value becomes the baseline (a re-baseline), and the
  interval's energy is the zone's last trusted power × the interval (0 J when there
  is none yet; never more than the bound), labelled ``source = "estimate"`` for that
  interval.

An untrusted step is counted in ``counter_glitches()`` (the engine exports it as
``wattprint_counter_glitches_total{source="rapl",device,reason}``), named in
``problems()`` (so /healthz shows "rapl" degraded with the episode's first reason),
and logged with its numbers once per episode per zone (one line when it starts, one
when the counter is trusted again). An episode ends after ``glitch_hold_s`` (``[cpu]
glitch_hold_s``, default 60 s) without another untrusted step: a counter that
glitches every few seconds is one degraded episode, not a degraded/ok pair (and two
log lines) per glitch.
No reading ever has negative energy, so no device total ever decreases.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from ..model import Component, DeviceReading
from .base import CounterDiff, CounterGlitches, CounterStepKind, SourceError

log = logging.getLogger("wattprint.sources.rapl")

ProbeStatus = Literal["ok", "absent", "denied"]

_ZONE_RE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")
_CONSTRAINT_RE = re.compile(r"^constraint_\d+_(?:max_power|power_limit)_uw$")

# Physics bound of one step (see the module docstring). Generous on purpose: a bound
# that is too tight would replace real energy by an estimate.
DEFAULT_MAX_POWER_W: dict[str, float] = {"package": 1000.0, "psys": 2000.0, "dram": 500.0}
PHYSICS_MARGIN = 2.0  # x the elapsed time between the two reads
PHYSICS_SLACK_S = 1.0  # + this many seconds at max power (read scheduling jitter)

# Why a step was not trusted: the reason label, and the text shown in /healthz.
GLITCH_TEXT: dict[str, str] = {
    "backwards": "counter went back by less than a plausible wrap",
    "above_range": "counter above max_energy_range_uj",
    "jump": "counter rose faster than the zone's max power allows",
    "reset": "counter went back and its range is unknown",
}


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
    max_power_w: float = DEFAULT_MAX_POWER_W["package"]  # physics bound of one step
    max_power_basis: str = "default"  # the constraint file it came from, or "default"

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


def _read_max_power(zone_dir: str, role: str) -> tuple[float, str]:
    """The zone's max power in watts and where it came from: the largest positive
    ``constraint_*_max_power_uw`` / ``constraint_*_power_limit_uw``, else the default
    for ``role`` (package, psys, dram)."""
    best_uw, basis = 0, ""
    try:
        names = sorted(os.listdir(zone_dir))
    except OSError:
        names = []
    for name in names:
        if not _CONSTRAINT_RE.match(name):
            continue
        try:
            value = int(_read_text(os.path.join(zone_dir, name)))
        except (OSError, ValueError):
            continue
        if value > best_uw:
            best_uw, basis = value, name
    if best_uw > 0:
        return best_uw / 1e6, basis
    return DEFAULT_MAX_POWER_W[role], f"default for {role} zones"


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
                power_w, basis = _read_max_power(path, "package")
                packages.append(RaplZone(zone_id, path, name, "cpu", name, max_uj, why, power_w, basis))
            elif name == "psys":
                max_uj, why = _read_max(path)
                power_w, basis = _read_max_power(path, "psys")
                psys.append(RaplZone(zone_id, path, name, "cpu", "psys", max_uj, why, power_w, basis))
        elif name == "dram":
            parent = names.get(f"intel-rapl:{top}", "")
            if parent.startswith("package-"):
                max_uj, why = _read_max(path)
                power_w, basis = _read_max_power(path, "dram")
                device = "dram-" + parent.removeprefix("package-")
                drams.append(RaplZone(zone_id, path, name, "dram", device, max_uj, why, power_w, basis))
        # core / uncore / anything else: inside the package figure, ignored
    if packages:
        return sorted(packages + drams, key=lambda z: _zone_key(z.zone_id))
    return psys[:1]


def _read_energy_uj(zone: RaplZone) -> int:
    """energy_uj of one zone. Raises SourceError on permission denied (loud: the
    whole source is degraded until it is fixed),
    FileNotFoundError when the zone vanished, ValueError/OSError otherwise."""
    path = zone.energy_path
    try:
        text = _read_text(path)
    except PermissionError:
        raise SourceError(denied_detail(path)) from None
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
    trusted_power_w: float | None = None  # power of the last trusted interval
    glitching: bool = False  # in an episode of untrusted steps (logged once)
    glitch_text: str = ""  # the episode's problem text (its first reason): stable, so logged once
    last_glitch_mono_s: float = 0.0  # when the latest untrusted step of the episode was read

    def restart(self) -> None:
        """Forget the baseline (the zone vanished: its counter may restart)."""
        self.diff = CounterDiff(max_value=self.zone.max_energy_range_uj)
        self.last_ok_mono_s = None
        self.trusted_power_w = None
        self.glitching = False
        self.glitch_text = ""

    def max_delta_uj(self, elapsed_s: float) -> int:
        """The most a counter of this zone can rise in ``elapsed_s`` (physics bound)."""
        return int(self.zone.max_power_w * (PHYSICS_MARGIN * elapsed_s + PHYSICS_SLACK_S) * 1e6)


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

    def __init__(self, powercap_root: str, *, include_cpu: bool = True, include_dram: bool = True,
                 glitch_hold_s: float = 0.0) -> None:
        self.powercap_root = powercap_root
        self.glitch_hold_s = glitch_hold_s
        self.include_cpu = include_cpu
        self.include_dram = include_dram
        self._states: list[_ZoneState] = []
        self._problems: list[str] = []
        self._glitches: CounterGlitches = {}  # replaced, never mutated (read from another thread)
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
                st.restart()
                continue
            except ValueError as exc:
                out.problems.append(f"{label}: {exc}")
                continue
            except OSError as exc:
                out.problems.append(f"{label}: {zone.energy_path}: {exc.strerror or exc}")
                continue
            out.readings.append(self._step(st, uj, now_mono_s, label, out.problems))
        return out

    def _step(self, st: _ZoneState, uj: int, now_mono_s: float, label: str, problems: list[str]) -> DeviceReading:
        """One zone's reading from its new counter value (see "Counter trust")."""
        zone = st.zone
        prev_uj = st.diff.last
        prev_mono_s, st.last_ok_mono_s = st.last_ok_mono_s, now_mono_s
        interval_s = max(0.0, now_mono_s - prev_mono_s) if prev_mono_s is not None else 0.0
        max_delta_uj = st.max_delta_uj(interval_s)
        step = st.diff.step(uj, max_delta_uj)
        if step.kind is CounterStepKind.FIRST:
            return self._reading(zone, 0.0, 0.0, 0.0, "counter")
        if step.delta is not None:  # difference or wrapped: trusted
            energy_j = step.delta / 1e6
            power_w = energy_j / interval_s if interval_s > 0 else 0.0
            if interval_s > 0:
                st.trusted_power_w = power_w
            if st.glitching:
                if now_mono_s - st.last_glitch_mono_s >= self.glitch_hold_s:
                    st.glitching = False
                    log.info("%s: counter trusted again", label)
                else:  # the episode holds: the same problem, so health neither flaps nor logs again
                    problems.append(st.glitch_text)
            return self._reading(zone, energy_j, power_w, interval_s, "counter")

        # Not trusted: re-baselined (the diff keeps the new value); estimate the interval.
        reason = step.reason or "reset"
        key = (zone.device, reason)
        self._glitches = {**self._glitches, key: self._glitches.get(key, 0) + 1}
        power_w = st.trusted_power_w or 0.0
        energy_j = min(power_w * interval_s, max_delta_uj / 1e6)  # never beyond the bound either
        how = (f"the last trusted power ({power_w:.1f} W) x {interval_s:.3g} s" if st.trusted_power_w is not None
               else "0 J (no trusted power yet)")
        st.last_glitch_mono_s = now_mono_s
        if not st.glitching:
            st.glitch_text = (f"{label}: {GLITCH_TEXT[reason]}; re-baselined, the interval's energy estimated "
                              "from the last trusted power (source=estimate)")
        problems.append(st.glitch_text)
        bound = (f"bound {max_delta_uj} uJ = {zone.max_power_w:g} W ({zone.max_power_basis}) "
                 f"x ({PHYSICS_MARGIN:g} x {interval_s:.3g} s + {PHYSICS_SLACK_S:g} s)")
        if not st.glitching:
            st.glitching = True
            log.warning("%s: %s: energy_uj %s -> %d (range %s, %s); interval booked as %s "
                        "(counted in wattprint_counter_glitches_total; logged again when trusted again)",
                        label, GLITCH_TEXT[reason], prev_uj, uj, zone.max_energy_range_uj, bound, how)
        else:
            log.debug("%s: %s: energy_uj %s -> %d; %s", label, GLITCH_TEXT[reason], prev_uj, uj, bound)
        return self._reading(zone, energy_j, power_w, interval_s, "estimate")

    @staticmethod
    def _reading(zone: RaplZone, energy_j: float, power_w: float, interval_s: float,
                 source: Literal["counter", "estimate"]) -> DeviceReading:
        return DeviceReading(
            kind=zone.kind, device=zone.device, energy_j=max(0.0, energy_j), power_w=max(0.0, power_w),
            source=source, interval_s=interval_s, name=zone.zone_id,
        )

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

    def counter_glitches(self) -> CounterGlitches:
        """(device, reason) -> untrusted steps since start (see "Counter trust")."""
        return self._glitches

    def close(self) -> None:
        self._states = []
