"""Lazy imports (issue 18): what ``wattprint run`` imports leaves out the parts that are
off by default, the InfluxDB sink (its modules, spool and client) and the grid fetch
scheduler (apscheduler, needed only for a live grid provider); the ``[influxdb]`` entry
of the sink list still builds the real sink when it is on."""

from __future__ import annotations

import json
import subprocess
import sys

from wattprint.daemon.health import HealthBoard
from wattprint.exporters.influx_config import InfluxConfig
from wattprint.exporters.sink import SinkContext
from wattprint.exporters.sinks import SINK_TYPES

OFF_BY_DEFAULT = ("wattprint.exporters.influx", "wattprint.exporters.influx_publish",
                  "wattprint.exporters.influx_http", "wattprint.exporters.influx_points",
                  "wattprint.exporters.spool", "wattprint.exporters.dead_letter",
                  "wattprint.exporters.lineprotocol", "influxdb_client", "apscheduler",
                  "wattprint.daemon.grid.scheduler")


def test_the_daemons_imports_leave_out_influxdb_and_the_grid_scheduler():
    code = ("import json, sys, wattprint.daemon.cli, wattprint.daemon.app\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout))
    assert "wattprint.daemon.app" in loaded and "wattprint.exporters.sinks" in loaded
    assert sorted(m for m in loaded if m in OFF_BY_DEFAULT or m.split(".")[0] in OFF_BY_DEFAULT) == []


def test_the_influxdb_entry_builds_the_sink_only_when_enabled(tmp_path):
    entry = next(e for e in SINK_TYPES if e.section.name == "influxdb")
    ctx = SinkContext(state_dir=str(tmp_path), host="h", health=HealthBoard())
    assert entry.factory(InfluxConfig(enabled=False), ctx) is None
    assert not (tmp_path / "influx-spool").exists()
    sink = entry.factory(InfluxConfig(enabled=True, url="http://127.0.0.1:9"), ctx)
    try:
        assert type(sink).__name__ == "InfluxPublisher"
        assert "wattprint.exporters.influx_publish" in sys.modules
        assert (tmp_path / "influx-spool").is_dir()
        assert "spool_pending_points" in sink.counters()
    finally:
        sink.sink._spool.close()  # the spool's lock, released (the sink was never started)


# What a started daemon with the default grid provider (static), no BMC ([node] source
# = "none") and the estimated CPU and DRAM sources must not import (issue 18, second
# pass): the live grid clients, the BMC clients (and http.client through Redfish),
# psutil (the DRAM estimate reads MemTotal from /proc/meminfo), the simulators of a
# backend that is off, the CLI's other commands, and OFF_BY_DEFAULT above.
NOT_FOR_RUNNING = OFF_BY_DEFAULT + (
    "psutil", "wattprint.daemon.grid.electricitymaps", "wattprint.daemon.grid.energidataservice",
    "wattprint.daemon.grid.carbonintensity_uk", "wattprint.daemon.sources.node.ipmi",
    "wattprint.daemon.sources.node.redfish", "wattprint.daemon.sources.nvml_sim",
    "wattprint.daemon.sources.amdsmi_sim", "wattprint.daemon.sources.gpu.amd", "wattprint.daemon.openapi",
    "wattprint.daemon.csvout", "wattprint.daemon.fleet", "wattprint.daemon.plan", "wattprint.daemon.doctor",
    "wattprint.daemon.deploy",
)


def _imported(log_text: str) -> set[str]:
    """Module names from ``-X importtime`` lines (PYTHONPROFILEIMPORTTIME=1) in a log."""
    return {line.split("|")[2].strip() for line in log_text.splitlines()
            if line.startswith("import time:") and line.count("|") == 2} - {"imported package"}


def test_a_started_daemon_imports_none_of_what_it_does_not_run(tmp_path):
    import psutil  # the test's own reference for the DRAM estimate (the daemon must not load it)
    from daemon_harness import DaemonProcess, sample, wait_ticks

    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None,
                           extra_toml='[memory]\nsource = "estimate"\n', env={"PYTHONPROFILEIMPORTTIME": "1"})
    daemon.start()
    try:
        wait_ticks(daemon, 2)
        dram_w = sample(daemon.metrics(), "wattprint_device_power_watts", kind="dram", device="dram")
    finally:
        daemon.stop()
    loaded = _imported(daemon.log_path.read_text(errors="replace"))
    assert "wattprint.daemon.app" in loaded and "wattprint.daemon.sources.estimate" in loaded
    assert sorted(m for m in loaded if m in NOT_FOR_RUNNING or m.split(".")[0] in NOT_FOR_RUNNING) == []
    # The DRAM estimate is what it was with psutil: 0.375 W/GB x installed GiB.
    assert abs(dram_w - 0.375 * psutil.virtual_memory().total / 2**30) < 1e-6


def test_installed_memory_is_psutils_total_and_falls_back_to_it(tmp_path):
    import psutil
    from wattprint.daemon.sources.estimate import installed_memory_bytes

    assert installed_memory_bytes() == psutil.virtual_memory().total
    odd = tmp_path / "meminfo"
    odd.write_text("MemFree: 12 kB\n")  # no MemTotal line: psutil's answer
    assert installed_memory_bytes(str(odd)) == psutil.virtual_memory().total
    assert installed_memory_bytes(str(tmp_path / "absent")) == psutil.virtual_memory().total
    odd.write_text("MemTotal:       2048 kB\n")
    assert installed_memory_bytes(str(odd)) == 2048 * 1024


def test_the_daemons_store_connections_bound_the_page_cache(tmp_path):
    from wattprint.daemon.ledger import Ledger, LedgerReader
    from wattprint.daemon.ledger.schema import DAEMON_CACHE_KIB, bound_page_cache

    led = Ledger(str(tmp_path / "s.sqlite3"), host="h", bucket_s=60)
    reader = LedgerReader(str(tmp_path / "s.sqlite3"))
    try:
        assert led.conn.execute("PRAGMA cache_size").fetchone()[0] == -DAEMON_CACHE_KIB == -512
        assert reader.conn.execute("PRAGMA cache_size").fetchone()[0] == -2000  # the CLI's: SQLite's default
        bound_page_cache(reader.conn)  # what serve() does to the API's reader
        assert reader.conn.execute("PRAGMA cache_size").fetchone()[0] == -512
    finally:
        reader.close()
        led.close()
