"""Can the daemon use the netlink proc connector (process events) instead of noticing
new PIDs itself, and what would it cost? (issue 18, "process events instead of
listing ... where the daemon may use it")

Checks, in the namespace this runs in:

1. Subscribing: ``socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR)``, bind to the
   ``CN_IDX_PROC`` group, send ``PROC_CN_MCAST_LISTEN`` (needs CAP_NET_ADMIN in the
   initial user namespace).
2. Whether events arrive: starts ``--spawn`` short processes (``/bin/true``) and
   ``--threads`` threads, then drains the socket and counts fork / exec / exit events
   and whether the PIDs it reports are the ones this namespace sees.
3. The cost of receiving and decoding events in Python, per event (the daemon would
   drain the socket once per tick), against the current design's per-new-PID probe.

    .venv/bin/python benchmarks/proc_connector.py [--spawn 200] [--threads 200]
    unshare --pid --fork --mount-proc .venv/bin/python benchmarks/proc_connector.py   (in a PID namespace)

Prints one JSON object. Linux only; as a non-root user step 1 fails with EPERM.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import struct
import subprocess
import threading
import time

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
EV_FORK, EV_EXEC, EV_EXIT = 0x1, 0x2, 0x80000000

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
PROC_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
FORK = struct.Struct("=IIII")  # parent pid, parent tgid, child pid, child tgid
EXEC_EXIT = struct.Struct("=II")  # pid, tgid


def subscribe(op: int = PROC_CN_MCAST_LISTEN) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    s.bind((os.getpid(), CN_IDX_PROC))
    payload = struct.pack("=I", op)
    cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    msg = NLMSGHDR.pack(NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn
    s.send(msg)
    return s


def drain(s: socket.socket, counts: dict[str, int], pids: set[int]) -> int:
    """Read every queued message without blocking; decode; return the number of events."""
    n = 0
    while True:
        try:
            data = s.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return n
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # the socket buffer overflowed: events were lost
                counts["overflow"] = counts.get("overflow", 0) + 1
                continue
            raise
        off = 0
        while off + NLMSGHDR.size <= len(data):
            length = NLMSGHDR.unpack_from(data, off)[0]
            base = off + NLMSGHDR.size + CN_MSG.size
            what = PROC_EVENT.unpack_from(data, base)[0]
            body = base + PROC_EVENT.size
            if what == EV_FORK:
                _, _, child_pid, child_tgid = FORK.unpack_from(data, body)
                counts["thread" if child_pid != child_tgid else "fork"] += 1
                pids.add(child_tgid)
            elif what == EV_EXEC:
                counts["exec"] += 1
                pids.add(EXEC_EXIT.unpack_from(data, body)[1])
            elif what == EV_EXIT:
                counts["exit"] += 1
            else:
                counts["other"] += 1
            n += 1
            off += (length + 3) & ~3
            if length == 0:
                break


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spawn", type=int, default=200)
    ap.add_argument("--threads", type=int, default=200)
    ap.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUFFORCE bytes (0: the default buffer)")
    args = ap.parse_args()
    out: dict[str, object] = {"euid": os.geteuid(), "pid_namespace": os.readlink("/proc/self/ns/pid"),
                              "pid_here": os.getpid()}
    try:
        s = subscribe()
    except OSError as exc:
        out["subscribe"] = f"failed: {exc}"
        print(json.dumps(out, indent=1))
        return 0
    out["subscribe"] = "ok"
    if args.rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, 33, args.rcvbuf)  # SO_RCVBUFFORCE (root)
    out["rcvbuf_bytes"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    time.sleep(0.05)
    counts = {"fork": 0, "thread": 0, "exec": 0, "exit": 0, "other": 0}
    pids: set[int] = set()
    drain(s, counts, pids)  # whatever happened before
    counts = {k: 0 for k in counts}
    pids = set()
    mine: set[int] = set()
    for _ in range(args.spawn):
        p = subprocess.Popen(["/bin/true"])
        mine.add(p.pid)
        p.wait()
    for _ in range(args.threads):
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
    time.sleep(0.2)
    c0 = time.process_time()
    n = drain(s, counts, pids)
    c1 = time.process_time()
    out["events"] = counts
    out["events_total"] = n
    out["our_children_seen"] = f"{len(mine & pids)} of {len(mine)} (PIDs as this namespace numbers them)"
    out["drain_us_per_event"] = round(1e6 * (c1 - c0) / n, 2) if n else None
    s.close()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
