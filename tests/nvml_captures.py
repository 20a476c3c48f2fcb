"""Test helper: read the real nvidia-smi captures in tests/fixtures/nvml/ and turn them
into sim files for the simulated NVML (daemon/sources/nvml_sim.py).

The captures are raw ``nvidia-smi`` text (see tests/fixtures/nvml/PROVENANCE.md): each
section starts with a ``# <phase> :: <what>`` header between lines of ``#``. The parsers
here read the few sections the simulator is checked against and return plain dicts that
carry the 1-based ``line`` they came from, so a test can cite it.

``sim_gpu_from_capture(name)`` builds one sim-file GPU entry that replays a capture's
"load" phase (name, memory, power, MIG instances, processes with GI/CI ids and memory,
per-process utilisation from ``pmon``), so tests of the collector and of attribution can
run against what a real board reported.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"
H100 = "linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt"
H100_MIG = "linux-x86_64__nvidia-h100-mig__590.48.01.txt"
H200_MIG = "linux-x86_64__nvidia-h200-mig__590.48.01.txt"
L40S = "linux-x86_64__nvidia-l40s__595.80.txt"
RTX4080 = "linux-x86_64__nvidia-geforce-rtx-4080-super__595.71.05.txt"
ARCHITECTURE = {H100: "hopper", H100_MIG: "hopper", H200_MIG: "hopper", L40S: "ada", RTX4080: "ada"}
MIB = 1 << 20


@lru_cache(maxsize=None)
def lines(name: str) -> tuple[str, ...]:
    return tuple((FIXTURES / name).read_text(encoding="utf-8").split("\n"))


def section(name: str, title: str) -> list[tuple[int, str]]:
    """The body of section ``# <title>`` as (1-based line number, text) pairs."""
    text = lines(name)
    for i, line in enumerate(text):
        if line.strip() == f"# {title}":
            start = i + 1
            while start < len(text) and not text[start].startswith("#####"):
                start += 1  # skip the "# $ command" line(s) up to the closing rule
            body = []
            for j in range(start + 1, len(text)):
                if text[j].startswith("#####"):
                    break
                body.append((j + 1, text[j]))
            return body
    raise KeyError(f"{name}: no section {title!r}")


