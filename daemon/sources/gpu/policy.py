"""The vendor-neutral GPU collector: turns one vendor library (``GpuVendor``, see
vendor.py) into a ``Source`` of DeviceReadings. NVML and amdsmi calls live in
nvidia.py and amd.py; everything here holds for every vendor. This module holds
``GpuSource``: the read of every board per tick and each board's side queries (error
isolation per feature). Its parts, each a mixin it inherits: lifecycle.py (init,
enumeration, re-init, lost boards and their probes), energy.py (each board's energy:
counter or integrated power), sampler.py (the power sampler thread), processes.py (its
process lists, readings and partition split); state.py what it keeps per board.

Order of work per GPU per tick (issue 12, item 2): the energy first (the counter, or
sampled power), and it is booked whatever happens next. Every other query (memory,
process lists, utilisation) fails alone:

- ``NOT_SUPPORTED`` turns that feature off for that GPU (a fact, said once in the log
  and in ``notes()``, not a problem).
- Any other error (no permission, unknown, timeout, ...) is a per-feature problem: the
  feature is retried after ``retry_s`` (30 s), then with exponential backoff up to
  ``retry_max_s``; meanwhile ``problems()`` names the GPU and the feature (health
  degraded) and the GPU's energy is still booked. A GPU whose process list failed is
  booked ``attributable=False`` for that tick: its energy stays unattributed.
- ``UNINITIALIZED`` (the library lost its session) is a problem like the others, and
  the library is re-initialised at the end of that read.
- ``LOST`` on any call isolates the GPU: it is not read again until a probe, run on
  its own short-lived thread (so a hanging lost GPU never delays the others), finds it
  back. Probes back off from 2 s by x1.5 up to 300 s. Its counter baseline is kept
  (the gap is booked when it is back, if the counter survived). If the counter
  restarted meanwhile (a GPU reset), its new value (the energy since the restart) is
  booked unattributed, with a problem for that read: never the last power x the whole
  gap. A board without a counter is not interpolated across the gap (its power
  integrator restarts).
- When nothing can be read at all, ``read()`` raises ``SourceError``.

Energy: the delta of the board's energy counter (``CounterDiff.step``: first,
difference, wrapped, reset), source "counter"; the first read sets the baseline (0 J).
When the counter goes backwards (driver reload) that interval uses the previous
interval's average power x dt (source "power"). Boards without an energy counter have
their power sampled on a thread of its own at ``[gpu] power_sample_hz`` (10 Hz by
default) and integrated by trapezoid (source "power"): power read once per tick
aliases (a board alternating 100/300 W every 0.5 s read at 1 Hz is off by 50 %).

Processes: the union of the vendor's process lists. Every listed process is kept; one
whose PID has no ``/proc`` entry here (PID 0, 0xFFFFFFFF, scrambled, exited, another
PID namespace) is ``visible=False``: its share stays unattributed and it is counted
(``gpu_processes_not_visible``). Drivers report host PIDs: a daemon that is not in the
host PID namespace (``/proc/self/ns/pid`` inode is not 0xEFFFFFFC, the kernel's
PROC_PID_INIT_INO) cannot match them, so all of them are invisible and the source is
degraded ("run with --pid=host"). Utilisation is asked of the vendor only when it
wants it (NVML: two or more processes share the GPU).

Partitions (NVIDIA MIG, AMD compute partitions): energy and power exist only for the
whole board. The board's energy of the interval is split over its partitions by size
(slices): a partition is capacity reserved by its user. Each partition is one reading
(``gpu0-mig<gi>`` / ``amdgpu0-p<k>``, ``parent`` the board) with the processes of that
partition; the board's own reading (``attributable=False``) carries the slices in no
partition. When a partition's process lists fail, its energy is booked unattributed
and the problem named. Partitions have no utilisation: within one, processes share by
memory (see attribution.py).

Re-initialisation (item 6): the GPU set is fixed at library init. The library is shut
down and initialised again every ``reinit_interval_s`` (300 s), when the number of
GPUs the kernel driver lists changes, and when the library's count changes; always at
the end of a read, after the energy was read. State (counter baselines, utilisation
windows, feature backoffs) is kept per GPU UUID across re-inits. With
``quiet_without_driver`` a missing driver or library (``NO_DRIVER``) makes the source
*disabled*, not degraded, while init is retried with backoff; the GPUs appear when the
driver loads.

Cost (item 9): handles, UUIDs, names and partition layouts are read at (re-)init only.

Threads: ``read()`` runs on the engine's thread for this source; the power sampler
and lost-GPU probes make their own library calls (NVML and amdsmi are thread-safe). A
re-init holds ``_gate`` so the sampler never calls into a library being shut down.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

from ...model import DeviceReading
from ..base import SourceDisabled, SourceError
from .energy import BoardEnergy
from .lifecycle import (
    LOST_RETRY_FACTOR,
    LOST_RETRY_MAX_S,
    LOST_RETRY_S,
    MIG_LAYOUT_REFRESH_S,
    PARTITION_LAYOUT_REFRESH_S,
    LibraryLifecycle,
)
from .processes import ProcessReading
from .sampler import PowerSampler
from .state import (
    FAILED,
    OFF,
    PROC_PID_INIT_INO,
    Backoff,
    Board,
    Feature,
    GpuState,
    Lost,
    NoEnergy,
    PowerIntegrator,
    error_text,
    pid_namespace_is_initial,
    proc_pid_exists,
    source_options,
)
from .vendor import GpuError, GpuErrorKind, GpuVendor

log = logging.getLogger("wattprint.gpu")

RETRY_S = 30.0  # first retry of a failed init or side query
RETRY_MAX_S = 600.0
INIT_RETRY_S = RETRY_S  # (older name)
REINIT_INTERVAL_S = 300.0
POWER_SAMPLE_HZ = 10.0

__all__ = ["GpuSource", "PowerIntegrator", "PROC_PID_INIT_INO", "error_text", "pid_namespace_is_initial",
           "proc_pid_exists", "source_options", "LOST_RETRY_FACTOR", "LOST_RETRY_MAX_S", "LOST_RETRY_S",
           "MIG_LAYOUT_REFRESH_S", "PARTITION_LAYOUT_REFRESH_S"]


class GpuSource(LibraryLifecycle, BoardEnergy, PowerSampler, ProcessReading):
    """The ``Source`` for one vendor's GPUs. The library is initialised on the first
    ``read()`` and retried with backoff while it fails. See the module docstring."""

    def __init__(
        self,
        vendor: GpuVendor,
        pid_exists: Callable[[int], bool] = proc_pid_exists,
        *,
        init_retry_s: float = RETRY_S,
        retry_s: float | None = None,
        retry_max_s: float = RETRY_MAX_S,
        lost_retry_s: float = LOST_RETRY_S,
        reinit_interval_s: float = REINIT_INTERVAL_S,
        power_sample_hz: float = 0.0,
        quiet_without_driver: bool = False,
        wall_clock: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        pid_namespace_initial: bool | None = None,
        run_probe: Callable[[Callable[[], None]], None] | None = None,
        no_driver: str = "",
    ):
        self._vendor = vendor
        self.name = vendor.health_name
        self._lib = vendor.library
        self._pid_exists = pid_exists
        self._retry_s = init_retry_s if retry_s is None else retry_s
        self._retry_max_s = max(retry_max_s, self._retry_s)
        self._lost_retry_s = lost_retry_s
        self._reinit_interval_s = reinit_interval_s
        self._power_sample_hz = power_sample_hz
        self._quiet = quiet_without_driver
        self._wall = wall_clock or vendor.wall_clock()
        self._clock = clock
        self._run_probe = run_probe or self._thread_probe
        if pid_namespace_initial is None:
            pid_namespace_initial = pid_namespace_is_initial()
        self._pid_namespace_initial = pid_namespace_initial
        self._pids_foreign = False  # set at each (re-)init: see _enumerate

        self._initialized = False
        self._init_backoff = Backoff(self._retry_s, self._retry_max_s)
        self._init_error = no_driver  # what the opening probe found, if no driver
        self._no_driver = bool(no_driver)
        self._boards: list[Board] = []
        self._states: dict[str, GpuState] = {}
        self._last_reinit_s: float | None = None
        self._reinit_wanted = ""
        self._driver_gpus_seen: int | None = None
        self._gate = threading.RLock()
        self._generation = 0
        self._probes: dict[str, threading.Thread | bool] = {}
        self._probe_results: dict[str, tuple[int, Any, str] | None] = {}
        self._probe_lock = threading.Lock()
        self._sampler: threading.Thread | None = None
        self._sampler_stop = threading.Event()
        self._power_targets: dict[str, tuple[Any, PowerIntegrator]] = {}
        self._problems: list[str] = []
        self._notes: dict[str, str] = {}
        cp, lk = vendor.counter_prefix, vendor.library_key
        self._k_discarded = f"{cp}_util_samples_discarded_total"
        self._k_not_visible = f"{cp}_processes_not_visible"
        self._k_pids_not_visible = f"{cp}_pids_not_visible_total"
        self._k_feature_failures = f"{cp}_feature_failures_total"
        self._k_reinits = f"{cp}_{lk}_reinits_total"
        self._k_calls = f"{cp}_{lk}_calls_total"
        self._k_power_samples = f"{cp}_power_samples_total"
        self._counters: dict[str, float] = {
            self._k_discarded: 0.0,
            self._k_not_visible: 0.0,
            self._k_pids_not_visible: 0.0,
            self._k_feature_failures: 0.0,
            self._k_reinits: 0.0,
        }
        self._invisible_seen: dict[int, None] = {}  # recent invisible PIDs (bounded)

    # -- Source protocol ------------------------------------------------------------

    def read(self, now_mono_s: float) -> Sequence[DeviceReading]:
        self._problems = []
        self._ensure_init(now_mono_s)
        self._collect_probes()
        try:
            count = int(self._vendor.count())
        except GpuError as exc:
            raise SourceError(f"{self._lib}: cannot count GPUs: {exc.text}") from None
        if count != len(self._boards):
            self._reinit(now_mono_s, f"{self._lib} now counts {count} GPU(s), not {len(self._boards)}",
                         shutdown=False)
        if not self._initialized:
            raise SourceError(f"{self._lib} re-init failed: {self._init_error}")
        if not self._boards and self._quiet:
            raise SourceDisabled(f"no GPUs found by {self._lib}: GPU energy not measured (re-checked every "
                                 f"{self._reinit_interval_s:g} s)")

        wall_us = int(round(self._wall() * 1e6))
        readings: list[DeviceReading] = []
        not_visible = 0
        usable = 0
        for board in self._boards:
            st = self._state(board)
            if st.lost is not None:
                self._problems.append(f"{board.device}: skipped: {st.lost_error} (retrying with backoff)")
                self._maybe_probe(board, st, now_mono_s)
                continue
            try:
                got = self._read_board(board, st, now_mono_s, wall_us)
            except Lost as lost:
                self._mark_lost(board, st, lost.text, now_mono_s)
                self._problems.append(f"{board.device}: skipped: {lost.text} (retrying with backoff)")
                continue
            except GpuError as exc:
                self._problems.append(f"{board.device}: skipped: {exc.text}")
                if exc.kind is GpuErrorKind.UNINITIALIZED:  # the library lost its session: start a new one
                    self._reinit_wanted = f"{self._lib} says it is not initialised"
                continue
            except NoEnergy:
                self._problems.append(f"{board.device}: neither an energy counter nor power readings are supported")
                continue
            if got:
                usable += 1
                readings.extend(got)
                not_visible += sum(1 for r in got for p in r.processes if not p.visible)
        self._counters[self._k_not_visible] = float(not_visible)
        if self._pids_foreign:
            self._problems.append("daemon is not in the host PID namespace: GPU processes cannot be matched; "
                                  "run with --pid=host")
        # Before giving up on the tick: a probe may have asked for a re-init (a GPU lost
        # at enumeration is back under its real UUID), which must run with no GPU usable.
        self._maybe_reinit_after(now_mono_s)
        if self._boards and not usable:
            raise SourceError("no GPU could be read: " + "; ".join(self._problems))
        return readings

    def problems(self) -> list[str]:
        return list(self._problems)

    def notes(self) -> list[str]:
        """Informational facts about how GPUs are measured (not problems): features
        the library does not support, partitions. Stable across ticks."""
        return list(self._notes.values())

    def counters(self) -> dict[str, float]:
        """Self-metrics (``wattprint_<key>``): library calls made, samples discarded,
        processes not visible here, side-query failures, re-inits, power samples."""
        out = dict(self._counters)
        out[self._k_calls] = float(self._vendor.calls)
        out[self._k_power_samples] = float(sum(s.integrator.samples_total for s in list(self._states.values())))
        return out

    @property
    def disabled_reason(self) -> str:
        """Non-empty while the source is quiet (no driver yet): the health detail."""
        if self._no_driver and self._quiet:
            return (f"no {self._vendor.driver_name} driver ({self._init_error}): GPU energy not measured; "
                    "checking again with backoff")
        return ""

    def close(self) -> None:
        self._sampler_stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=2.0)
        with self._gate:
            self._shutdown_locked()

    # -- per GPU --------------------------------------------------------------------

    def _state(self, board: Board) -> GpuState:
        st = self._states.get(board.uuid)
        if st is None:
            st = self._states[board.uuid] = GpuState(uuid=board.uuid)
        return st

    def _note(self, key: str, text: str) -> None:
        if key not in self._notes:
            self._notes[key] = text
            log.info("%s", text)

    def _feature(self, st: GpuState, key: str) -> Feature:
        feat = st.features.get(key)
        if feat is None:
            feat = st.features[key] = Feature()
        return feat

    def _side(self, board: Board, st: GpuState, key: str, what: str, fn: Callable[[], Any],
              now: float, *, report: bool = True) -> Any:
        """A query other than the energy: its value, ``OFF`` (not supported here,
        for good) or ``FAILED`` (failed or waiting to be retried; the problem is
        listed unless ``report`` is False). LOST raises ``Lost``."""
        feat = self._feature(st, key)
        if not feat.supported:
            return OFF
        if feat.backoff is not None and not feat.backoff.due(now):
            if report:
                self._problems.append(feat.problem)
            return FAILED
        try:
            value = fn()
        except GpuError as exc:
            if exc.kind is GpuErrorKind.NOT_SUPPORTED:
                return self._unsupported(board, feat, key, what, exc.why)
            if exc.kind is GpuErrorKind.LOST:
                raise Lost(exc.text) from None
            if exc.kind is GpuErrorKind.UNINITIALIZED:  # the library lost its session: start a new one
                self._reinit_wanted = f"{self._lib} says it is not initialised"
            if feat.backoff is None:
                feat.backoff = Backoff(self._retry_s, self._retry_max_s)
            feat.backoff.failed(now, exc.text)
            feat.problem = (f"{board.device}: {what} failed: {exc.text} "
                            f"(retrying with backoff; energy still measured)")
            self._counters[self._k_feature_failures] += 1
            if report:
                self._problems.append(feat.problem)
            return FAILED
        if feat.backoff is not None and feat.backoff.failing:
            log.info("%s: %s works again", board.device, what)
            feat.backoff.succeeded()
            feat.problem = ""
        return value

    def _unsupported(self, board: Board, feat: Feature, key: str, what: str, why: str) -> Any:
        feat.supported = False
        self._note(f"{board.device}:{board.uuid}:{key}",
                   f"{board.device} ({board.name}): {what} not supported ({why}): {_consequence(key)}")
        return OFF

    def _read_board(self, board: Board, st: GpuState, now: float, wall_us: int) -> list[DeviceReading]:
        dt = 0.0 if st.last_read_s is None else max(now - st.last_read_s, 0.0)
        energy_j, source, power_w = self._energy(board, st, now, dt)  # raises: nothing booked
        st.last_read_s = now
        st.lost_since_read = False
        unplaced, st.energy_unplaced = st.energy_unplaced, False
        if source == "counter" and dt > 0 and not unplaced:
            st.last_avg_power_w = energy_j / dt
        elif power_w is not None:
            st.last_avg_power_w = power_w
        if power_w is None:
            power_w = energy_j / dt if dt > 0 else (st.last_avg_power_w or 0.0)

        mem: Any = FAILED
        if unplaced:  # the whole board (partitions too): nobody's, and no idle-floor sample
            return [self._reading(board, energy_j, power_w, source, dt, (), mem, attributable=False)]
        try:
            mem = self._side(board, st, "memory", "memory info", lambda: self._vendor.memory(board.handle), now)
            if board.partitioned:
                return self._partition_readings(board, st, now, energy_j, source, power_w, dt, mem)
            procs, complete = self._processes(board, st, board.handle, "", now)
            uses = self._uses(board, st, procs, now, wall_us)
        except Lost as lost:
            # Lost after its energy was read: book the energy, skip the GPU from now on.
            self._mark_lost(board, st, lost.text, now)
            self._problems.append(f"{board.device}: skipped from now on: {lost.text} (retrying with backoff)")
            return [self._reading(board, energy_j, power_w, source, dt, (), mem, attributable=False)]
        except Exception as exc:  # not the library's (a malformed entry, a binding bug): the energy is read, book it
            log.debug("%s: reading processes failed", board.device, exc_info=True)
            self._problems.append(f"{board.device}: processes not read ({error_text(exc)[:200]}): "
                                  "its energy is booked unattributed")
            return [self._reading(board, energy_j, power_w, source, dt, (), mem, attributable=False)]
        return [self._reading(board, energy_j, power_w, source, dt, uses, mem, attributable=complete)]


def _consequence(feature: str) -> str:
    base = feature.split(":")[-1]
    return {
        "energy_counter": "integrating sampled power",
        "power": "energy counter only",
        "memory": "no memory figures",
        "compute_procs": "compute processes not listed",
        "graphics_procs": "graphics processes not listed",
        "mps_procs": "MPS clients not listed",
        "utilisation": "no per-process utilisation",
    }.get(base, "not used")
