"""Job labels from process environments: reading, sanitising, the per-user cap.

A label is the first of ``label_env`` set in a process's initial environment
(children inherit it). Labels come from any local user: they are sanitised to
``LABEL_CHARS`` and ``MAX_LABEL_LEN`` (each other character becomes ``_``; the raw
value is kept for the API), and each user may hold at most ``max_labels_per_user``
distinct live labels (``LabelCap``): further labels become ``OVERFLOW_LABEL``
(counted in ``labels_overflow_total``, logged once per user per episode; the raw
label is kept in ``label_raw``). Environments are read only to find the label and
are never kept. An environment the kernel refuses (another user's process, the
daemon without CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH) is reported as refused, and
``label_problem_text`` says which capability is missing (from CapEff).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

from ..model import JobIdentity
from .scan import user_name

log = logging.getLogger("wattprint.procs")

MAX_RAW_LABEL_CHARS = 256
MAX_LABEL_LEN = 64
LABEL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:/@+-")
OVERFLOW_LABEL = "_overflow"


def sanitize_label(raw: str) -> str:
    """The label as exported: disallowed characters replaced by ``_``, at most
    ``MAX_LABEL_LEN`` characters, never empty."""
    clean = "".join(ch if ch in LABEL_CHARS else "_" for ch in raw[:MAX_LABEL_LEN])
    return clean or "_"


def read_label(pid: int, names: tuple[str, ...], proc_root: str = "/proc") -> tuple[str, str] | None:
    """(variable, value) of the first of ``names`` set (non-empty) in the process's
    initial environment, or None.

    Only the wanted variables are kept; the rest of the environment is discarded
    at once (it may hold secrets). Unreadable environments (other users' processes
    without CAP_SYS_PTRACE, kernel threads) give None.
    """
    return read_label_checked(pid, names, proc_root)[0]


def read_label_checked(pid: int, names: tuple[str, ...],
                       proc_root: str = "/proc") -> tuple[tuple[str, str] | None, bool]:
    """``read_label`` and whether the environment was refused (EACCES/EPERM: another
    user's process and the daemon lacks CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH)."""
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as fh:
            data = fh.read()
    except PermissionError:
        return None, True
    except OSError:
        return None, False
    found: dict[str, str] = {}
    wanted = {n.encode() + b"=": n for n in names}
    for entry in data.split(b"\x00"):
        for prefix, name in wanted.items():
            if entry.startswith(prefix) and name not in found:
                found[name] = entry[len(prefix):].decode("utf-8", errors="replace")
    for name in names:
        value = found.get(name)
        if value:
            return (name, value[:MAX_RAW_LABEL_CHARS]), False
    return None, False


# Capabilities that reading another user's /proc/<pid>/environ needs (bit numbers of
# linux/capability.h): ptrace access to the process, and reading its 0400 file.
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE = 1, 2, 19


def effective_capabilities(proc_root: str = "/proc") -> int | None:
    """The daemon's effective capability set (``CapEff`` of /proc/self/status), or None."""
    try:
        with open(f"{proc_root}/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def missing_label_capabilities(cap_eff: int | None) -> list[str]:
    """The capabilities (of those reading other users' environments needs) that
    ``cap_eff`` lacks; CAP_DAC_OVERRIDE stands in for CAP_DAC_READ_SEARCH."""
    if cap_eff is None:
        return ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
    missing = []
    if not cap_eff >> CAP_SYS_PTRACE & 1:
        missing.append("CAP_SYS_PTRACE")
    if not (cap_eff >> CAP_DAC_READ_SEARCH & 1 or cap_eff >> CAP_DAC_OVERRIDE & 1):
        missing.append("CAP_DAC_READ_SEARCH")
    return missing


def label_problem_text(label_env: tuple[str, ...], cap_eff: int | None) -> str:
    """The ``processes`` health detail when other users' environments were refused.
    The text does not change with the count, so it is logged once."""
    missing = missing_label_capabilities(cap_eff)
    why = (f"the daemon lacks {' and '.join(missing)} (CapEff {cap_eff or 0:#x})" if missing
           else "although the daemon has CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (a security module refused)")
    return (f"cannot read other users' process environments (permission denied), so their job labels "
            f"({', '.join(label_env)}) are not seen and their energy goes to process-group jobs or "
            f"unattributed: {why}; run as root or grant the capabilities (systemd AmbientCapabilities=); "
            "processes affected: wattprint_processes_labels_unreadable")


@dataclass
class LabelCap:
    """The per-user cap on distinct live labels ([jobs] max_labels_per_user), with
    its episodes: a user's first label over the cap logs a warning; the episode ends
    (one info line) only after ``hold_s`` below the cap, so a user hovering at the
    cap is one episode, not a warning/info pair every tick."""

    max_labels_per_user: int = 32
    hold_s: float = 0.0  # below the cap this long ends an overflow episode ([jobs] label_cap_hold_s)
    overflow_total: int = 0  # jobs filed under OVERFLOW_LABEL because their user was at the cap
    _users: set[int] = field(default_factory=set)  # uids at the label cap (logged once per episode)
    # uid -> monotonic time it was first seen below the cap again
    _below_since: dict[int, float] = field(default_factory=dict)

    def file(self, uid: int, label_raw: str, live_labels: dict[int, set[str]]) -> str:
        """The exported label of a new job of ``uid`` labelled ``label_raw`` ("" for
        none), given the distinct live labels per user so far this tick (updated)."""
        label = sanitize_label(label_raw) if label_raw else ""
        if label and label != OVERFLOW_LABEL:  # the overflow label itself does not count toward the cap
            labels = live_labels.setdefault(uid, set())
            if label not in labels and len(labels) >= self.max_labels_per_user:
                label = OVERFLOW_LABEL
                self._note_overflow(uid, label_raw)
            else:
                labels.add(label)
        return label

    def _note_overflow(self, uid: int, label_raw: str) -> None:
        """A new job of ``uid`` was filed under OVERFLOW_LABEL: count it; log once
        per episode (until the user is below the cap again)."""
        self.overflow_total += 1
        self._below_since.pop(uid, None)  # at the cap again: the episode goes on
        if uid in self._users:
            return
        self._users.add(uid)
        shown = repr(label_raw[:80]) + ("..." if len(label_raw) > 80 else "")
        log.warning("label cap reached for user %s (uid %d, [jobs] max_labels_per_user = %d): new labels, first %s, "
                    "are filed as %r and keep their own label in label_raw (counted in "
                    "wattprint_labels_overflow_total; logged again only after the user is below the cap)",
                    user_name(uid), uid, self.max_labels_per_user, shown, OVERFLOW_LABEL)

    def end_episodes(self, jobs: Iterable[JobIdentity], now_mono_s: float) -> None:
        """End the episode of each user at the cap whose live ``jobs`` have been
        below it for ``hold_s``."""
        if not self._users:
            return
        labels: dict[int, set[str]] = {}
        for ident in jobs:
            if ident.label and ident.label != OVERFLOW_LABEL:
                labels.setdefault(ident.uid, set()).add(ident.label)
        for uid in list(self._users):
            if len(labels.get(uid, ())) >= self.max_labels_per_user:
                self._below_since.pop(uid, None)
                continue
            since = self._below_since.setdefault(uid, now_mono_s)
            if now_mono_s - since >= self.hold_s:
                self._end(uid, len(labels.get(uid, ())))

    def _end(self, uid: int, live_labels: int) -> None:
        self._users.discard(uid)
        self._below_since.pop(uid, None)
        log.info("user %s (uid %d) is below the label cap again (%d distinct live labels)",
                 user_name(uid), uid, live_labels)
