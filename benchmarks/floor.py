"""The floor: a minimal loop doing only the raw reads wattprint needs each tick.

Once per interval, straightforwardly, with no bookkeeping, no store, no HTTP:

- list ``/proc``; for each process not seen before read its ``stat`` and its
  ``environ`` (to find the label variables), forget processes that are gone;
- read ``/proc/PID/stat`` of every labelled (job) process;
- read ``energy_uj`` of every RAPL package and dram zone under ``--powercap-root``;
- read the first line of ``/proc/stat`` and ``/proc/meminfo``;
- the GPUs: with ``--sim-file`` (default ``--gpu-reads raw``), read the sim file and
  parse its JSON once per tick: the raw read behind the daemon's GPU figures on this
  simulated box, without the simulator's own Python (issue 18: the older floor ran the
  simulated NVML, whose cost then counted as "reads" and hid the daemon's own). With
  ``--gpu-reads nvml-sim``, per GPU through the simulated NVML as before: device count,
  handle, total energy, power, memory info, compute and graphics process lists, and the
  per-process utilisation samples (pynvml would be used on a real box).

wattprint / floor is then the price of everything the daemon does on top of the
reads: attribution, the ledger, the snapshot, the HTTP server.

Usage: python benchmarks/floor.py --seconds S [--sim-file F] [--powercap-root D]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time


def rapl_files(root: str) -> list[str]:
    files = []
    for zone in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
        try:
            with open(os.path.join(zone, "name")) as fh:
                name = fh.read().strip()
        except OSError:
            continue
        if name.startswith("package-") or name == "dram":
            files.append(os.path.join(zone, "energy_uj"))
    return files


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--sim-file", default="")
    ap.add_argument("--powercap-root", default="")
    ap.add_argument("--label-env", default="WATTPRINT_JOB,SLURM_JOB_ID")
    ap.add_argument("--gpu-reads", choices=["raw", "nvml-sim"], default="raw")
    args = ap.parse_args()

    nvml = None
    raw_sim = args.sim_file if args.gpu_reads == "raw" else ""
    if args.sim_file and not raw_sim:
        import pynvml

        from wattprint.daemon.sources.nvml_sim import SimulatedNvml

        nvml = SimulatedNvml(args.sim_file)
        nvml.nvmlInit()
        not_found = pynvml.NVMLError_NotFound
    energy_files = rapl_files(args.powercap_root) if args.powercap_root else []
    wanted = tuple(n.encode() + b"=" for n in args.label_env.split(","))
    seen: set[int] = set()
    jobs: set[int] = set()
    last_util: dict[int, int] = {}

    t0 = time.monotonic()
    deadline = t0 + args.seconds
    k = 0
    while time.monotonic() < deadline:
        # Processes: discover new ones (stat + environ), then stat the job processes.
        pids = {int(e.name) for e in os.scandir("/proc") if e.name.isdigit()}
        for pid in pids - seen:
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    fh.read()
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    env = fh.read()
            except OSError:
                continue
            if any(w in env for w in wanted):
                jobs.add(pid)
        seen = pids
        jobs &= pids
        for pid in jobs:
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    fh.read()
            except OSError:
                pass
        # CPU package and DRAM counters, machine CPU time and memory.
        for path in energy_files:
            with open(path, "rb") as fh:
                fh.read()
        with open("/proc/stat", "rb") as fh:
            fh.readline()
        with open("/proc/meminfo", "rb") as fh:
            fh.read()
        # GPUs.
        if raw_sim:
            try:
                with open(raw_sim, "rb") as fh:
                    doc = json.loads(fh.read())
                for g in doc.get("gpus", ()):
                    g.get("processes")
            except (OSError, ValueError):
                pass
        if nvml is not None:
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                nvml.nvmlDeviceGetTotalEnergyConsumption(h)
                nvml.nvmlDeviceGetPowerUsage(h)
                nvml.nvmlDeviceGetMemoryInfo(h)
                nvml.nvmlDeviceGetComputeRunningProcesses(h)
                nvml.nvmlDeviceGetGraphicsRunningProcesses(h)
                try:
                    samples = nvml.nvmlDeviceGetProcessUtilization(h, last_util.get(i, 0))
                    if samples:
                        last_util[i] = max(int(s.timeStamp) for s in samples)
                except not_found:
                    pass
        k += 1
        time.sleep(max(0.0, t0 + k * args.interval - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
