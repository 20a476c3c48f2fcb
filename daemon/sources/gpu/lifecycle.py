"""The GPU collector's library life: init (retried with backoff), enumeration of the
boards (handles, UUIDs, names and partition layouts, read at (re-)init only),
re-initialisation (periodic, when the driver's or the library's GPU count changes, or
when the library lost its session) and lost boards (isolated, probed on a short-lived
thread of their own with backoff, taken back when a probe finds them).

``LibraryLifecycle`` is a part of ``GpuSource`` (policy.py), which inherits it: it uses
the source's vendor, boards, per-UUID state, problem list, notes and counters.
Vendor-neutral: the library calls go through ``GpuVendor``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from ..base import SourceDisabled, SourceError
from .state import Backoff, Board, GpuState, PowerIntegrator, error_text
from .vendor import GpuError, GpuErrorKind, GpuVendor

log = logging.getLogger("wattprint.gpu")

LOST_RETRY_S = 2.0  # first probe of a lost GPU
LOST_RETRY_FACTOR = 1.5
LOST_RETRY_MAX_S = 300.0
PARTITION_LAYOUT_REFRESH_S = 30.0  # a stale-looking partition layout is re-read at most this often
MIG_LAYOUT_REFRESH_S = PARTITION_LAYOUT_REFRESH_S  # (older name)


class LibraryLifecycle:
    """Init, re-init, enumeration and lost boards of ``GpuSource`` (see the module
    docstring)."""

    _vendor: GpuVendor
    _lib: str
    _quiet: bool
    _lost_retry_s: float
    _reinit_interval_s: float
    _pid_namespace_initial: bool | None
    _pids_foreign: bool
    _initialized: bool
    _init_backoff: Backoff
    _init_error: str
    _no_driver: bool
    _boards: list[Board]
    _states: dict[str, GpuState]
    _last_reinit_s: float | None
    _reinit_wanted: str
    _driver_gpus_seen: int | None
    _gate: Any  # threading.RLock
    _generation: int
    _probes: dict[str, threading.Thread | bool]
    _probe_results: dict[str, tuple[int, Any, str] | None]
    _probe_lock: threading.Lock
    _power_targets: dict[str, tuple[Any, PowerIntegrator]]
    _problems: list[str]
    _notes: dict[str, str]
    _counters: dict[str, float]
    _k_reinits: str
    _run_probe: Callable[[Callable[[], None]], None]
    _state: Callable[[Board], GpuState]
    _note: Callable[[str, str], None]
    disabled_reason: str

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
