"""The process side of the GPU collector: process lists (their union, visibility
here, utilisation when the vendor wants it), the DeviceReadings of a board, and the
split of a partitioned board's energy over its partitions by size. Each reading says
which fraction of the physical board it stands for (``board_share``: a partition its
slices / the board's, the board's own remainder reading the rest, a whole board 1.0),
so embodied carbon can be booked by board-time.

``ProcessReading`` is a part of ``GpuSource`` (policy.py), which inherits it: it uses
the source's vendor, problem list, counters and side-query isolation (``_side``).
Vendor-neutral: the vendor's process lists and utilisation come through ``GpuVendor``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ...model import DeviceReading, EnergySource, GpuProcessUse
from .state import FAILED, OFF, Board, Feature, GpuState, Proc
from .vendor import GpuVendor, MemoryInfo, ProcEntry


class ProcessReading:
    """Processes, utilisation and readings of ``GpuSource`` (see the module docstring)."""

    _vendor: GpuVendor
    _lib: str
    _problems: list[str]
    _counters: dict[str, float]
    _k_discarded: str
    _k_pids_not_visible: str
    _pids_foreign: bool
    _pid_exists: Callable[[int], bool]
    _invisible_seen: dict[int, None]
    _side: Callable[..., Any]
    _note: Callable[[str, str], None]
    _feature: Callable[[GpuState, str], Feature]
    _refresh_layout: Callable[[Board, float, str], None]

    def _processes(self, board: Board, st: GpuState, handle: Any, prefix: str, now: float,
                   *, report: bool = True) -> tuple[dict[tuple[int | None, int], Proc], bool]:
        """The processes the library lists for ``handle`` (keyed by (partition, pid))
        and whether the lists are complete (False: a list failed, or this binding
        cannot be trusted with them)."""
        procs: dict[tuple[int | None, int], Proc] = {}
        unusable = self._vendor.processes_unusable()
        if unusable:
            self._problems.append(unusable)
            return procs, False
        complete = True
        for kind, what in self._vendor.process_kinds:
            got = self._side(board, st, f"{prefix}{kind}_procs", f"{prefix}{what}",
                             lambda kind=kind: self._vendor.processes(kind, handle), now, report=report)
            if got is FAILED:
                complete = False
                continue
            if got is OFF:
                continue
            for p in got or ():
                entry = procs.get((p.partition, p.pid))
                if entry is None:
                    procs[(p.partition, p.pid)] = Proc(pid=p.pid, used=p.used_bytes, kinds={kind},
                                                        part=p.partition, usage=p.usage)
                else:
                    entry.kinds.add(kind)
                    if p.used_bytes is not None:
                        entry.used = p.used_bytes if entry.used is None else max(entry.used, p.used_bytes)
                    if entry.usage is None:
                        entry.usage = p.usage
        return procs, complete

    def _visible(self, pid: int) -> bool:
        if self._pids_foreign or pid in (0, 0xFFFFFFFF):
            return False
        return self._pid_exists(pid)

    def _count_invisible(self, pid: int) -> None:
        if pid in self._invisible_seen:
            return
        self._invisible_seen[pid] = None
        self._counters[self._k_pids_not_visible] += 1
        if len(self._invisible_seen) > 4096:
            self._invisible_seen.pop(next(iter(self._invisible_seen)))

    def _uses(self, board: Board, st: GpuState, procs: dict[tuple[int | None, int], Proc], now: float,
              wall_us: int, *, util: bool = True) -> list[GpuProcessUse]:
        by_pid: dict[int, Proc] = {}
        for p in procs.values():  # without partitions, part is the same for all
            e = by_pid.get(p.pid)
            if e is None:
                by_pid[p.pid] = Proc(pid=p.pid, used=p.used, kinds=set(p.kinds), part=p.part, usage=p.usage)
            else:
                e.kinds |= p.kinds
                if p.used is not None:
                    e.used = p.used if e.used is None else max(e.used, p.used)
                if e.usage is None:
                    e.usage = p.usage
        samples = self._utilisation(board, st, by_pid, now, wall_us) if util else None
        uses: list[GpuProcessUse] = []
        for pid in sorted(by_pid):
            p = by_pid[pid]
            visible = self._visible(pid)
            if not visible:
                self._count_invisible(pid)
            sm = enc = dec = None
            if samples is not None:
                sm, enc, dec = samples.get(pid, (0.0, 0.0, 0.0))
            uses.append(GpuProcessUse(pid=pid, used_memory_bytes=p.used, sm_util_pct=sm, enc_util_pct=enc,
                                      dec_util_pct=dec, visible=visible, kind=_kind(p.kinds)))
        return uses

    def _utilisation(self, board: Board, st: GpuState, by_pid: dict[int, Proc], now: float,
                     wall_us: int) -> dict[int, tuple[float, float, float]] | None:
        """pid -> (sm, enc, dec) from the vendor; None when not wanted (NVML: fewer
        than two processes), unsupported or failing."""
        entries = {pid: ProcEntry(pid=pid, used_bytes=p.used, partition=p.part, usage=p.usage)
                   for pid, p in by_pid.items()}
        if not self._vendor.util_wanted(st.util, entries, wall_us):
            return None
        got = self._side(board, st, "utilisation", "process utilisation",
                         lambda: self._vendor.utilisation(board.handle, entries, st.util, wall_us), now)
        if got is OFF or got is FAILED:
            return None
        self._counters[self._k_discarded] += got.discarded
        return dict(got.per_pid)

    # -- partitions -----------------------------------------------------------------

    def _partition_readings(self, board: Board, st: GpuState, now: float, energy_j: float,
                            source: EnergySource, power_w: float, dt: float, mem: Any) -> list[DeviceReading]:
        """One reading per partition (energy by size) plus the board's remainder.
        Works on the layout as it was at the start (a refresh applies from the next read)."""
        layout = board.layout
        assert layout is not None
        word, key = self._vendor.partition_word, self._vendor.partition_key
        parts, total_slices = dict(layout.parts), layout.total_slices
        if layout.error or not parts:
            why = layout.error or "no partitions"
            if layout.error:
                self._problems.append(f"{board.device}: {word} layout unknown ({why}): "
                                      "its energy is booked unattributed")
            procs, _ = self._processes(board, st, board.handle, "", now)
            uses = self._uses(board, st, procs, now, 0, util=False)
            return [self._reading(board, energy_j, power_w, source, dt, uses, mem, attributable=False)]

        per_part: dict[int, dict[tuple[int | None, int], Proc]] = {pid: {} for pid in parts}
        stray: dict[tuple[int | None, int], Proc] = {}
        complete = False
        if layout.parent_lists:
            # The parent's lists carry the partition; without privileges for them,
            # read each partition's own lists.
            procs, complete = self._processes(board, st, board.handle, "", now, report=False)
        part_complete: dict[int, bool] = {pid: complete for pid in parts}
        if complete:
            for k, p in procs.items():
                if p.part in per_part:
                    per_part[p.part][k] = p
                else:
                    stray[k] = p
            if stray:
                self._refresh_layout(board, now, f"a process in an unknown {word} partition")
        else:
            if layout.parent_lists:
                self._note(f"{board.device}:{board.uuid}:mig-parent-procs",
                           f"{board.device} ({board.name}): the {word} parent's process lists failed "
                           f"({self._lib} needs privileges for them): reading each {word} device's lists instead")
            for part_id, part in parts.items():
                ok_all = True
                for handle in part.handles:
                    got, ok = self._processes(board, st, handle, f"{key}{part_id}:", now, report=False)
                    ok_all = ok_all and ok
                    for (_, pid), p in got.items():
                        p.part = part_id
                        per_part[part_id][(part_id, pid)] = p
                part_complete[part_id] = ok_all
            failed = [pid for pid, ok in part_complete.items() if not ok]
            if failed:
                self._refresh_layout(board, now, f"a {word} device's process list failed")
                listed = ", ".join(str(g) for g in sorted(failed))
                if layout.parent_lists:
                    parent_problem = self._feature(st, "compute_procs").problem or f"{word} process lists failed"
                    self._problems.append(f"{parent_problem}; {word} device lists failed too for GPU instance(s) "
                                          f"{listed}: their energy is booked unattributed")
                else:
                    self._problems.append(f"{board.device}: process lists failed for {word}(s) {listed}: "
                                          "their energy is booked unattributed")

        total = float(total_slices)
        readings: list[DeviceReading] = []
        shares = {pid: parts[pid].slices / total if total > 0 else 0.0 for pid in parts}
        energies = {pid: energy_j * share for pid, share in shares.items()}
        rest = energy_j - sum(energies.values())
        if rest < 0.0 and energies:  # float rounding (all slices assigned): never a negative remainder
            biggest = max(energies, key=lambda g: energies[g])
            energies[biggest] = max(0.0, energies[biggest] + rest)
            rest = max(0.0, energy_j - sum(energies.values()))
        for part_id in sorted(parts):
            part = parts[part_id]
            share = shares[part_id]
            uses = self._uses(board, st, per_part[part_id], now, 0, util=False)
            used = [u.used_memory_bytes for u in uses]
            readings.append(DeviceReading(
                kind="gpu", device=f"{board.device}{self._vendor.partition_infix}{part_id}",
                energy_j=energies[part_id], power_w=power_w * share, source=source,
                interval_s=dt, processes=tuple(uses),
                memory_used_bytes=sum(used) if all(u is not None for u in used) else None,  # type: ignore[misc]
                memory_total_bytes=part.memory_total_bytes, name=part.name,
                attributable=part_complete[part_id], parent=board.device, uuid=_known_uuid(board),
                vendor=self._vendor.vendor, board_share=share,
            ))
        stray_uses = self._uses(board, st, stray, now, 0, util=False)
        rest_w = power_w * (rest / energy_j) if energy_j > 0 else 0.0
        # The board's own reading stands for the slices no partition holds (embodied
        # carbon is booked by board-time): 1 - the partitions' shares, never negative.
        rest_share = max(0.0, 1.0 - sum(shares.values()))
        readings.append(self._reading(board, rest, rest_w, source, dt, stray_uses, mem, attributable=False,
                                      board_share=rest_share))
        return readings

    def _reading(self, board: Board, energy_j: float, power_w: float, source: EnergySource, dt: float,
                 uses: Sequence[GpuProcessUse], mem: Any, *, attributable: bool,
                 board_share: float = 1.0) -> DeviceReading:
        """The reading of a whole board (``board_share`` 1.0), or a partitioned board's
        remainder (the share of the board no partition holds)."""
        has_mem = isinstance(mem, MemoryInfo)
        return DeviceReading(
            kind="gpu", device=board.device, energy_j=energy_j, power_w=power_w, source=source, interval_s=dt,
            processes=tuple(uses),
            memory_used_bytes=int(mem.used_bytes) if has_mem else None,
            memory_total_bytes=int(mem.total_bytes) if has_mem else None,
            name=board.name, attributable=attributable, uuid=_known_uuid(board), vendor=self._vendor.vendor,
            board_share=board_share,
        )



def _known_uuid(board: Board) -> str:
    """The board's UUID for exporters; "" when it could not be read (``index-N``)."""
    return "" if board.uuid.startswith("index-") else board.uuid


def _kind(kinds: set[str]) -> str:
    if "mps" in kinds:
        return "mps"
    if "compute" in kinds and "graphics" in kinds:
        return "compute+graphics"
    return "graphics" if "graphics" in kinds else "compute"