def _kv(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


def query_processes(name: str, phase: str = "load") -> list[dict[str, Any]]:
    """The ``Processes`` block of ``nvidia-smi -q``: gi, ci (None for N/A), pid, type,
    used_mib, line (of the Process ID)."""
    out: list[dict[str, Any]] = []
    in_block = False
    cur: dict[str, Any] = {}
    for no, line in section(name, f"{phase} :: query (-q)"):
        if line.startswith("    Processes"):
            in_block = True
            continue
        if not in_block:
            continue
        if line and not line.startswith("        "):
            break  # next top-level entry
        key, value = _kv(line)
        if key == "GPU instance ID":
            cur = {"gi": None if value == "N/A" else int(value)}
        elif key == "Compute instance ID":
            cur["ci"] = None if value == "N/A" else int(value)
        elif key == "Process ID":
            cur["pid"], cur["line"] = int(value), no
        elif key == "Type":
            cur["type"] = value
        elif key == "Used GPU Memory":
            cur["used_mib"] = int(value.split()[0])
            out.append(cur)
    return out


def pmon(name: str, phase: str = "load") -> list[dict[str, Any]]:
    """``nvidia-smi pmon`` rows: pid, type, sm, mem, enc, dec (None for "-"), line."""
    rows = []
    for no, line in section(name, f"{phase} :: pmon (per-process monitor)"):
        parts = line.split()
        if not parts or line.startswith("#"):
            continue
        val = [None if p == "-" else int(p) for p in parts[3:7]]
        rows.append({"pid": int(parts[1]), "type": parts[2], "sm": val[0], "mem": val[1],
                     "enc": val[2], "dec": val[3], "line": no})
    return rows


def power_readings(name: str, phase: str = "load") -> dict[str, Any]:
    """``GPU Power Readings`` of ``-q``: average_w, instant_w and their lines."""
    body = section(name, f"{phase} :: query (-q)")
    for i, (_no, line) in enumerate(body):
        if line.strip() == "GPU Power Readings":
            (avg_no, avg), (inst_no, inst) = body[i + 1], body[i + 2]
            return {"average_w": float(_kv(avg)[1].split()[0]), "average_line": avg_no,
                    "instant_w": float(_kv(inst)[1].split()[0]), "instant_line": inst_no}
    raise KeyError(f"{name}: no GPU Power Readings in {phase}")


def query_value(name: str, phase: str, key: str) -> tuple[str, int]:
    """The first ``key : value`` of ``-q`` in ``phase`` and its line."""
    for no, line in section(name, f"{phase} :: query (-q)"):
        k, v = _kv(line)
        if k == key and v:
            return v, no
    raise KeyError(f"{name}: no {key!r} in {phase} -q")


def _block_value(name: str, phase: str, block: str, key: str) -> tuple[str, int]:
    """``key``'s value inside the top-level ``-q`` block ``block`` (e.g. "FB Memory Usage")."""
    inside = False
    for no, line in section(name, f"{phase} :: query (-q)"):
        if line.startswith("    ") and not line.startswith("     "):
            inside = line.strip() == block
            continue
        if inside:
            k, v = _kv(line)
            if k == key:
                return v, no
    raise KeyError(f"{name}: no {block} / {key} in {phase} -q")


def fb_total_mib(name: str, phase: str = "load") -> int:
    return int(_block_value(name, phase, "FB Memory Usage", "Total")[0].split()[0])


def mig_mode(name: str, phase: str = "load") -> tuple[str, int]:
    """``MIG Mode`` / ``Current`` of ``-q`` ("Enabled", "Disabled" or "N/A") and its line."""
    return _block_value(name, phase, "MIG Mode", "Current")


def mig_devices(name: str, phase: str = "load") -> list[dict[str, Any]]:
    """``MIG Device`` blocks of ``-q``: index, gi, ci, sms, ce, enc, dec, jpg, ofa,
    total_mib, used_mib, line (of the Index)."""
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    in_fb = False
    keys = {"Multiprocessor count": "sms", "Copy Engine count": "ce", "Encoder count": "enc",
            "Decoder count": "dec", "JPG count": "jpg", "OFA count": "ofa"}
    for no, line in section(name, f"{phase} :: query (-q)"):
        if line.strip() == "MIG Device":
            cur = {}
            out.append(cur)
            continue
        if cur is None:
            continue
        if line and not line.startswith("        "):
            if line.strip() != "MIG Device":
                cur = None
            continue
        key, value = _kv(line)
        if key == "Index":
            cur["index"], cur["line"] = int(value), no
        elif key == "GPU Instance ID":
            cur["gi"] = int(value)
        elif key == "Compute Instance ID":
            cur["ci"] = int(value)
        elif key in keys:
            cur[keys[key]] = int(value)
        elif key == "Shared FB Memory Usage":
            in_fb = True
        elif in_fb and key == "Total":
            cur["total_mib"] = int(value.split()[0])
        elif in_fb and key == "Used":
            cur["used_mib"] = int(value.split()[0])
            in_fb = False
    return out


def symbols(name: str) -> set[str]:
    """The ``nvml*`` symbols the capture's libnvidia-ml.so exports."""
    return {line.strip() for _no, line in section(name, "capabilities :: nvml-symbols") if line.startswith("nvml")}


def _profile(sms: int, total_mib: int) -> tuple[str, int]:
    slices = {16: 1, 32: 2, 60: 3, 64: 4, 132: 7}[sms]
    return f"{slices}g.{round(total_mib / 1024)}gb", slices


def sim_gpu_from_capture(name: str, index: int = 0, *, phase: str = "load", power_w: float | None = None,
                         pids: dict[int, int] | None = None) -> dict[str, Any]:
    """A sim-file GPU entry replaying ``phase`` of capture ``name``. ``pids`` maps the
    capture's PIDs to the PIDs to write (e.g. live processes of the test); by default the
    capture's own PIDs are used. Utilisation comes from the first pmon row per PID ("-"
    stays null: no samples)."""
    pids = pids or {}
    gpu_name = query_value(name, phase, "Product Name")[0]
    total_mib = fb_total_mib(name, phase)
    mode = mig_mode(name, phase)[0]
    entry: dict[str, Any] = {
        "name": gpu_name,
        "uuid": f"GPU-{index:08d}-capture",
        "power_w": power_readings(name, phase)["instant_w"] if power_w is None else power_w,
        "architecture": ARCHITECTURE[name],
        "memory_total_bytes": total_mib * MIB,
    }
    gis: dict[int, dict[str, Any]] = {}
    if mode == "Enabled":
        entry["mig"] = True
        devices = mig_devices(name, phase)
        for d in devices:
            gi = gis.setdefault(d["gi"], {"gi_id": d["gi"], "cis": [], "total_mib": d["total_mib"]})
            gi["cis"].append(d)
        instances = []
        for gi in gis.values():
            sms = sum(c["sms"] for c in gi["cis"])
            profile, slices = _profile(sms if len(gi["cis"]) == 1 else 60, gi["total_mib"])
            inst: dict[str, Any] = {"gi_id": gi["gi_id"], "profile": profile, "slices": slices,
                                    "memory_mb": gi["total_mib"]}
            if len(gi["cis"]) > 1:
                inst["compute_instances"] = [{"ci_id": c["ci"], "slices": {16: 1, 32: 2}[c["sms"]]} for c in gi["cis"]]
            instances.append(inst)
        entry["mig_instances"] = instances
    first_util: dict[int, dict[str, Any]] = {}
    for row in pmon(name, phase):
        first_util.setdefault(row["pid"], row)
    procs = []
    for p in query_processes(name, phase):
        proc: dict[str, Any] = {"pid": pids.get(p["pid"], p["pid"]), "used_memory_bytes": p["used_mib"] * MIB,
                                "type": {"C": "compute", "G": "graphics", "C+G": "compute+graphics"}[p["type"]]}
        if p["gi"] is not None:
            proc["gi_id"], proc["ci_id"] = p["gi"], p["ci"]
        u = first_util.get(p["pid"])
        if u is not None:
            for src, dst in (("sm", "sm_util"), ("enc", "enc_util"), ("dec", "dec_util")):
                if u[src] is not None:
                    proc[dst] = u[src]
            if u["mem"] is not None:
                proc["mem_util"] = u["mem"]
        procs.append(proc)
    entry["processes"] = procs
    return entry


__all__ = [
    "FIXTURES", "H100", "H100_MIG", "H200_MIG", "L40S", "RTX4080", "MIB", "lines", "section",
    "query_processes", "pmon", "power_readings", "query_value", "mig_devices", "symbols",
    "fb_total_mib", "mig_mode", "sim_gpu_from_capture",
]
