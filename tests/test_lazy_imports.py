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
