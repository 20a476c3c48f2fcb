"""The vendor-neutral GPU collector: turns one vendor library (``GpuVendor``, see
vendor.py) into a ``Source`` of DeviceReadings. NVML and amdsmi calls live in
nvidia.py and amd.py; everything here holds for every vendor. This module holds the
source's life (init, enumeration, re-init, lost boards) and each board's energy and
side queries; processes.py its process lists, readings and partition split; state.py
what it keeps per board.

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

from ...model import DeviceReading, EnergySource
from ..base import CounterDiff, CounterStepKind, SourceDisabled, SourceError
from .processes import ProcessReading
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
LOST_RETRY_S = 2.0  # first probe of a lost GPU
LOST_RETRY_FACTOR = 1.5
LOST_RETRY_MAX_S = 300.0
REINIT_INTERVAL_S = 300.0
PARTITION_LAYOUT_REFRESH_S = 30.0  # a stale-looking partition layout is re-read at most this often
MIG_LAYOUT_REFRESH_S = PARTITION_LAYOUT_REFRESH_S  # (older name)
POWER_SAMPLE_HZ = 10.0

__all__ = ["GpuSource", "PowerIntegrator", "PROC_PID_INIT_INO", "error_text", "pid_namespace_is_initial",
           "proc_pid_exists", "source_options"]


class GpuSource(ProcessReading):
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

    def _shutdown_locked(self) -> None:
        """Shut the library down if initialised (caller holds ``_gate``); handles of the
        old generation are dead from here on."""
        if not self._initialized:
            return
        self._initialized = False
        self._generation += 1
        self._vendor.shutdown()

    # -- init, re-init, enumeration -------------------------------------------------

    def _ensure_init(self, now: float) -> None:
        if self._initialized:
            return
        if not self._init_backoff.due(now):
            self._raise_init_failure()
        try:
            with self._gate:
                self._vendor.init()
                self._initialized = True
                self._generation += 1
        except GpuError as exc:
            self._init_failed(now, exc)
            self._raise_init_failure()
        if self._no_driver:
            log.info("%s: the driver is there now: measuring GPUs", self._lib)
        self._no_driver = False
        self._init_backoff.succeeded()
        self._init_error = ""
        try:
            self._enumerate(now)
        except GpuError as exc:
            raise SourceError(f"{self._lib}: cannot count GPUs: {exc.text}") from None

    def _init_failed(self, now: float, exc: GpuError) -> None:
        self._init_backoff.failed(now, exc.text)
        self._init_error = exc.text
        self._no_driver = exc.kind is GpuErrorKind.NO_DRIVER

    def _raise_init_failure(self) -> None:
        if self._no_driver and self._quiet:
            raise SourceDisabled(self.disabled_reason)
        raise SourceError(f"{self._lib} init failed: {self._init_error} (retrying with backoff)")

    def _enumerate(self, now: float) -> None:
        """Read the GPU set: handles, UUIDs, names, partition layouts (cached until the
        next re-init). Raises GpuError only when the GPUs cannot be counted."""
        v = self._vendor
        self._boards = []
        self._last_reinit_s = now
        # The driver's PIDs cannot be matched here: host PIDs seen from another PID namespace.
        self._pids_foreign = v.reports_host_pids() and self._pid_namespace_initial is False
        self._driver_gpus_seen = v.driver_gpu_count()
        count = int(v.count())
        for index in range(count):
            device = f"{v.device_prefix}{index}"
            try:
                handle, uuid = v.board(index)
            except GpuError as exc:
                board = Board(index=index, handle=None, uuid=f"index-{index}", name="?", device=device)
                self._boards.append(board)
                st = self._state(board)
                self._mark_lost(board, st, exc.text, now)
                continue
            try:
                name = v.name(handle)
            except GpuError:
                name = f"{v.driver_name} GPU"
            board = Board(index=index, handle=handle, uuid=uuid, name=name, device=device, layout_read_s=now)
            self._read_layout(board)
            self._boards.append(board)
            st = self._states.get(uuid)
            if st is not None and st.lost is not None:
                st.lost = None  # found again by this enumeration
        current = {f"{b.device}:{b.uuid}:" for b in self._boards}
        self._notes = {k: v for k, v in self._notes.items() if any(k.startswith(c) for c in current)}
        with self._gate:
            self._power_targets = {}

    def _read_layout(self, board: Board) -> None:
        """The board's partition layout (None: not partitioned); a note when it is."""
        board.layout = self._vendor.partitions(board.handle, board.device, board.name)
        layout = board.layout
        if layout is not None and layout.note:
            self._note(f"{board.device}:{board.uuid}:mig", layout.note)

    def _refresh_layout(self, board: Board, now: float, why: str) -> None:
        """Re-read the partition layout (partitions come and go without a re-init), at
        most every ``PARTITION_LAYOUT_REFRESH_S``; takes effect from the next read."""
        if board.layout_read_s is not None and now - board.layout_read_s < PARTITION_LAYOUT_REFRESH_S:
            return
        log.debug("%s: re-reading the %s layout: %s", board.device, self._vendor.partition_word, why)
        try:
            self._read_layout(board)
        finally:
            board.layout_read_s = now

    def _maybe_reinit_after(self, now: float) -> None:
        """At the end of a read: re-initialise the library when it is due or asked for."""
        reason = self._reinit_wanted
        seen = self._vendor.driver_gpu_count()
        if not reason and seen is not None and seen != self._driver_gpus_seen:
            reason = f"the driver lists {seen} GPU(s) now"
        if not reason and self._reinit_interval_s > 0 and self._last_reinit_s is not None \
                and now - self._last_reinit_s >= self._reinit_interval_s:
            reason = "periodic"
        if reason:
            self._reinit(now, reason, shutdown=True)

    def _reinit(self, now: float, reason: str, *, shutdown: bool) -> None:
        """Shut the library down, initialise it again and re-enumerate (state stays by UUID)."""
        self._reinit_wanted = ""
        before = [(b.index, b.uuid) for b in self._boards]
        with self._gate:
            self._counters[self._k_reinits] += 1
            if shutdown and self._initialized:
                self._shutdown_locked()
                try:
                    self._vendor.init()
                except GpuError as exc:
                    self._init_failed(now, exc)
                    self._problems.append(f"{self._lib} re-init failed: {self._init_error} (retrying with backoff)")
                    return
                self._initialized = True
                self._generation += 1
            try:
                self._enumerate(now)
            except GpuError as exc:
                self._problems.append(f"{self._lib}: cannot count GPUs after re-init: {exc.text}")
                return
        after = [(b.index, b.uuid) for b in self._boards]
        if after != before:
            log.info("%s re-initialised (%s): %d GPU(s) now: %s", self._lib, reason, len(after),
                     ", ".join(f"{b.device} {b.name}" for b in self._boards) or "none")

    # -- lost GPUs ------------------------------------------------------------------

    def _mark_lost(self, board: Board, st: GpuState, text: str, now: float) -> None:
        if st.lost is None:
            st.lost = Backoff(self._lost_retry_s, LOST_RETRY_MAX_S, LOST_RETRY_FACTOR)
            log.warning("%s (%s) lost: %s: not read until a probe finds it back", board.device, board.name, text)
        st.lost.failed(now, text)
        st.lost_error = text
        st.lost_since_read = True
        with self._gate:
            self._power_targets.pop(st.uuid, None)
            st.integrator.restart()  # no trapezoid over the lost gap

    def _maybe_probe(self, board: Board, st: GpuState, now: float) -> None:
        assert st.lost is not None
        if not st.lost.due(now):
            return
        with self._probe_lock:
            if self._probes.get(st.uuid):
                return  # one probe at a time per GPU (it may hang)
            self._probes[st.uuid] = True
        gen, index = self._generation, board.index
        st.lost.failed(now, st.lost_error)  # the next probe is due after the next delay

        def probe() -> None:
            result: tuple[int, Any, str] | None
            try:
                handle, uuid = self._vendor.alive(index)
                result = (gen, handle, uuid)
            except Exception as exc:  # still lost (any error), or worse
                log.debug("%s: probe: %s", board.device, error_text(exc))
                result = None
            with self._probe_lock:
                self._probes[st.uuid] = False
                if result is not None:
                    self._probe_results[st.uuid] = result

        self._run_probe(probe)

    @staticmethod
    def _thread_probe(fn: Callable[[], None]) -> None:
        threading.Thread(target=fn, name="wattprint-gpu-probe", daemon=True).start()

    def _collect_probes(self) -> None:
        with self._probe_lock:
            results, self._probe_results = self._probe_results, {}
        for uuid, found in results.items():
            if found is None:
                continue
            gen, handle, new_uuid = found
            for board in self._boards:
                st = self._states.get(board.uuid)
                if board.uuid != uuid or st is None or st.lost is None:
                    continue
                if gen != self._generation:
                    continue  # the library was re-initialised meanwhile: the handle is stale
                if new_uuid != board.uuid:
                    self._reinit_wanted = f"{board.device} came back as another GPU"
                    continue
                board.handle = handle
                st.lost = None
                log.info("%s (%s) is back", board.device, board.name)
                self._read_layout(board)

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

    def _energy(self, board: Board, st: GpuState, now: float,
                dt: float) -> tuple[float, EnergySource, float | None]:
        """(joules since the last read, source, average or sampled power or None).
        Raises GpuError (GPU skipped, baseline kept) or Lost."""
        counter = self._feature(st, "energy_counter")
        if counter.supported:
            try:
                count = self._vendor.energy(board.handle)
            except GpuError as exc:
                if exc.kind is GpuErrorKind.LOST:
                    raise Lost(exc.text) from None
                if exc.kind is not GpuErrorKind.NOT_SUPPORTED:
                    raise
                self._unsupported(board, counter, "energy_counter", "energy counter", exc.why)
                st.counter = CounterDiff(max_value=None)
            else:
                st.counter.max_value = count.max_value
                step = st.counter.step(count.value)
                if step.kind is CounterStepKind.DIFFERENCE or step.kind is CounterStepKind.WRAPPED:
                    assert step.delta is not None
                    return step.delta / count.ticks_per_joule, "counter", None
                if step.kind is CounterStepKind.FIRST:  # the baseline; one power sample so the first reading shows a power
                    return 0.0, "counter", self._power_w_quiet(board, st)
                if step.kind is CounterStepKind.RESET and st.lost_since_read:
                    # Back from a loss with the counter restarted (a GPU reset): the
                    # value is the energy since the restart; before it, nothing was
                    # measured. Never the last power x the whole gap (phantom energy
                    # charged to whoever runs on the GPU now).
                    self._problems.append(f"{board.device}: energy counter restarted while the GPU was lost: "
                                          "the energy of the gap before the restart is unknown (not booked); "
                                          "the energy since the restart is booked unattributed")
                    st.energy_unplaced = True  # when in the gap it was used, and by whom, is unknown
                    return count.value / count.ticks_per_joule, "counter", None
                if step.kind is CounterStepKind.RESET:
                    self._problems.append(f"{board.device}: energy counter went backwards (driver reload?): "
                                          "this interval uses the previous average power")
                else:  # IMPLAUSIBLE: a value no counter of this width can hold
                    self._problems.append(f"{board.device}: energy counter reading not trusted ({step.reason}): "
                                          "this interval uses the previous average power")
                fallback_w = st.last_avg_power_w
                if fallback_w is None:
                    fallback_w = self._power_w_quiet(board, st)
                return (fallback_w or 0.0) * dt, "power", fallback_w
        # No energy counter: sampled power (here and on the sampler thread), integrated.
        watts = self._power_w(board, st)
        if watts is None and not self._feature(st, "power").supported:
            raise NoEnergy()
        if watts is not None:
            st.integrator.add(now, watts)
        self._want_sampler(board, st)
        energy_j, span, last_w = st.integrator.take()
        avg_w = energy_j / span if span > 0 else last_w
        return energy_j, "power", avg_w

    def _power_w_quiet(self, board: Board, st: GpuState) -> float | None:
        try:
            return self._power_w(board, st)
        except (GpuError, Lost):
            return None

    def _power_w(self, board: Board, st: GpuState) -> float | None:
        feat = self._feature(st, "power")
        if not feat.supported:
            return None
        try:
            return float(self._vendor.power_w(board.handle))
        except GpuError as exc:
            if exc.kind is GpuErrorKind.LOST:
                raise Lost(exc.text) from None
            if exc.kind is GpuErrorKind.NOT_SUPPORTED:
                self._unsupported(board, feat, "power", "power usage", exc.why)
                return None
            raise

    # -- power sampler ------------------------------------------------------------

    def _want_sampler(self, board: Board, st: GpuState) -> None:
        if not self._feature(st, "power").supported:
            return
        with self._gate:
            self._power_targets[st.uuid] = (board.handle, st.integrator)
        if self._sampler is None and self._power_sample_hz > 0:
            self._sampler = threading.Thread(target=self._sample_loop, name="wattprint-gpu-power", daemon=True)
            self._sampler.start()
            log.info("sampling GPU power at %g Hz for boards without an energy counter", self._power_sample_hz)

    def sample_power(self) -> int:
        """One round of the power sampler: sample each board without an energy counter
        and feed its integrator. Returns the number of samples taken."""
        taken = 0
        with self._gate:
            if not self._initialized:
                return 0
            for handle, integ in list(self._power_targets.values()):
                try:
                    watts = float(self._vendor.power_w(handle))
                except GpuError:
                    continue  # the tick's own read reports it
                integ.add(self._clock(), watts)
                taken += 1
        return taken

    def _sample_loop(self) -> None:
        period = 1.0 / self._power_sample_hz
        next_at = self._clock()
        while not self._sampler_stop.is_set():
            next_at += period
            delay = next_at - self._clock()
            if delay < 0:
                next_at = self._clock()  # fell behind: do not burst
                delay = 0.0
            if self._sampler_stop.wait(delay):
                return
            try:
                self.sample_power()
            except Exception:  # never let the sampler die; the tick's read reports errors
                log.debug("power sampler", exc_info=True)


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
