"""The sink contract (exporters/sink.py), proven with a sink that exists only in the
tests (tests/sink_jsonl.py), added to the sink list in one line by
tests/sink_launcher.py and run as the real daemon process (tests/daemon_harness.py).

- its config section is parsed by the daemon's config loader: a bad value is a clear
  error naming the file, the section and the key, and the daemon exits 2; so is a
  cross check of the section;
- it gets every tick: the GPU energy it was fed equals the simulated GPU's power x the
  time between its first and last tick (within 2 %), the tick count it was fed equals
  the daemon's tick counter in the same scrape;
- its counters are ``wattprint_<key>`` self-metrics, its collector's labelled series are
  on /metrics, its health part is in /healthz;
- start and stop are called (the files it writes then), and stop after the last tick.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, scrape, wait_ticks
from gpusim import gpu, write_sim

LAUNCHER = Path(__file__).with_name("sink_launcher.py")
GPU_W = 180.0


def jsonl_daemon(tmp_path: Path, section: str) -> tuple[DaemonProcess, Path]:
    sim = write_sim(tmp_path / "sim.json", [gpu(0, power_w=GPU_W)])
    out = tmp_path / "ticks.jsonl"
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None, launcher=LAUNCHER,
                           extra_toml=section.format(path=out))
    return daemon, out


@pytest.mark.parametrize(("section", "message"), [
    ('[sink_jsonl]\nenabled = true\npath = "{path}"\nflush_every_ticks = 0\n',
     "[sink_jsonl] flush_every_ticks: 0 is outside 1..1000"),
    ('[sink_jsonl]\nenabled = true\npath = "{path}"\nflush_every_ticks = "often"\n',
     "[sink_jsonl] flush_every_ticks: expected an integer, got 'often'"),
    ('[sink_jsonl]\nenabled = true\n', "[sink_jsonl] path: required when enabled = true"),
    ('[sink_jsonl]\nenabled = true\npath = "{path}"\ncolour = "blue"\n',
     "[sink_jsonl] colour: unknown key (known: enabled, path, flush_every_ticks)"),
])
def test_a_bad_sink_section_is_a_clear_config_error(tmp_path: Path, section: str, message: str) -> None:
    daemon, _out = jsonl_daemon(tmp_path, section)
    with pytest.raises(RuntimeError, match="daemon exited with 2"):
        daemon.start()
    log = daemon.log_path.read_text()
    assert f"{daemon.config_path}: {message}" in log, log
    assert "Traceback" not in log


def test_the_plain_daemon_does_not_know_the_test_section(tmp_path: Path) -> None:
    """Without the launcher's line the section is unknown: the list is what declares it."""
    daemon, _out = jsonl_daemon(tmp_path, '[sink_jsonl]\nenabled = true\npath = "{path}"\n')
    daemon.launcher = None
    with pytest.raises(RuntimeError, match="daemon exited with 2"):
        daemon.start()
    assert "unknown section [sink_jsonl]" in daemon.log_path.read_text()


def test_a_sink_from_the_list_gets_every_tick_and_is_exported(tmp_path: Path) -> None:
    daemon, out = jsonl_daemon(tmp_path, '[sink_jsonl]\nenabled = true\npath = "{path}"\n')
    daemon.start()
    try:
        assert (tmp_path / "ticks.jsonl.started").exists()
        wait_ticks(daemon, 20)  # 2 % of 20 s: 0.4 s, far above the read jitter at the two ends
        health = {p["name"]: p for p in daemon.get("/healthz", allow_error=True)["parts"]}
        assert health["sink_jsonl"]["state"] == "ok", health
        assert health["sink_jsonl"]["detail"] == "writing ticks.jsonl"
        s = scrape(daemon)
        # Fed before the snapshot of the same tick: one on_tick per tick.
        assert s.counter("wattprint_sink_jsonl_ticks_total") == s.tick >= 20
        assert s.counter("wattprint_sink_jsonl_lines_total") >= s.tick
        fed_gpu_j = s.metrics[("wattprint_sink_jsonl_energy_joules_total", (("kind", "gpu"),))]
        assert fed_gpu_j == pytest.approx(s.device_j("gpu"), rel=1e-9)
        assert not (tmp_path / "ticks.jsonl.stopped").exists()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    stopped = json.loads((tmp_path / "ticks.jsonl.stopped").read_text())
    ticks = [json.loads(line) for line in out.read_text().splitlines()]
    ticks = [t for t in ticks if "tick" in t]
    assert stopped["ticks"] == len(ticks) >= s.tick  # nothing fed after stop, nothing lost
    assert [t["tick"] for t in ticks] == list(range(1, len(ticks) + 1))
    # Truth from the sim file: tick k's reading covers (t[k-1], t[k]], so the energy fed
    # after the first tick is the simulated power x the time from the first to the last.
    seconds = ticks[-1]["sampled_at"] - ticks[0]["sampled_at"]
    fed = sum(d["energy_j"] for t in ticks[1:] for d in t["devices"] if d["kind"] == "gpu" and d["device"] == "gpu0")
    assert seconds >= 19.0
    assert fed == pytest.approx(GPU_W * seconds, rel=0.02), (fed, GPU_W * seconds)
    # Conservation holds in what the sink gets: nobody runs on the GPU, all unattributed.
    for t in ticks[1:]:
        gpu_j = sum(d["energy_j"] for d in t["devices"] if d["kind"] == "gpu")
        assert t["unattributed_j"].get("gpu", 0.0) == pytest.approx(gpu_j, abs=1e-9)
