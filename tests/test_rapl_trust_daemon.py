"""RAPL counter trust in the REAL daemon process (issue 11): a powercap counter that
steps back by 1 J, goes above ``max_energy_range_uj`` and then wraps, and jumps by an
impossible amount, while the test feeds it at a known constant power.

Truth is what the test wrote: ``power x time`` between two ticks of the daemon (the
counter's glitches move the counter, not the energy). Checked:

- the package's energy in /api/v1/host over the window stays within a tolerance of
  that truth (each untrusted interval is estimated from the last trusted power);
- the device total in /api/v1/host never decreases between polls;
- /healthz shows "rapl" degraded with the reason while each glitch happens and ok
  after it; each episode is logged once (and once on recovery);
- ``wattprint_counter_glitches_total{source="rapl",device,reason}`` counts them.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon_harness import DaemonProcess, sample
from powercap import INTEL_MAX_ENERGY_RANGE_UJ, PowercapTree

RATE_W = 40.0
IDLE_W = 0.1
PKG = "intel-rapl:0"


class GlitchFeeder:
    """Writes ``energy_uj`` of one zone every 10 ms: ``offset + energy fed so far``,
    modulo the range unless the test holds it above the range. Power is constant
    per segment (``set_rate``); ``truth_j_at(wall time)`` is the energy fed by then.
    The glitches move ``offset`` (the counter), never the energy fed."""

    def __init__(self, tree: PowercapTree, zone: str, rate_w: float, start_uj: int) -> None:
        self.path = tree.root / zone / "energy_uj"
        self.max_uj = tree.max_energy_range_uj(zone)
        self._lock = threading.Lock()
        self._segments: list[tuple[float, float, float]] = [(time.time(), 0.0, rate_w)]  # (start, joules, watts)
        self._offset_uj = start_uj
        self._wrap = True
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def truth_j_at(self, wall: float) -> float:
        with self._lock:
            start, base_j, rate_w = next(seg for seg in reversed(self._segments) if seg[0] <= wall)
            return base_j + rate_w * (wall - start)

    def _truth_uj(self) -> int:
        start, base_j, rate_w = self._segments[-1]
        return round((base_j + rate_w * (time.time() - start)) * 1e6)

    def _write(self) -> None:
        with self._lock:
            value = self._offset_uj + self._truth_uj()
            if self._wrap:
                value %= self.max_uj
            tmp = self.path.with_name(".energy_uj.glitch")
            tmp.write_text(f"{value}\n")
            os.replace(tmp, self.path)

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.01):
                self._write()
        except BaseException as exc:
            self.error = exc

    def set_rate(self, rate_w: float) -> None:
        with self._lock:
            now = time.time()
            start, base_j, old_w = self._segments[-1]
            self._segments.append((now, base_j + old_w * (now - start), rate_w))

    def shift(self, delta_uj: int) -> None:
        """Move the counter by ``delta_uj`` (negative: it steps back) at once."""
        with self._lock:
            self._offset_uj += delta_uj
        self._write()

    def above_range(self, extra_uj: int) -> None:
        """From now on the counter reads ``max + extra_uj`` and climbs from there."""
        with self._lock:
            self._wrap = False
            self._offset_uj = self.max_uj + extra_uj - self._truth_uj()
        self._write()

    def wrap_to(self, uj: int) -> None:
        """The counter wraps to ``uj`` and counts normally again."""
        with self._lock:
            self._wrap = True
            self._offset_uj = uj - self._truth_uj()
        self._write()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"feeder failed: {self.error!r}")


def pkg_energy_j(host: dict[str, Any]) -> float:
    for d in host["devices"]:
        if (d["kind"], d["device"]) == ("cpu", "package-0"):
            return float(d["energy_j"])
    return 0.0


def rapl_part(daemon: DaemonProcess) -> dict[str, Any]:
    return {p["name"]: p for p in daemon.get("/healthz", allow_error=True)["parts"]}["rapl"]


def wait_rapl(daemon: DaemonProcess, state: str, contains: str = "", timeout_s: float = 10.0) -> dict[str, Any]:
    """Poll /healthz every 20 ms (a glitch degrades "rapl" for one tick, about 1 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        part = rapl_part(daemon)
        if part["state"] == state and contains in part["detail"]:
            return part
        if time.monotonic() > deadline:
            raise AssertionError(f"rapl not {state} ({contains!r}) after {timeout_s}s: {part}\n{daemon.log_tail()}")
        time.sleep(0.02)


def tick_point(daemon: DaemonProcess) -> tuple[float, float]:
    """(wall time of a tick, package energy in /api/v1/host through that tick), read
    between two ticks so that the store and the snapshot agree."""
    for _ in range(20):
        first = daemon.get("/healthz", allow_error=True)["tick"]
        deadline = time.monotonic() + 3.0
        while daemon.get("/healthz", allow_error=True)["tick"] == first and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # mid-way between ticks
        h1 = daemon.get("/healthz", allow_error=True)
        host = daemon.get("/api/v1/host")
        h2 = daemon.get("/healthz", allow_error=True)
        if h1["tick"] == h2["tick"]:
            return float(h1["last_tick_at"]), pkg_energy_j(host)
    raise AssertionError("no quiet moment between two ticks")


class HostPoller:
    """Polls /api/v1/host every 100 ms in the background; keeps every package total."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.seen: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.seen.append(pkg_energy_j(self.daemon.get("/api/v1/host")))
            except Exception as exc:  # reported by the test
                self.errors.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def log_lines(daemon: DaemonProcess, needle: str) -> list[str]:
    return [line for line in daemon.log_path.read_text(errors="replace").splitlines() if needle in line]


def test_rapl_counter_glitches_in_the_real_daemon(tmp_path: Path) -> None:
    tree = PowercapTree(tmp_path / "powercap")
    tree.add_package(0, dram=False, core=False, start_uj=100_000_000_000)
    feeder = GlitchFeeder(tree, PKG, RATE_W, start_uj=100_000_000_000)
    # Hold 0: each glitch is an episode of its own here (the hold has its own test).
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=tree.root,
                           env={"WATTPRINT_CPU_GLITCH_HOLD_S": "0"})
    poller: HostPoller | None = None
    try:
        daemon.start()
        wait_rapl(daemon, "ok")
        t_a, e_a = tick_point(daemon)
        poller = HostPoller(daemon)

        # 1. Back by 1 J: old code booked a whole range (+262,143 J) for it. At 40 W a
        #    tick adds 40 J, which would hide the step: the package idles at 0.1 W
        #    around it (for 2+ ticks first, so the last trusted power is the idle one).
        feeder.set_rate(IDLE_W)
        time.sleep(2.5)
        feeder.shift(-1_000_000)
        wait_rapl(daemon, "degraded", "went back by less than a plausible wrap")
        assert "package-0" in rapl_part(daemon)["detail"]
        wait_rapl(daemon, "ok")
        feeder.set_rate(RATE_W)
        time.sleep(2.5)  # the last trusted power is 40 W again before the next glitch

        # 2. Above max_energy_range_uj for a few ticks, then a wrap from there (old code:
        #    +5,000 J, then -5,000 J: a total that went down).
        feeder.above_range(5_000_000_000)
        wait_rapl(daemon, "degraded", "counter above max_energy_range_uj")
        time.sleep(1.5)
        assert rapl_part(daemon)["state"] == "degraded"
        feeder.wrap_to(1_000_000)
        wait_rapl(daemon, "ok")

        # 3. A jump no CPU can make: +50 kJ in about a second (old code: booked).
        feeder.shift(50_000_000_000)
        wait_rapl(daemon, "degraded", "rose faster than the zone's max power allows")
        wait_rapl(daemon, "ok")

        time.sleep(1.0)
        t_b, e_b = tick_point(daemon)
        poller.stop()

        truth_j = feeder.truth_j_at(t_b) - feeder.truth_j_at(t_a)
        got_j = e_b - e_a
        # Untrusted intervals are estimated from the last trusted power (40 W); the
        # tolerance covers read-time jitter at the two ends and in those intervals.
        assert got_j == pytest.approx(truth_j, rel=0.02, abs=0.5 * RATE_W), (got_j, truth_j)

        assert not poller.errors, poller.errors
        assert len(poller.seen) > 20
        for before, after in zip(poller.seen, poller.seen[1:]):
            assert after >= before - 1e-9, (before, after)
        assert all(e >= 0 for e in poller.seen)

        m = daemon.metrics()
        glitches = {reason: sample(m, "wattprint_counter_glitches_total", source="rapl", device="package-0",
                                   reason=reason)
                    for reason in ("backwards", "above_range", "jump")}
        assert glitches["backwards"] == 1 and glitches["jump"] == 1, glitches
        assert glitches["above_range"] >= 3, glitches  # at least 2 ticks above the range, and the wrap
        assert rapl_part(daemon)["errors_total"] >= 5

        # Once per episode: three episodes, each one warning, one recovery.
        assert len(log_lines(daemon, "wattprint.health: rapl degraded:")) == 3
        assert len(log_lines(daemon, "wattprint.health: rapl recovered")) == 3
        source_warnings = [ln for ln in log_lines(daemon, "wattprint.sources.rapl:") if " WARNING " in ln]
        assert len(source_warnings) == 3, source_warnings
        assert "Traceback" not in daemon.log_path.read_text(errors="replace")
        assert daemon.stop() == 0
    finally:
        if poller is not None:
            poller.stop()
        feeder.stop()
        daemon.kill()


def test_intel_range_is_the_default_of_the_simulated_tree(tmp_path: Path) -> None:
    # The e2e test above relies on it: a 1 J step back is far from a plausible wrap.
    tree = PowercapTree(tmp_path / "powercap")
    tree.add_package(0, dram=False, core=False)
    assert tree.max_energy_range_uj(PKG) == INTEL_MAX_ENERGY_RANGE_UJ


def test_a_counter_that_keeps_glitching_is_one_episode(tmp_path: Path) -> None:
    """Four impossible jumps two seconds apart with [cpu] glitch_hold_s = 5: one
    degraded episode (one warning, one recovery), degraded all along, never the
    degraded/ok pair per glitch that would flood the log on a flaky counter."""
    tree = PowercapTree(tmp_path / "powercap")
    tree.add_package(0, dram=False, core=False, start_uj=100_000_000_000)
    feeder = GlitchFeeder(tree, PKG, RATE_W, start_uj=100_000_000_000)
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=tree.root,
                           env={"WATTPRINT_CPU_GLITCH_HOLD_S": "5"})
    try:
        daemon.start()
        wait_rapl(daemon, "ok")
        states = []
        for _ in range(4):
            feeder.shift(10_000_000_000)  # +10 kJ at once (4 of them stay inside the range: no wrap)
            wait_rapl(daemon, "degraded", "rose faster than the zone's max power allows")
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                states.append(rapl_part(daemon)["state"])
                time.sleep(0.2)
        assert set(states) == {"degraded"}, states  # held between glitches
        wait_rapl(daemon, "ok")  # 5 s after the last one
        m = daemon.metrics()
        assert sample(m, "wattprint_counter_glitches_total", source="rapl", device="package-0", reason="jump") == 4
        assert len(log_lines(daemon, "wattprint.health: rapl degraded:")) == 1
        assert len(log_lines(daemon, "wattprint.health: rapl recovered")) == 1
        source_warnings = [ln for ln in log_lines(daemon, "wattprint.sources.rapl:") if " WARNING " in ln]
        assert len(source_warnings) == 1, source_warnings
        assert daemon.stop() == 0
    finally:
        daemon.kill()
