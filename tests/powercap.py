"""Test helper: a fake ``/sys/class/powercap`` tree in a directory, with counters that
tests (or a background feeder thread) advance at known rates.

Layout, as the kernel's class directory shows it (flat)::

    ROOT/intel-rapl:0/{name=package-0, energy_uj, max_energy_range_uj}
    ROOT/intel-rapl:0:0/{name=core, ...}       (add_package(core=True))
    ROOT/intel-rapl:0:1/{name=dram, ...}       (add_package(dram=True))

Point ``[cpu] powercap_root`` (or ``RaplSource``) at ``tree.root``.

Writes are atomic: each new ``energy_uj`` value goes to a temporary file in the zone
directory, gets the old file's mode, and is renamed over ``energy_uj`` (new inode).
A reader therefore never sees a torn or empty value; ``RaplSource`` opens the file
afresh on every read, so it sees each new inode.

Counters wrap like RAPL's: ``advance`` adds modulo ``max_energy_range_uj``, so the
value stays in ``0 .. max-1`` and a reader's ``(max - prev) + cur`` recovers the
exact increase.

Usage from an end-to-end test::

    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0)                 # {"package": "intel-rapl:0", "core": ..., "dram": ...}
    feed = tree.start_feeding({zones["package"]: 120.0, zones["dram"]: 6.0})
    ...                                         # run the daemon against tree.root
    feed.stop()
    assert abs(measured_j - feed.fed_j(zones["package"])) < tolerance
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

INTEL_MAX_ENERGY_RANGE_UJ = 262_143_328_850  # a real Intel package's range
AMD_MAX_ENERGY_RANGE_UJ = 65_532_610_987  # AMD EPYC 7543, about 65.5e9


class PowercapTree:
    """A fake powercap tree rooted at ``root`` (created if missing). Thread-safe."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._lock = threading.RLock()
        self._max_uj: dict[str, int] = {}

    # -- building ---------------------------------------------------------------

    def add_zone(self, zone: str, name: str, max_energy_range_uj: int = INTEL_MAX_ENERGY_RANGE_UJ,
                 start_uj: int = 0) -> str:
        """Create one zone directory ``ROOT/<zone>`` with its three files; return ``zone``."""
        if not 0 <= start_uj < max_energy_range_uj:
            raise ValueError(f"start_uj {start_uj} outside 0..{max_energy_range_uj - 1}")
        with self._lock:
            d = self.root / zone
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o755)
            self._write_file(d / "name", f"{name}\n", 0o444)
            self._write_file(d / "max_energy_range_uj", f"{max_energy_range_uj}\n", 0o444)
            self._write_file(d / "energy_uj", f"{start_uj}\n", 0o644)
            self._max_uj[zone] = max_energy_range_uj
        return zone

    def add_package(self, n: int, max_energy_range_uj: int = INTEL_MAX_ENERGY_RANGE_UJ, dram: bool = True,
                    core: bool = True, start_uj: int = 0) -> dict[str, str]:
        """Package ``n`` (``intel-rapl:n``, name ``package-n``), with subzones
        ``intel-rapl:n:0`` core and ``intel-rapl:n:1`` dram when asked (the dram zone
        keeps index 1 even without core). All zones share the range and start value.
        Returns zone ids by role: {"package": ..., "core": ..., "dram": ...}."""
        zones = {"package": self.add_zone(f"intel-rapl:{n}", f"package-{n}", max_energy_range_uj, start_uj)}
        if core:
            zones["core"] = self.add_zone(f"intel-rapl:{n}:0", "core", max_energy_range_uj, start_uj)
        if dram:
            zones["dram"] = self.add_zone(f"intel-rapl:{n}:1", "dram", max_energy_range_uj, start_uj)
        return zones

    def add_psys(self, n: int = 1, max_energy_range_uj: int = INTEL_MAX_ENERGY_RANGE_UJ, start_uj: int = 0) -> str:
        """A platform zone ``intel-rapl:n`` named ``psys``."""
        return self.add_zone(f"intel-rapl:{n}", "psys", max_energy_range_uj, start_uj)

    def set_constraint(self, zone: str, n: int, *, power_limit_uw: int | None = None,
                       max_power_uw: int | None = None, name: str = "long_term") -> None:
        """Write ``constraint_<n>_*`` files of ``zone`` (as the kernel shows PL1/PL2/PL4):
        ``constraint_<n>_name`` and, when given, ``constraint_<n>_power_limit_uw`` and
        ``constraint_<n>_max_power_uw``."""
        with self._lock:
            d = self.root / zone
            self._write_file(d / f"constraint_{n}_name", f"{name}\n", 0o444)
            if power_limit_uw is not None:
                self._write_file(d / f"constraint_{n}_power_limit_uw", f"{power_limit_uw}\n", 0o644)
            if max_power_uw is not None:
                self._write_file(d / f"constraint_{n}_max_power_uw", f"{max_power_uw}\n", 0o444)

    def remove_zone(self, zone: str) -> None:
        """Delete a zone directory (a zone vanishing, as on module unload)."""
        with self._lock:
            shutil.rmtree(self.root / zone)
            self._max_uj.pop(zone, None)

    def make_energy_root_only(self) -> None:
        """chown root and chmod 0400 every energy_uj, as Linux >= 5.10 does
        (CVE-2020-8694). Directories and the other files stay world-readable."""
        with self._lock:
            for path in self.root.glob("*/energy_uj"):
                os.chown(path, 0, 0)
                os.chmod(path, 0o400)

    # -- counters ---------------------------------------------------------------

    def max_energy_range_uj(self, zone: str) -> int:
        with self._lock:
            if zone not in self._max_uj:
                self._max_uj[zone] = int((self.root / zone / "max_energy_range_uj").read_text().strip())
            return self._max_uj[zone]

    def energy(self, zone: str) -> int:
        """Current ``energy_uj`` of ``zone``."""
        with self._lock:
            return int((self.root / zone / "energy_uj").read_text().strip())

    def set_energy(self, zone: str, uj: int) -> None:
        """Write ``energy_uj`` of ``zone`` (atomically; see the module docstring)."""
        if uj < 0:
            raise ValueError(f"negative energy {uj}")
        with self._lock:
            path = self.root / zone / "energy_uj"
            mode = stat.S_IMODE(os.stat(path).st_mode)
            self._write_file(path, f"{int(uj)}\n", mode)

    def advance(self, zone: str, uj: int) -> int:
        """Add ``uj`` microjoules to ``zone``, wrapping at its ``max_energy_range_uj``;
        return the new value. ``uj`` must be below the range (one wrap at most)."""
        if uj < 0:
            raise ValueError(f"negative advance {uj}")
        with self._lock:
            max_uj = self.max_energy_range_uj(zone)
            if uj >= max_uj:
                raise ValueError(f"advance {uj} would wrap more than once (range {max_uj})")
            new = (self.energy(zone) + int(uj)) % max_uj
            self.set_energy(zone, new)
            return new

    def start_feeding(self, rates_w: dict[str, float], period_s: float = 0.1) -> "Feeder":
        """Advance each zone at ``rates_w[zone]`` watts from a background thread,
        every ``period_s`` seconds, by rate × elapsed time (time.monotonic). Call
        ``.stop()`` on the handle; ``.fed_j(zone)`` is the energy written so far."""
        return Feeder(self, rates_w, period_s)

    # -- internals --------------------------------------------------------------

    def _write_file(self, path: Path, text: str, mode: int) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


class Feeder:
    """Background thread that advances zones at constant power. Use ``stop()``
    (or ``with tree.start_feeding(...) as feed:``)."""

    def __init__(self, tree: PowercapTree, rates_w: dict[str, float], period_s: float = 0.1) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be positive")
        for zone, rate in rates_w.items():
            if rate < 0:
                raise ValueError(f"{zone}: negative rate {rate}")
            tree.max_energy_range_uj(zone)  # fail now for an unknown zone
        self._tree = tree
        self._rates_w = dict(rates_w)
        self._period_s = period_s
        self._lock = threading.Lock()
        self._fed_uj: dict[str, int] = {zone: 0 for zone in rates_w}
        self._start_mono_s = time.monotonic()
        self._stop = threading.Event()
        self.error: BaseException | None = None  # set if the thread died
        self._thread = threading.Thread(target=self._run, name="powercap-feeder", daemon=True)
        self._thread.start()

    def _feed_until(self, now_mono_s: float) -> None:
        elapsed_s = now_mono_s - self._start_mono_s
        with self._lock:
            for zone, rate_w in self._rates_w.items():
                target_uj = round(rate_w * elapsed_s * 1e6)  # total due since start: no drift
                step_uj = target_uj - self._fed_uj[zone]
                if step_uj > 0:
                    self._tree.advance(zone, step_uj)
                    self._fed_uj[zone] = target_uj

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._period_s):
                self._feed_until(time.monotonic())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        """Feed up to now, stop the thread and wait for it. Raises if it had died."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            if self.error is None:
                self._feed_until(time.monotonic())
        if self.error is not None:
            raise RuntimeError(f"powercap feeder failed: {self.error!r}") from self.error

    def fed_j(self, zone: str) -> float:
        """Joules written into ``zone`` so far (exactly what its counter gained)."""
        with self._lock:
            return self._fed_uj[zone] / 1e6

    def __enter__(self) -> "Feeder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
